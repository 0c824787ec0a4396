"""extract_code: from a chat answer or a raw continuation to the program the sandbox runs."""

from __future__ import annotations

import ast
import textwrap

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
    with pytest.raises(ValueError, match=r"^mode must be 'chat' or 'completion', got 'other'$"):
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


# --- fences: which blocks count ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lang, block", [
    ("r", "x <- c(1, 2)"),  # one-letter tag; the R line even parses as Python (x < -c(1, 2))
    ("bash", "pip install numpy"),
    ("javascript", "const pair = () => [1, 2];"),
])
def test_other_language_block_is_never_taken_even_when_it_is_the_only_fence(lang: str, block: str) -> None:
    answer = f"First:\n```{lang}\n{block}\n```\nIn Python:\n\ndef pair():\n    return [1, 2]\n"
    assert extract_code(answer) == "def pair():\n    return [1, 2]\n"


def test_untagged_fence_is_taken_even_without_a_def() -> None:
    answer = "Run this:\n```\nn = int(input())\nprint(n * 2)\n```\nIt doubles n."
    assert extract_code(answer) == "n = int(input())\nprint(n * 2)\n"


@pytest.mark.parametrize("info", ['python title="double.py"', "Python3 {linenos=true}", "py  main.py", "python\tmain.py"])
def test_language_is_the_first_word_of_the_info_string(info: str) -> None:
    answer = f"```{info}\nn = int(input())\nprint(n * 2)\n```\nIt doubles n."
    assert extract_code(answer) == "n = int(input())\nprint(n * 2)\n"


def test_chosen_code_is_kept_verbatim_apart_from_surrounding_blank_lines() -> None:
    # Only blank lines around the code go: indentation of the first line and trailing spaces are the model's own.
    code = "  # -*- a leading indented comment -*-\ndef f():\n    return 1  "
    assert extract_code(f"```python\n\n{code}\n\n```") == code + "\n"
    # First and last characters are never clipped (a constant named X..., fenced or not).
    program = "XMAS_DAY = 25\nprint(XMAS_DAY + 1)"
    assert extract_code(f"```python\n{program}\n```") == program + "\n"
    assert extract_code(f"\n\n{program}\n\n") == program + "\n"


# --- several blocks: which one wins -----------------------------------------------------------------------------

CHECK = (
    "def check(candidate):\n"
    "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) is True\n"
    "    assert candidate([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) is False\n"
    "    assert candidate([], 1.0) is False\n"
    "    assert candidate([1.0, 1.0], 0.0) is False\n"
)
USAGE = "numbers = [1.0, 2.0, 3.9, 4.0, 5.0, 2.2]\nfor t in (0.05, 0.3, 1.0):\n    print(t, has_close_elements(numbers, t))\n"


def test_entry_point_block_beats_a_longer_block_that_defines_something_else() -> None:
    assert len(CHECK) > len(SOLUTION)
    for answer in (f"```python\n{SOLUTION}```\nTests:\n```python\n{CHECK}```",
                   f"Tests:\n```python\n{CHECK}```\nCode:\n```python\n{SOLUTION}```"):
        assert extract_code(answer, entry_point=EP) == SOLUTION
    assert extract_code(f"```python\n{SOLUTION}```\n```python\n{CHECK}```") == CHECK  # no entry point: longest


def test_among_blocks_defining_the_entry_point_the_first_that_parses_wins() -> None:
    signature = "def has_close_elements(numbers, threshold):\n"
    answer = f"Signature:\n```python\n{signature}```\nImplementation:\n```python\n{SOLUTION}```\nAgain:\n```python\n{SOLUTION}# v2\n```"
    assert extract_code(answer, entry_point=EP) == SOLUTION
    # None parses: the first defining block is still taken (the sandbox reports its syntax error).
    broken = "def has_close_elements(numbers, threshold):\n    return any(\n"
    assert extract_code(f"```python\n{broken}```\n```python\n{signature}```", entry_point=EP) == broken


def test_a_block_defining_something_beats_longer_plain_code() -> None:
    defining = "from typing import List\n\n\ndef mean(xs: List[float]) -> float:\n    return sum(xs) / len(xs)\n"
    assert len(USAGE) > len(defining)
    assert extract_code(f"```python\n{USAGE}```\n```python\n{defining}```") == defining


