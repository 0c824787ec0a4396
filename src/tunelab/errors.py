"""User-facing errors.

A `UserError` is a mistake the user can fix (bad file, bad key, missing dependency). The CLI prints its
message as one line and exits with code 2; only `--debug` shows a traceback. Raise it with a message that
names the file/line/key and says what to do.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input; the message says where and what to do."""

    exit_code = 2


def missing_extra(package: str, extra: str, purpose: str) -> UserError:
    """Error for an optional dependency that is not installed."""
    return UserError(f"{purpose} needs the '{package}' package: pip install 'tunelab[{extra}]' (or pip install {package})")


def read_utf8(path: Path) -> str:
    """The text of `path`; a file that is not UTF-8 (binary, another encoding) is a UserError naming file:line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8, or check that "
                        "this is the file you meant") from None
