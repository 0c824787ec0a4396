"""Shared fixtures: the tiny in-process model and its (real SmolLM2) tokenizer, small data files, batches.

The default tunelab cache is kept on purpose, so the tokenizer is materialised once per machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.data.packing import collate
from tunelab.data.templating import Encoded

REPO = Path(__file__).resolve().parents[1]
# benchmark data beside the checkout (tests and benchmarks only; users pass their own paths)
MBPP_FILE = REPO.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"
ALLOW_SKIP = "TUNELAB_TESTS_ALLOW_SKIP"


def need(ok: bool, why: str) -> None:
    """A prerequisite CI has (the ../shared data, bubblewrap, a sandbox mode): without it the test FAILS, so a
    green suite never hides a check that did not run. A developer on a machine without it can opt out with
    TUNELAB_TESTS_ALLOW_SKIP=1, which turns these failures into visible skips."""
    if ok:
        return
    if os.environ.get(ALLOW_SKIP) == "1":
        pytest.skip(why)
    pytest.fail(f"{why} (on a machine that cannot have it, {ALLOW_SKIP}=1 skips such tests instead)", pytrace=False)


@pytest.fixture
def mbpp_file() -> Path:
    need(MBPP_FILE.is_file(), f"MBPP data not found at {MBPP_FILE} (../shared/data next to the checkout)")
    return MBPP_FILE


needs_mbpp = pytest.mark.usefixtures("mbpp_file")
IM_END = "<|im_end|>"

# The tiny model's ops are too small to gain from intra-op threads: on 2 cores a second thread doubles the
# CPU time (spin waits) and slows the suite, worse when the cores are shared. e2e subprocesses get
# OMP_NUM_THREADS=1 and run two at a time instead.
torch.set_num_threads(1)


def chat_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """`n` small code-instruction conversations in `messages` format, varied lengths."""
    ops = [("add", "+"), ("sub", "-"), ("mul", "*"), ("pow", "**")]
    rows = []
    for i in range(start, start + n):
        name, op = ops[i % len(ops)]
        pad = " and keep it short" * (i % 3)
        rows.append({"messages": [
            {"role": "user", "content": f"Write {name}_{i}(a, b) returning a {op} b{pad}."},
            {"role": "assistant", "content": f"def {name}_{i}(a, b):\n    return a {op} b"},
        ]})
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path: Path) -> Callable[..., Path]:
    """jsonl(rows, name="train.jsonl") -> path of a JSONL file in tmp_path (str rows are written verbatim)."""

    def make(rows: list[Any], name: str = "train.jsonl") -> Path:
        return write_jsonl(tmp_path / name, rows)

    return make


@pytest.fixture(scope="session")
def tok() -> Any:
    """The tiny-llama tokenizer (SmolLM2's, with chat template). Do not mutate: use `fresh_tok` for that."""
    from tunelab.models.presets import PRESETS

    return PRESETS["tiny-llama"].tokenizer()


@pytest.fixture
def fresh_tok() -> Any:
    from tunelab.models.presets import PRESETS

    return PRESETS["tiny-llama"].tokenizer()


def _tiny() -> torch.nn.Module:
    from tunelab.models.presets import PRESETS

    return PRESETS["tiny-llama"].model(dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def make_model() -> Callable[[], torch.nn.Module]:
    """Factory for a fresh tiny-llama (fp32, eval mode, identical deterministic weights every call)."""
    return _tiny


@pytest.fixture
def model() -> torch.nn.Module:
    return _tiny()


def encoded_samples(tok: Any, n: int = 4, start: int = 0) -> list[Encoded]:
    from tunelab.data.formats import to_example
    from tunelab.data.templating import encode

    return [
        encode(tok, to_example(r, "messages", f"row{i}"), template="chat", loss_on="assistant")
        for i, r in enumerate(chat_rows(n, start))
    ]


@pytest.fixture(scope="session")
def samples(tok: Any) -> list[Encoded]:
    """Six encoded chat samples of different lengths (assistant-only labels)."""
    return encoded_samples(tok, 6)


@pytest.fixture
def sft_batch(samples: list[Encoded], tok: Any) -> dict[str, torch.Tensor]:
    """An unpacked, right-padded batch of four samples (no `real_tokens`), ready for an objective."""
    batch = collate([[s] for s in samples[:4]], tok.pad_token_id, packed=False)
    batch.pop("real_tokens")
    return batch


@pytest.fixture
def packed_batch(samples: list[Encoded], tok: Any) -> dict[str, torch.Tensor]:
    """Two packed rows of three samples each (position_ids restart per sample)."""
    batch = collate([samples[:3], samples[3:]], tok.pad_token_id, packed=True)
    batch.pop("real_tokens")
    return batch
