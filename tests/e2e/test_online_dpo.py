"""Online DPO on the tiny model, in process: rounds of rollouts drawn during training, logged, trained on, and a
run stopped at a round boundary and again mid-round resumes to the uninterrupted run's adapter bit for bit,
without sampling again where the round's rows are on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_jsonl

from tunelab.config import validate
from tunelab.train import loop

OPS = ["+", "-", "*"]


def _problems(tmp_path: Path) -> Path:
    rows = [{"id": f"p{i}", "entry_point": f"f{i}", "tests": [f"assert f{i}(3, 2) == {eval(f'3 {OPS[i % 3]} 2')}"],
             "messages": [{"role": "user", "content": f"Write f{i}(a, b) returning a {OPS[i % 3]} b."},
                          {"role": "assistant", "content": f"```python\ndef f{i}(a, b):\n    return a {OPS[i % 3]} b\n```"}]}
            for i in range(5)]
    return write_jsonl(tmp_path / "problems.jsonl", rows)


def _cfg(tmp_path: Path, out: str) -> Any:
    task = {"name": "codetasks", "path": str(_problems(tmp_path)), "n_samples": 2, "temperature": 1.0,
            "max_new_tokens": 12, "timeout": 5}
    return validate({
        "model": {"name": "tiny-llama"}, "out": str(tmp_path / out),
        "data": {"max_length": 256, "packing": False},
        "method": {"name": "lora", "r": 2, "dropout": 0.0},
        "objective": {"name": "dpo", "beta": 0.5, "online": {"task": task, "every": 2, "problems_per_round": 2}},
        "train": {"lr": 1e-2, "max_steps": 4, "batch_size": 1, "save_every": 1, "warmup_ratio": 0, "tensorboard": False,
                  "mixed_precision": "no"},
        "eval": {"before": False, "after": False},
    })


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "adapter_model.safetensors")


def _stop_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """The loop asks `orphaned` once per step whether to stop (as when its launcher died): say yes after `steps`."""
    calls = [0]

    def orphaned(_: Any) -> bool:
        calls[0] += 1
        return calls[0] >= steps

    monkeypatch.setattr(loop, "orphaned", orphaned)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A: 4 steps straight. B: stopped after step 2 (a round boundary), resumed, stopped after step 3 (mid round 1),
    resumed to the end. The rounds each run sampled are counted."""
    from tunelab.evaluate import runner

    tmp = tmp_path_factory.mktemp("online")
    mp = pytest.MonkeyPatch()
    sampled: list[str] = []
    real = runner.run_task

    def counting(engine: Any, task: Any, out_dir: Path, **kw: Any) -> Any:
        sampled.append(f"{out_dir.parents[1].name}/{out_dir.name}")
        return real(engine, task, out_dir, **kw)

    mp.setattr(runner, "run_task", counting)
    try:
        res = {"a": loop.train(_cfg(tmp, "a"), quiet=True)}
        _stop_after(mp, 2)
        res["b1"] = loop.train(_cfg(tmp, "b"), quiet=True)
        _stop_after(mp, 1)
        res["b2"] = loop.train(_cfg(tmp, "b"), resume=True, quiet=True)
        mp.setattr(loop, "orphaned", lambda _: False)
        res["b3"] = loop.train(_cfg(tmp, "b"), resume=True, quiet=True)
    finally:
        mp.undo()
    return {**res, "sampled": sampled, "dir": tmp}


def test_rounds_are_drawn_logged_and_trained_on(runs: dict[str, Any]) -> None:
    a = runs["dir"] / "a"
    lines = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()]
    rounds = [ln for ln in lines if "rollout/round" in ln]
    assert [(r["step"], r["rollout/round"]) for r in rounds] == [(1, 0), (3, 1)]  # every 2 steps, from step 1
    for r in rounds:
        assert r["rollout/problems"] == 2 and r["rollout/samples"] == 4 and r["rollout/rows"] >= 1
        assert r["rollout/rows"] == r["rollout/pairs_from_samples"] + r["rollout/pairs_with_reference"]
    steps = [ln for ln in lines if "loss" in ln]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["loss"] > 0 for s in steps)
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1: the policy is the reference, -log sigma(0)
    assert all("rewards/accuracy" in s for s in steps)
    for r in (0, 1):
        d = a / "rollouts" / f"round-0000{r}"
        rows = [json.loads(ln) for ln in (d / "rows.jsonl").read_text().splitlines()]
        samples = [json.loads(ln) for ln in (d / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == json.loads((d / "stats.json").read_text())["rows"] and len(samples) == 4
        problems = {s["problem_id"] for s in samples}
        assert len(problems) == 2 and {row["problem_id"] for row in rows} <= problems
        for row in rows:  # the tiny model writes no passing code: the reference is chosen, a sample rejected
            assert row["chosen_source"] == "reference" and row["chosen"].startswith("```python\ndef f")
            assert row["rejected"] in {s["completion"] for s in samples if s["problem_id"] == row["problem_id"]}
    r0 = {s["problem_id"] for s in map(json.loads, (a / "rollouts/round-00000/samples.jsonl").read_text().splitlines())}
    r1 = {s["problem_id"] for s in map(json.loads, (a / "rollouts/round-00001/samples.jsonl").read_text().splitlines())}
    assert not r0 & r1  # a pass over the problems never repeats one
    assert runs["a"].summary["data"]["train_source"] == "online rollouts"
    report = (a / "report.html").read_text()
    assert 'alt="Rollouts plot"' in report and "could not render" not in report


def test_stopped_and_resumed_twice_equals_uninterrupted(runs: dict[str, Any]) -> None:
    assert runs["b1"].interrupted and runs["b1"].summary["step"] == 2
    assert runs["b2"].interrupted and runs["b2"].summary["step"] == 3
    assert not runs["b3"].interrupted and runs["b3"].summary["steps"] == 4
    a, b = _adapter(runs["dir"] / "a"), _adapter(runs["dir"] / "b")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # round 1 drawn again after the resume at step 2, from the checkpoint's weights: the same rows
    ra, rb = (runs["dir"] / run / "rollouts/round-00001/rows.jsonl" for run in ("a", "b"))
    assert ra.read_text() == rb.read_text()
    # A sampled rounds 0 and 1; B sampled round 0, stopped, sampled round 1 on resume, and the mid-round resume
    # read round 1 back instead of sampling it again
    assert runs["sampled"] == ["a/round-00000", "a/round-00001", "b/round-00000", "b/round-00001"]
