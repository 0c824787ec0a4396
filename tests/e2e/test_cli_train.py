"""`tunelab` CLI end to end, in subprocesses, cwd = a temp dir.

One module-scoped fixture runs everything once, two processes at a time (2 cores): run A to the end; run B
killed with SIGKILL after its first checkpoint, then resumed (its final adapter must equal A's bit for bit);
run C interrupted with SIGINT; and the quick user-mistake commands. The tests then only read the results.

The training data is a small temp JSONL (not the 200-row builtin set) with `train.batch_size=1`, so a step is
cheap yet an epoch spans several micro-batches, and steps straddle epoch boundaries: the resume check covers
the data position, the RNG (LoRA dropout) and the optimizer/scheduler state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, chat_rows, write_jsonl

TUNELAB = str(Path(sys.executable).parent / "tunelab")
CONFIG = str(REPO / "configs" / "tiny" / "sft_lora.yaml")
TRAIN_ARGS = ["train.max_steps=30", "train.batch_size=1"]  # data.train is added per run
TIMEOUT = 300


@dataclass
class Done:
    args: list[str]
    rc: int
    out: str
    err: str
    seconds: float


class Proc:
    def __init__(self, cwd: Path, env: dict[str, str], *args: str) -> None:
        self.args = list(args)
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(
            [TUNELAB, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def wait(self) -> Done:
        try:
            out, err = self.p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
            pytest.fail(f"tunelab {' '.join(self.args)} timed out\n{err[-2000:]}")
        return Done(self.args, self.p.returncode, out, err, time.monotonic() - self.t0)


def poll(cond: Any, proc: Proc, what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.p.poll() is not None:
            pytest.fail(f"process ended (rc={proc.p.returncode}) before {what}: {proc.p.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        if time.monotonic() > end:
            proc.p.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def has_checkpoint(run: Path) -> bool:
    return any(run.glob("checkpoints/step-*/loop.json"))


def has_trained_step(run: Path) -> bool:
    m = run / "metrics.jsonl"
    return m.is_file() and '"loss"' in m.read_text()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cwd = tmp_path_factory.mktemp("e2e")
    data = write_jsonl(cwd / "train.jsonl", chat_rows(30))
    broken = write_jsonl(cwd / "broken.jsonl", [*chat_rows(6), '{"messages": [', *chat_rows(3)])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    targs = [*TRAIN_ARGS, f"data.train={data}", "--quiet"]
    res: dict[str, Any] = {"cwd": cwd, "data": data, "broken_path": broken}
    started: list[Proc] = []

    def run(*args: str) -> Proc:
        started.append(Proc(cwd, env, *args))
        return started[-1]

    try:
        _schedule(res, cwd, run, targs, broken)
    finally:  # a failed wait or poll must not leave trainings running
        for p in started:
            if p.p.poll() is None:
                p.p.kill()
                p.p.wait()
    return res


def _schedule(res: dict[str, Any], cwd: Path, run: Any, targs: list[str], broken: Path) -> None:
    # wave 1: A and B train side by side; B dies by SIGKILL once its first checkpoint is complete
    a = run("train", CONFIG, "--out", "runs/a", *targs)
    b = run("train", CONFIG, "--out", "runs/b", *targs)
    poll(lambda: has_checkpoint(cwd / "runs/b"), b, "run b's first checkpoint")
    b.p.send_signal(signal.SIGKILL)
    res["b_killed"] = b.wait()
    res["b_after_kill"] = {
        "checkpoints": sorted(p.parent.name for p in (cwd / "runs/b").glob("checkpoints/step-*/loop.json")),
        "final": (cwd / "runs/b/final").exists(),
    }
    # quick commands that need no finished run, while A is still training
    quick = {  # waited on in this order; hub_offline first so its measured time is its own
        "hub_offline": run("train", CONFIG, "--out", "runs/hub", *targs, "model.name=someorg/somemodel"),
        "config_rr": run("config", CONFIG, "method.rr=4"),
        "list_methods": run("list", "methods"),
    }
    res.update({k: p.wait() for k, p in quick.items()})
    res["a"] = a.wait()

    # wave 2: resume B; interrupt C with SIGINT once it has trained a step
    b2 = run("train", CONFIG, "--out", "runs/b", "--resume", *targs)
    c = run("train", CONFIG, "--out", "runs/c", *targs, "train.max_steps=10000", "train.save_every=0")
    poll(lambda: has_trained_step(cwd / "runs/c"), c, "run c's first step")
    c.p.send_signal(signal.SIGINT)
    res["c"] = c.wait()
    res["b"] = b2.wait()

    # wave 3: mistakes against the finished run, a broken data file, the merged export
    wave3 = {
        "exists": run("train", CONFIG, "--out", "runs/a", *targs),
        "changed": run("train", CONFIG, "--out", "runs/a", "--resume", *targs, "train.lr=0.5"),
        "broken": run("train", CONFIG, "--out", "runs/broken", *TRAIN_ARGS, f"data.train={broken}", "--quiet"),
        "export": run("export", "runs/a", "--merge"),
    }
    res.update({k: p.wait() for k, p in wave3.items()})


def error_line(done: Done) -> str:
    """The single `error:` line of a failed command; no traceback."""
    assert "Traceback" not in done.err, done.err
    lines = [ln for ln in done.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, done.err
    return lines[0]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "adapter_model.safetensors")


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# --------------------------------------------------------------------------------------------- training runs


def test_train_completes(e2e: dict) -> None:
    a, run = e2e["a"], e2e["cwd"] / "runs/a"
    assert a.rc == 0, a.err[-3000:]
    assert "Traceback" not in a.err
    assert (run / "final" / "adapter_config.json").is_file()
    assert (run / "final" / "tunelab.json").is_file()
    assert (run / "final" / "tokenizer.json").is_file()
    assert (run / "config.yaml").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["val_loss_after"] < summary["val_loss_before"]  # it learned something
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-20", "step-30"]  # keep_last 2


def test_metrics_and_report_exist(e2e: dict) -> None:
    run = e2e["cwd"] / "runs/a"
    rows = metrics(run)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 31))
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows if "loss" in r)
    assert any("val_loss" in r for r in rows)
    html = (run / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html>") and "</html>" in html


def test_kill9_then_resume_is_bit_identical(e2e: dict) -> None:
    killed = e2e["b_killed"]
    assert killed.rc == -signal.SIGKILL
    assert e2e["b_after_kill"]["checkpoints"] and not e2e["b_after_kill"]["final"]
    b = e2e["b"]
    assert b.rc == 0, b.err[-3000:]
    want, got = adapter(e2e["cwd"] / "runs/a"), adapter(e2e["cwd"] / "runs/b")
    assert want.keys() == got.keys() and len(want) > 0
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # the metrics log continues seamlessly: each step once, same losses as the uninterrupted run
    la = {r["step"]: r["loss"] for r in metrics(e2e["cwd"] / "runs/a") if "loss" in r}
    rows_b = [r for r in metrics(e2e["cwd"] / "runs/b") if "loss" in r]
    assert [r["step"] for r in rows_b] == list(range(1, 31))
    assert {r["step"]: r["loss"] for r in rows_b} == la


def test_sigint_saves_a_checkpoint_and_exits_130(e2e: dict) -> None:
    c, run = e2e["c"], e2e["cwd"] / "runs/c"
    assert c.rc == 130, c.err[-3000:]
    assert "Traceback" not in c.err
    ckpts = list(run.glob("checkpoints/step-*/loop.json"))
    assert len(ckpts) == 1
    step = json.loads(ckpts[0].read_text())["step"]
    assert 1 <= step < 10000
    assert f"stopped at step {step}" in c.out and "--resume" in c.out
    assert not (run / "final").exists()


# --------------------------------------------------------------------------------------------- user mistakes


def test_existing_run_dir_needs_resume_or_overwrite(e2e: dict) -> None:
    d = e2e["exists"]
    assert d.rc == 2
    line = error_line(d)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line


def test_resume_with_changed_config_is_refused(e2e: dict) -> None:
    d = e2e["changed"]
    assert d.rc == 2
    line = error_line(d)
    assert "cannot resume with a changed config" in line and "train.lr" in line


def test_config_unknown_key(e2e: dict) -> None:
    d = e2e["config_rr"]
    assert d.rc == 2
    assert d.err.strip().count("\n") == 0, d.err
    line = error_line(d)
    assert "method.rr" in line and "did you mean 'method.r'" in line


def test_broken_jsonl_line_7(e2e: dict) -> None:
    d = e2e["broken"]
    assert d.rc == 2
    line = error_line(d)
    assert f"{e2e['broken_path']}:7" in line and "line 7" in line


def test_hub_id_offline_fails_fast(e2e: dict) -> None:
    d = e2e["hub_offline"]
    assert d.rc == 2
    line = error_line(d)
    assert "someorg/somemodel" in line and "offline" in line
    assert d.seconds < 120  # no network waits or retries (generous: it ran beside two trainings)


def test_list_methods(e2e: dict) -> None:
    d = e2e["list_methods"]
    assert d.rc == 0, d.err
    names = {ln.split(":")[0] for ln in d.out.splitlines() if ln and not ln.startswith(" ")}
    assert {"full", "freeze", "lora", "peft"} <= names
    types = next(ln for ln in d.out.splitlines() if "peft types:" in ln)
    assert {"ia3", "loha", "lokr", "vera", "prompt_tuning", "lora"} <= {t.strip() for t in types.split(":", 1)[1].split(",")}


# --------------------------------------------------------------------------------------------- outputs load elsewhere


@pytest.fixture(scope="module")
def base_and_tok() -> tuple[Any, Any]:
    from tunelab.config import ModelConfig
    from tunelab.models import load_model

    return load_model(ModelConfig(name="tiny-llama", dtype="float32"))


def test_final_adapter_loads_with_peft_and_generates(e2e: dict, base_and_tok: tuple) -> None:
    from peft import PeftModel

    from tunelab.models.presets import PRESETS

    base_for_peft = PRESETS["tiny-llama"].model().eval()
    model = PeftModel.from_pretrained(base_for_peft, str(e2e["cwd"] / "runs/a/final")).eval()
    base, tok = base_and_tok
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write add(a, b)."}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        tuned_logits = model(**prompt).logits
        base_logits = base.eval()(**prompt).logits
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert (tuned_logits - base_logits).abs().max() > 1e-4  # the adapter is trained, not the identity


def test_export_merge_loads_with_transformers(e2e: dict, base_and_tok: tuple) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.presets import PRESETS

    d = e2e["export"]
    assert d.rc == 0, d.err[-3000:]
    merged_dir = e2e["cwd"] / "runs/a/merged"
    assert str(merged_dir.relative_to(e2e["cwd"])) in d.out
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    ref = PeftModel.from_pretrained(PRESETS["tiny-llama"].model().eval(), str(e2e["cwd"] / "runs/a/final")).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Reverse a string."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        got, want = merged(**ids).logits, ref(**ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    assert not any("lora" in n for n, _ in merged.named_parameters())
