"""extract_code: from a chat answer or a raw continuation to the program the sandbox runs."""

from __future__ import annotations

import ast

import pytest

from tunelab.evaluate.extract import STOP_SEQUENCES, extract_code

PROMPT = (
    "from typing import List\n\n\n"
    "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
    "    given threshold.\n"
    "    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n"
    "    False\n"
    '    """\n'
)
EP = "has_close_elements"
SOLUTION = (
    "def has_close_elements(numbers, threshold):\n"
    "    for i, a in enumerate(numbers):\n"
    "        for j, b in enumerate(numbers):\n"
    "            if i != j and abs(a - b) < threshold:\n"
    "                return True\n"
    "    return False\n"
)


def parses(code: str) -> bool:
    ast.parse(code)
    return True


def test_fenced_python_block_is_taken_and_prose_dropped() -> None:
    answer = f"Sure! Here is the function:\n\n```python\n{SOLUTION}```\n\nIt compares every pair."
    code = extract_code(answer, entry_point=EP)
    assert code == SOLUTION
    assert "Sure" not in code and "compares" not in code


def test_untagged_fence_and_unclosed_fence() -> None:
    assert extract_code(f"Here:\n```\n{SOLUTION}```\n", entry_point=EP) == SOLUTION
    # Generation cut by the token limit: the fence never closes.
    assert extract_code(f"Here:\n```python\n{SOLUTION}", entry_point=EP) == SOLUTION


def test_block_defining_the_entry_point_is_preferred() -> None:
    usage = "print(has_close_elements([1.0, 2.0], 0.5))\nprint('a much longer example line' * 3)\n" * 3
    answer = f"Usage first:\n```python\n{usage}```\nThe function:\n```python\n{SOLUTION}```\n"
    assert extract_code(answer, entry_point=EP) == SOLUTION


def test_python_blocks_are_preferred_over_other_languages() -> None:
    answer = f"Run it:\n```bash\npython main.py\n```\nCode:\n```py\n{SOLUTION}```\n```text\noutput\n```\n"
    assert extract_code(answer) == SOLUTION


def test_without_entry_point_the_longest_sensible_block_wins() -> None:
    short = "def helper():\n    return 1\n"
    answer = f"```python\nx = 1\n```\n```python\n{short}```\n```python\n{SOLUTION}```\n```python\nthis is not code\n```"
    assert extract_code(answer) == SOLUTION


def test_no_fence_starts_at_first_code_line_and_cuts_trailing_prose() -> None:
    answer = f"The idea is to compare all pairs.\n\n{SOLUTION}\nThis runs in O(n^2) time.\nHope it helps!"
    code = extract_code(answer, entry_point=EP)
    assert code == SOLUTION
    answer2 = f"import math\n{SOLUTION}\nExplanation: math is not needed."
    assert extract_code(answer2) == "import math\n" + SOLUTION


def test_prose_cut_never_truncates_inside_an_indented_body() -> None:
    broken = "def f(x):\n    y = x +\n    return y\n\nSome prose."
    code = extract_code(broken)
    assert "y = x +" in code  # left broken on purpose: the sandbox reports the syntax error


def test_missing_prompt_imports_are_prepended() -> None:
    answer = "```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n    return False\n```"
    code = extract_code(answer, prompt=PROMPT, entry_point=EP)
    assert code.startswith("from typing import List\n")
    assert parses(code)
    # Already imported: nothing is duplicated.
    with_import = extract_code(f"```python\nfrom typing import List\n{SOLUTION}```", prompt=PROMPT, entry_point=EP)
    assert with_import.count("from typing import List") == 1


def test_prompt_helpers_missing_from_the_answer_are_prepended() -> None:
    prompt = ("def encode_cyclic(s: str):\n    \"\"\"Helper.\"\"\"\n    return s[::-1]\n\n\n"
              "def decode_cyclic(s: str):\n    \"\"\"Inverse of encode_cyclic.\"\"\"\n")
    answer = "```python\ndef decode_cyclic(s):\n    return encode_cyclic(s)\n```"
    code = extract_code(answer, prompt=prompt, entry_point="decode_cyclic")
    assert code.index("def encode_cyclic") < code.index("def decode_cyclic")
    assert code.count("def decode_cyclic") == 1  # the stub signature is not copied
    # Already defined by the answer: not duplicated.
    both = "```python\ndef encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n```"
    assert extract_code(both, prompt=prompt, entry_point="decode_cyclic").count("def encode_cyclic") == 1


def test_body_only_answer_gets_the_prompt_prepended() -> None:
    body = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    code = extract_code(f"```python\n{body}```", prompt=PROMPT, entry_point=EP)
    assert code.startswith(PROMPT)
    assert parses(code)
    # Unindented body in a chat answer, then prose.
    code2 = extract_code("return len(numbers) > 1\n\nThat is all.", prompt=PROMPT, entry_point=EP)
    assert code2 == PROMPT + "    return len(numbers) > 1\n"


def test_main_guard_demo_is_dropped() -> None:
    answer = f"```python\n{SOLUTION}\nif __name__ == '__main__':\n    n = int(input())\n    print(n)\n```"
    code = extract_code(answer, entry_point=EP)
    assert "input()" not in code and "__main__" not in code
    assert code.strip() == SOLUTION.strip()


def test_done_marker_ends_a_chat_answer() -> None:
    assert extract_code(f"{SOLUTION}[DONE]\nmore text", entry_point=EP) == SOLUTION


def test_completion_mode_is_prompt_plus_cut_completion() -> None:
    completion = "    return False\n\n\ndef another():\n    pass\n"
    assert extract_code(completion, prompt=PROMPT, mode="completion") == PROMPT + "    return False\n\n"
    for stop, tail in [("\nclass ", "\nclass A:\n    pass\n"), ("\nif __name__", "\nif __name__ == '__main__':\n    x()\n"),
                       ("\nprint(", "\nprint(1)\n"), ("\n#", "\n# trailing comment\n"), ("[DONE]", "[DONE] junk")]:
        assert stop in STOP_SEQUENCES
        out = extract_code("    return True\n" + tail, prompt=PROMPT, mode="completion")
        assert out == PROMPT + "    return True\n", stop
    # Indented comments and nested defs are part of the body, not stops.
    body = "    # loop over pairs\n    def inner(x):\n        return x\n    return inner(False)\n"
    assert extract_code(body, prompt=PROMPT, mode="completion") == PROMPT + body
    assert extract_code("x = 1\n\nprint(x)", mode="completion") == "x = 1\n"


def test_bad_mode() -> None:
    with pytest.raises(ValueError):
        extract_code("x", mode="other")  # type: ignore[arg-type]


def test_extracted_program_runs_in_the_sandbox() -> None:
    from tunelab.evaluate.sandbox import execute

    test = "\n\ndef check(candidate):\n    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n" \
           "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n" \
           "    assert candidate([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == False\n\n"
    body = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    for code in (extract_code(f"Here you go:\n```python\n{body}```\nDone.", prompt=PROMPT, entry_point=EP),
                 extract_code(body + "\ndef junk(", prompt=PROMPT, mode="completion")):
        result = execute(code + test + f"check({EP})\n", timeout=5, memory_mb=256)
        assert result.passed, result.reason
