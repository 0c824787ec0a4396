"""Online rollouts (train/rollouts.py, objectives/_online.py): which problems each round samples, the online
config's validation, and what an online run refuses before doing any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import write_jsonl

from tunelab.config import load_config, validate
from tunelab.errors import UserError
from tunelab.objectives import OBJECTIVES


def code_rows(n: int) -> list[dict[str, Any]]:
    """n small chat-format code problems with a fenced reference answer and tests (like builtin:code_instructions)."""
    ops = ["+", "-", "*"]
    return [{"id": f"p{i}", "entry_point": f"f{i}", "tests": [f"assert f{i}(3, 2) == {eval(f'3 {ops[i % 3]} 2')}"],
             "messages": [{"role": "user", "content": f"Write f{i}(a, b) returning a {ops[i % 3]} b."},
                          {"role": "assistant", "content": f"```python\ndef f{i}(a, b):\n    return a {ops[i % 3]} b\n```"}]}
            for i in range(n)]


def online_cfg(tmp_path: Path, problems: int = 5, **online: Any) -> dict[str, Any]:
    path = write_jsonl(tmp_path / "problems.jsonl", code_rows(problems))
    task = {"name": "codetasks", "path": str(path), "n_samples": 2, "temperature": 1.0, "max_new_tokens": 16, "timeout": 5}
    return {"name": "dpo", "online": {"task": task, "every": 2, "problems_per_round": 2, **online}}


def _rollouts(tmp_path: Path, **online: Any) -> Any:
    from tunelab.config import DataConfig
    from tunelab.models.presets import PRESETS
    from tunelab.train.rollouts import Rollouts

    cls = OBJECTIVES.get("dpo")
    obj = cls(cls.Config.model_validate(online_cfg(tmp_path, **online)))
    return Rollouts(obj, PRESETS["tiny-llama"].tokenizer(), DataConfig(), tmp_path / "run", batch_size=2, batch_tokens=None, seed=3)


def test_rounds_cover_each_pass_of_the_problems_once(tmp_path: Path) -> None:
    r = _rollouts(tmp_path)
    ids = [[p.id for p in r.problems_for(i)] for i in range(6)]
    assert [len(x) for x in ids] == [2, 2, 1, 2, 2, 1]  # 5 problems, 2 a round: a pass ends with a smaller round
    first, second = ids[0] + ids[1] + ids[2], ids[3] + ids[4] + ids[5]
    assert sorted(first) == sorted(second) == [f"p{i}" for i in range(5)]  # each pass: every problem exactly once
    assert first != second  # a new permutation per pass
    assert ids == [[p.id for p in r.problems_for(i)] for i in range(6)]  # seeded: a resumed run draws the same
    assert [r.round_of(s) for s in range(5)] == [0, 0, 1, 1, 2]
    assert r.round_dir(3) == tmp_path / "run" / "rollouts" / "round-00003"


def test_a_chat_row_answer_is_the_reference(tmp_path: Path) -> None:
    r = _rollouts(tmp_path)
    assert r.problems[1].reference == "def f1(a, b):\n    return a - b\n"


def test_online_config_validation(tmp_path: Path) -> None:
    cfg = online_cfg(tmp_path)
    parsed = OBJECTIVES.parse(cfg, "objective")
    assert parsed.online.every == 2 and parsed.online.task.name == "codetasks"  # type: ignore[attr-defined]
    assert (parsed.online.per_problem, parsed.online.reference_chosen) == (1, True)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="task 'generation' is not judged by execution"):
        OBJECTIVES.parse({**cfg, "online": {**cfg["online"], "task": {"name": "generation", "path": "x.jsonl"}}}, "objective")
    with pytest.raises(UserError, match=r"^objective\.online\.task\.name: "):
        OBJECTIVES.parse({**cfg, "online": {**cfg["online"], "task": {"name": "nope"}}}, "objective")
    with pytest.raises(UserError, match=r"unknown config key 'objective\.online\.task\.n_sample'; did you mean 'objective\.online\.task\.n_samples'"):
        validate({"objective": {**cfg, "online": {**cfg["online"], "task": {**cfg["online"]["task"], "n_sample": 3}}}})
    with pytest.raises(UserError, match=r"unknown config key 'objective\.online\.evry'"):
        validate({"objective": {**cfg, "online": {**cfg["online"], "evry": 3}}})
    # from YAML with an override, as a user writes it
    (tmp_path / "c.yaml").write_text(json.dumps({"objective": cfg, "train": {"max_steps": 4}}))
    assert load_config(tmp_path / "c.yaml", ["objective.online.every=3"]).objective.online.every == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"max_steps": None}}, "objective.online: set train.max_steps"),
        ({"data": {"train": "builtin:code_pairs"}}, "data.train is set, but objective.online draws the training rows"),
        ({"method": {"name": "full"}}, "objective.online needs the adapter-off reference"),
        ({"train": {"reference": "precomputed"}}, "but train.reference=precomputed"),
    ],
)
def test_online_runs_refuse_what_they_cannot_do(change: dict[str, Any], message: str, tmp_path: Path) -> None:
    from tunelab.train.loop import train

    base: dict[str, Any] = {
        "model": {"name": "tiny-llama"}, "out": str(tmp_path / "run"), "objective": online_cfg(tmp_path),
        "data": {"max_length": 256}, "method": {"name": "lora", "r": 2},
        "train": {"max_steps": 2, "tensorboard": False}, "eval": {"before": False, "after": False},
    }
    for key, sub in change.items():
        base[key] = {**base[key], **sub} if key != "method" else sub
    with pytest.raises(UserError, match=message):
        train(validate(base), quiet=True)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_shipped_tiny_online_config_validates() -> None:
    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny" / "dpo_online.yaml")
    assert cfg.objective.online.task.path == "builtin:code_instructions" and cfg.train.max_steps  # type: ignore[attr-defined]
    assert cfg.data.train is None
