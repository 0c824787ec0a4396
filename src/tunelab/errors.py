"""User-facing errors.

A `UserError` is a mistake the user can fix (bad file, bad key, missing dependency). The CLI prints its
message as one line and exits with code 2; only `--debug` shows a traceback. Raise it with a message that
names the file/line/key and says what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message says where and what to do."""

    exit_code = 2


def missing_extra(package: str, extra: str, purpose: str) -> UserError:
    """Error for an optional dependency that is not installed."""
    return UserError(f"{purpose} needs the '{package}' package: pip install 'tunelab[{extra}]' (or pip install {package})")