@pytest.mark.parametrize("blocks, expected", [
    # equally long defining blocks: the earlier one
    ([("python", "def f():\n    return 1\n"), ("python", "def g():\n    return 2\n")], "def f():\n    return 1\n"),
    # nothing defines a function: the longest block that parses; on a tie, the earlier one
    ([("python", "this isn't code at all\n"), ("python", "x = 1\n"), ("", "values = [3, 1, 2]\nprint(sorted(values))\n")],
     "values = [3, 1, 2]\nprint(sorted(values))\n"),
    ([("python", "this isn't code\n"), ("python", "print(1)\n"), ("python", "print(2)\n")], "print(1)\n"),
    # nothing parses: the first candidate, python-tagged blocks before untagged ones
    ([("", "still isn't code\n"), ("python", "def f(:\n    pass\n"), ("py", "nor is this one\n")], "def f(:\n    pass\n"),
])
def test_block_choice_without_entry_point(blocks: list[tuple[str, str]], expected: str) -> None:
    answer = "".join(f"Option {i}:\n```{lang}\n{code}```\n" for i, (lang, code) in enumerate(blocks))
    assert extract_code(answer) == expected


# --- no fence: cutting trailing prose ---------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    # the only cut point is right after the first line
    ("def add(a, b): return a + b\nThis adds two numbers.", "def add(a, b): return a + b\n"),
    # prose starting with a one-letter word
    ("def add(a, b):\n    return a + b\n\nI tested it on a few inputs.", "def add(a, b):\n    return a + b\n"),
    # a whitespace-only line before the prose goes with it
    ("def add(a, b):\n    return a + b\n    \nThis adds.", "def add(a, b):\n    return a + b\n"),
])
def test_unfenced_trailing_prose_is_cut(answer: str, expected: str) -> None:
    assert extract_code(answer) == expected


# --- main guard -------------------------------------------------------------------------------------------------

def test_main_guard_is_dropped_without_touching_its_neighbours() -> None:
    guard = "if __name__ == '__main__':\n    print(has_close_elements([1.0], 0.5))\n"
    # directly after the function, no blank line in between
    assert extract_code(f"```python\n{SOLUTION}{guard}```", entry_point=EP) == SOLUTION
    # in the middle: what follows the guard is kept
    helper = "def helper():\n    return 1\n"
    assert extract_code(f"```python\n{SOLUTION}{guard}{helper}```", entry_point=EP) == SOLUTION + helper


# --- completing the answer from the prompt ----------------------------------------------------------------------

def test_prompt_imports_are_copied_without_trailing_whitespace() -> None:
    prompt = 'from typing import List   \n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
    answer = "```python\ndef total(xs):\n    return sum(xs)\n```"
    assert extract_code(answer, prompt=prompt, entry_point="total") == (
        "from typing import List\n\ndef total(xs):\n    return sum(xs)\n")


def test_helpers_and_imports_after_other_statements_are_all_prepended() -> None:
    # HumanEval/32 shape: imports, then helpers, then the entry point's stub.
    poly = ("def poly(xs: list, x: float):\n"
            '    """Evaluates polynomial with coefficients xs at point x."""\n'
            "    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])")
    tolerance = "def tolerance() -> float:\n    return 1e-9"  # no docstring, a single constant return
    prompt = (f"import math\nimport cmath\n\n\n{poly}\n\n\n{tolerance}\n\n\n"
              'def find_zero(xs: list):\n    """Find x such that poly(x) = 0."""\n')
    answer = "def find_zero(xs):\n    return 0.0\n"
    code = extract_code(f"```python\n{answer}```", prompt=prompt, entry_point="find_zero")
    assert code == f"import math\nimport cmath\n\n{poly}\n\n{tolerance}\n\n\n{answer}"


def test_prompt_stubs_are_not_copied() -> None:
    prompt = ('def is_prime(n: int) -> bool:\n    """True if n is prime."""\n\n\n'
              'def count_primes(n: int) -> int:\n    """Number of primes below n."""\n')
    answer = "```python\ndef count_primes(n):\n    return sum(all(k % d for d in range(2, k)) for k in range(2, n))\n```"
    code = extract_code(answer, prompt=prompt, entry_point="count_primes")
    assert code == "def count_primes(n):\n    return sum(all(k % d for d in range(2, k)) for k in range(2, n))\n"


