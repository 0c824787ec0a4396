"""Every objective end to end on the tiny model, and DPO's resume and reference paths.

- each `configs/tiny/<objective>.yaml` trains through the real loop (data shape from the objective, its
  metrics logged per step);
- DPO killed with SIGKILL after its first checkpoint, then `--resume`, ends on the uninterrupted run's adapter
  bit for bit, with the adapter-off reference and with the precomputed one;
- the two reference providers agree; a malformed pairwise file is one line, exit 2, no run dir left behind.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, write_jsonl
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.objectives import OBJECTIVES
from tunelab.train.loop import train

TUNELAB = str(Path(sys.executable).parent / "tunelab")
TINY = sorted(p for p in (REPO / "configs" / "tiny").glob("*.yaml") if p.stem in OBJECTIVES.names())
# what each objective must log besides the loss (its own metrics reach metrics.jsonl)
EXPECTED = {"dpo": "rewards/accuracy", "simpo": "rewards/margin", "orpo": "log_odds_ratio", "asft": "rewards/chosen",
            "kto": "kl", "rrhf": "rank", "multi_target": "nll/target_1", "masked_thought": "mask_rate", "ift": None, "sft": None,
            "distill": "kl", "leti": None}


def test_every_objective_has_a_tiny_config() -> None:
    assert {p.stem for p in TINY} == set(OBJECTIVES.names()) - {"sft"}


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_tiny_config_trains(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path, ["train.max_steps=4", "train.save_every=0", f"out={tmp_path / 'run'}"])
    result = train(cfg, quiet=True)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in steps)
    key = EXPECTED[path.stem]
    if key:
        assert all(key in r and math.isfinite(r[key]) for r in steps), key
    assert result.summary["data"]["batch_format"] == OBJECTIVES.get(path.stem).batch_format
    assert math.isfinite(result.summary["val_loss_before"]) and math.isfinite(result.summary["val_loss_after"])
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ DPO resume

ARGS = ["train.max_steps=12", "train.save_every=4", "train.batch_size=1", "data.limit=24", "--quiet"]


def _run(cwd: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([TUNELAB, "train", str(REPO / "configs/tiny/dpo.yaml"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(p: subprocess.Popen) -> tuple[int, str]:
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def _kill_after_first_checkpoint(p: subprocess.Popen, run: Path) -> None:
    end = time.monotonic() + 300
    while not any(run.glob("checkpoints/step-*/loop.json")):
        assert p.poll() is None, p.stderr.read()[-2000:]  # type: ignore[union-attr]
        assert time.monotonic() < end, "no checkpoint in time"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cwd = tmp_path_factory.mktemp("dpo")
    res: dict[str, Any] = {"cwd": cwd}
    for ref in ("adapter", "precomputed"):
        extra = [*ARGS, f"train.reference={ref}"]
        a = _run(cwd, "--out", f"a-{ref}", *extra)
        b = _run(cwd, "--out", f"b-{ref}", *extra)
        _kill_after_first_checkpoint(b, cwd / f"b-{ref}")
        res[f"b-{ref}-killed"] = sorted((p.parent.name for p in (cwd / f"b-{ref}").glob("checkpoints/step-*/loop.json")), key=lambda n: int(n.split("-")[1]))
        res[f"b-{ref}"] = _wait(_run(cwd, "--out", f"b-{ref}", "--resume", *extra))
        res[f"a-{ref}"] = _wait(a)
    return res


@pytest.mark.parametrize("ref", ["adapter", "precomputed"])
def test_dpo_kill9_then_resume_is_bit_identical(dpo_runs: dict[str, Any], ref: str) -> None:
    cwd = dpo_runs["cwd"]
    assert dpo_runs[f"a-{ref}"][0] == 0, dpo_runs[f"a-{ref}"][1][-2000:]
    assert dpo_runs[f"b-{ref}"][0] == 0, dpo_runs[f"b-{ref}"][1][-2000:]
    assert dpo_runs[f"b-{ref}-killed"][-1] != "step-12"  # killed mid-run, with a checkpoint to resume from
    a, b = _adapter(cwd / f"a-{ref}"), _adapter(cwd / f"b-{ref}")
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(ln) for ln in (cwd / f"b-{ref}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # no step lost or repeated


def test_reference_providers_agree(dpo_runs: dict[str, Any]) -> None:
    """Adapter-off and precomputed references give the same training, up to autocast rounding."""
    cwd = dpo_runs["cwd"]
    rows = {ref: [json.loads(ln) for ln in (cwd / f"a-{ref}" / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
            for ref in ("adapter", "precomputed")}
    assert rows["adapter"][0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    for x, y in zip(rows["adapter"], rows["precomputed"], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=2e-3)


def test_malformed_pairwise_file_is_one_line_and_leaves_no_run(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
    rc, err = _wait(_run(tmp_path, "--out", "bad", f"data.train={data}", "--quiet"))
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert rc == 2 and "Traceback" not in err
    assert lines[-1] == f"error: {data}:2: missing field 'rejected' for pairwise data (rows need: prompt, chosen, rejected; found: chosen, prompt)"
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------ resume, every objective


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "adapter_model.safetensors")


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_resume_from_a_checkpoint_is_bit_exact(path: Path, tmp_path: Path) -> None:
    """Resume from the mid-run checkpoint of a finished run ends on its weights bit for bit; resuming from a
    perturbed copy of that checkpoint does not (so the resumed run really starts from the checkpoint)."""
    import shutil

    import yaml
    from safetensors.torch import save_file

    over = ["train.max_steps=6", "train.save_every=3", "data.limit=40", "train.mixed_precision=no"]
    a = tmp_path / "a"
    train(load_config(path, [*over, f"out={a}"]), quiet=True)
    want = _final(a)
    for name, perturb in (("b", False), ("c", True)):
        run = tmp_path / name
        shutil.copytree(a, run)
        shutil.rmtree(run / "final")
        shutil.rmtree(run / "checkpoints" / "step-6")
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["out"] = str(run)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        if perturb:
            f = run / "checkpoints" / "step-3" / "trainable.safetensors"
            t = load_file(f)
            save_file({k: v + 1e-3 for k, v in t.items()}, f)
        train(load_config(path, [*over, f"out={run}"]), resume=True, quiet=True)
        got = _final(run)
        steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
        assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-3 kept from before, 4-6 trained by the resumed run
        same = all(torch.equal(want[k], got[k]) for k in want)
        assert same is not perturb, f"{name}: resumed weights {'differ' if not perturb else 'match despite the perturbed checkpoint'}"


def test_grad_accum_note_only_for_objectives_that_are_not_invariant(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    over = ["train.max_steps=1", "train.grad_accum=2", "data.limit=12", "train.save_every=0"]
    for name in ("kto", "dpo"):
        train(load_config(REPO / "configs" / "tiny" / f"{name}.yaml", [*over, f"out={tmp_path / name}"]))
        err = capsys.readouterr().err
        assert ("per-micro-batch statistic" in err) is (not OBJECTIVES.get(name).accumulation_invariant), name
