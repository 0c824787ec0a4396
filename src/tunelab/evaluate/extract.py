"""Turn a model's completion into the Python program that the sandbox runs.

Two shapes of output:

* ``mode="completion"`` (base models, HumanEval style): the model continued the prompt, so the program
  is ``prompt + completion`` with the completion cut at the first stop sequence (`STOP_SEQUENCES`: a
  new top-level ``def``/``class``/``if __name__``/``print(``/comment, or ``[DONE]``).
* ``mode="chat"`` (instruct models): the answer is prose plus code. Fenced blocks are preferred
  (```` ```python ```` over untagged ```` ``` ````, other languages ignored); among several, the first
  one defining `entry_point`, else the longest that parses and defines something. Without fences, the
  code starts at the first ``def``/``class``/``import``/``from``/decorator line and trailing prose is
  cut (at the last top-level line before which the text still parses). Then the prompt is used to
  complete the answer: if the code does not define `entry_point` but the prompt has its signature
  (the model wrote only the body), the prompt is prepended; otherwise the prompt's import lines that
  the code lacks are prepended (HumanEval prompts carry ``from typing import List``), and so are the
  prompt's complete helper functions the code does not define (``encode_cyclic``). A top-level
  ``if __name__ == "__main__":`` block is dropped: the sandbox runs programs as ``__main__`` and such
  demo blocks typically read stdin.

Nothing here executes code; `ast` is only used to check that text parses.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from typing import Literal

STOP_SEQUENCES: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "[DONE]")
_PY_LANGS = {"python", "py", "python3", "py3", "ipython", "pycon"}
_CODE_START = re.compile(r"^[ \t]*(?:async[ \t]+def[ \t]|def[ \t]|class[ \t]|import[ \t]|from[ \t]+\S+[ \t]+import[ \t]|@)")
_IMPORT_LINE = re.compile(r"^(?:import[ \t]+\S|from[ \t]+\S+[ \t]+import[ \t]+\S)")


@dataclass
class _Block:
    lang: str
    code: str
    index: int


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None


def _fenced_blocks(text: str) -> list[_Block]:
    blocks: list[_Block] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            lang = stripped[3:].split()[0].lower() if stripped[3:].strip() else ""  # the info string's first word
            body: list[str] = []
            i += 1
            # An unclosed fence (generation hit its token limit) runs to the end of the text.
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(_Block(lang, textwrap.dedent("\n".join(body)).strip("\n"), len(blocks)))
        i += 1
    return blocks


def _choose_block(blocks: list[_Block], entry_point: str | None) -> str | None:
    tagged = [b for b in blocks if b.lang in _PY_LANGS]
    untagged = [b for b in blocks if b.lang == ""]
    candidates = [b for b in tagged + untagged if b.code.strip()]
    if not candidates:
        return None
    if entry_point:
        defining = [b for b in candidates if _defines(b.code, entry_point)]
        if defining:
            parsing = [b for b in defining if _parses(b.code)]
            return (parsing or defining)[0].code
    sensible = [b for b in candidates if _parses(b.code) and re.search(r"^[ \t]*(?:async\s+)?(?:def|class)\s",
                                                                       b.code, re.M)]
    if sensible:
        return max(sensible, key=lambda b: (len(b.code), -b.index)).code
    parsing = [b for b in candidates if _parses(b.code)]
    if parsing:
        return max(parsing, key=lambda b: (len(b.code), -b.index)).code
    return candidates[0].code


def _unfenced_code(text: str) -> str:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if _CODE_START.match(line):
            return "\n".join(lines[i:])
    return text


def _cut_prose(code: str, keep_lines: int = 0) -> str:
    """Largest prefix that parses, cut only before a non-indented line (prose sits at column 0)."""
    if _parses(code):
        return code
    lines = code.split("\n")
    for k in range(len(lines) - 1, keep_lines, -1):
        line = lines[k]
        if line.strip() and not line[0].isspace():
            prefix = "\n".join(lines[:k]).rstrip()
            if _parses(prefix):
                return prefix + "\n"
    return code


def _drop_main_guard(code: str) -> str:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code
    lines = code.split("\n")
    for node in reversed(tree.body):
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
                and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
                and test.comparators[0].value == "__main__" and not node.orelse):  # type: ignore[union-attr]
            end = node.end_lineno or node.lineno
            del lines[node.lineno - 1:end]
    return "\n".join(lines)


def _prompt_imports(prompt: str) -> list[str]:
    return [line.rstrip() for line in prompt.split("\n") if _IMPORT_LINE.match(line)]


def _prompt_helpers(prompt: str, code: str, entry_point: str | None) -> list[str]:
    """Complete top-level functions/classes of the prompt that the code does not define itself.

    HumanEval prompts sometimes give helpers next to the signature (``encode_cyclic`` before
    ``decode_cyclic``); the tests may call them, and a chat answer usually repeats only the entry point.
    """
    try:
        tree = ast.parse(prompt)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    helpers = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name == entry_point:
            continue
        body = node.body[1:] if node.body and isinstance(node.body[0], ast.Expr) and isinstance(
            getattr(node.body[0], "value", None), ast.Constant) else node.body
        defined = re.search(rf"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]+{re.escape(node.name)}\b", code, re.M)
        if body and not defined:  # a bare signature + docstring is a stub, not a helper
            segment = ast.get_source_segment(prompt, node)
            if segment:
                decorators = "".join(f"@{ast.get_source_segment(prompt, d)}\n" for d in node.decorator_list)
                helpers.append(decorators + segment)
    return helpers


def _with_body_indent(body: str) -> str:
    """The model wrote only the function body; make sure it sits inside the prompt's def."""
    first = next((line for line in body.split("\n") if line.strip()), "")
    if first and not first[0].isspace():
        return textwrap.indent(body, "    ")
    return body


def _cut_at_stops(text: str, stops: tuple[str, ...]) -> str:
    cut = len(text)
    for stop in stops:
        pos = text.find(stop)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def extract_code(completion: str, *, prompt: str | None = None, entry_point: str | None = None,
                 mode: Literal["chat", "completion"] = "chat") -> str:
    """The program to run for `completion` (see the module docstring for the rules of each mode)."""
    if mode == "completion":
        body = _cut_at_stops(completion, STOP_SEQUENCES)
        return (prompt or "") + body
    if mode != "chat":
        raise ValueError(f"mode must be 'chat' or 'completion', got {mode!r}")

    text = _cut_at_stops(completion, ("[DONE]",))
    block = _choose_block(_fenced_blocks(text), entry_point)
    fenced = block is not None
    code = block if block is not None else _unfenced_code(text).strip("\n")

    if entry_point and prompt and not _defines(code, entry_point) and _defines(prompt, entry_point):
        head = prompt if prompt.endswith("\n") else prompt + "\n"
        first = next((line for line in code.split("\n") if line.strip()), "")
        if not fenced and first and not first[0].isspace():
            code = _cut_prose(code)  # an unindented body parses on its own; cut before indenting it
        program = head + _with_body_indent(code)
        if not fenced:
            program = _cut_prose(program, keep_lines=head.count("\n"))
        return program.rstrip() + "\n"

    if not fenced:
        code = _cut_prose(code)
    code = _drop_main_guard(code)
    if prompt:
        helpers = _prompt_helpers(prompt, code, entry_point)
        if helpers:
            code = "\n\n".join(helpers) + "\n\n\n" + code
        present = {line.strip() for line in code.split("\n")}
        missing = [line for line in _prompt_imports(prompt) if line.strip() not in present]
        if missing:
            code = "\n".join(missing) + "\n\n" + code
    return code.strip("\n") + "\n"