def test_helper_defined_anywhere_in_the_answer_is_not_duplicated() -> None:
    prompt = ('def encode_cyclic(s: str):\n    """Helper."""\n    return s[::-1]\n\n\n'
              'def decode_cyclic(s: str):\n    """Inverse of encode_cyclic."""\n')
    answer = "def decode_cyclic(s):\n    return encode_cyclic(s)\n\n\ndef encode_cyclic(s):\n    return s[::-1]\n"
    assert extract_code(f"```python\n{answer}```", prompt=prompt, entry_point="decode_cyclic") == answer


def test_decorated_helper_is_copied_with_its_decorators() -> None:
    point = ("@total_ordering\n@dataclass(frozen=True)\nclass Point:\n    x: int\n    y: int\n\n"
             "    def __lt__(self, other):\n        return (self.x, self.y) < (other.x, other.y)")
    prompt = (f"from dataclasses import dataclass\nfrom functools import total_ordering\n\n\n{point}\n\n\n"
              'def lowest(points: list) -> Point:\n    """The smallest point."""\n')
    answer = "def lowest(points):\n    return min(points)\n"
    code = extract_code(f"```python\n{answer}```", prompt=prompt, entry_point="lowest")
    assert code == f"from dataclasses import dataclass\nfrom functools import total_ordering\n\n{point}\n\n\n{answer}"


def test_entry_point_is_never_copied_from_the_prompt() -> None:
    # A class entry point with a body in the prompt: an answer that lacks it gets no credit from the prompt's code.
    prompt = 'class Stack:\n    """A LIFO stack: implement push and pop."""\n\n    def __init__(self):\n        self.items = []\n'
    answer = "```python\nclass LifoStack:\n    pass\n```"
    assert extract_code(answer, prompt=prompt, entry_point="Stack") == "class LifoStack:\n    pass\n"


# --- body-only answers ------------------------------------------------------------------------------------------

BODY = "    s = sorted(numbers)\n    return any(b - a < threshold for a, b in zip(s, s[1:]))\n"


@pytest.mark.parametrize("answer, expected", [
    (f"```python\n{BODY}```", PROMPT + BODY),  # fenced: dedented, then indented again under the signature
    (f"```python\n{textwrap.dedent(BODY)}```", PROMPT + BODY),
    (f"{BODY}\nSorting first makes it O(n log n).", PROMPT + BODY),  # unfenced, already indented: kept, prose cut
    (f"{textwrap.dedent(BODY)}\nSorting first makes it O(n log n).", PROMPT + BODY),  # unindented: cut, then indented
    (f"   \n{textwrap.dedent(BODY)}\nSorting first.", PROMPT + "   \n" + BODY),  # ... after a line of stray spaces
])
def test_body_only_answer_is_put_under_the_prompt_signature(answer: str, expected: str) -> None:
    assert extract_code(answer, prompt=PROMPT, entry_point=EP) == expected


def test_body_only_answer_broken_is_left_for_the_sandbox_to_report() -> None:
    # The prompt is never cut into, and a fenced answer is never cut at all (cutting would change the program).
    broken = "    return any(abs(a - b) < threshold for a in numbers\n"
    assert extract_code(broken, prompt=PROMPT, entry_point=EP) == PROMPT + broken
    fenced = "for a in numbers:\n    if a > threshold:\n        return True\nreturn False if\n"
    assert extract_code(f"```python\n{fenced}```", prompt=PROMPT, entry_point=EP) == PROMPT + textwrap.indent(fenced, "    ")


def test_empty_answer_gives_the_prompt_stub() -> None:
    for answer in ("", "\n\n", "  \n"):
        assert extract_code(answer, prompt=PROMPT, entry_point=EP) == PROMPT


def test_prompt_without_final_newline_gets_one_before_the_body() -> None:
    prompt = 'def double(x):\n    """Return x doubled."""'
    assert extract_code("```python\nreturn 2 * x\n```", prompt=prompt, entry_point="double") == (
        'def double(x):\n    """Return x doubled."""\n    return 2 * x\n')


# --- completion mode --------------------------------------------------------------------------------------------

def test_completion_is_cut_at_the_first_of_repeated_stops() -> None:
    completion = "    return True\n\n\ndef a():\n    pass\n\n\ndef b():\n    pass\n"
    assert extract_code(completion, prompt=PROMPT, mode="completion") == PROMPT + "    return True\n\n"
    assert extract_code(f"{SOLUTION}[DONE]\nx = 1\n[DONE]\n") == SOLUTION
