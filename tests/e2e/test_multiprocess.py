"""Two processes (DDP over gloo on CPU, started by torchrun) against one, end to end through the CLI.

One module fixture runs everything, two launches at a time:
- S: one process with grad_accum=2; E: two processes with grad_accum=1, same config (LoRA dropout 0, per-block
  learning rates via train.layer_lr_decay, so several optimizer groups). Every step
  must see the same global batch: the same tokens, and losses and final adapter equal within float tolerance.
- D: two processes uninterrupted (dropout on, so each rank's RNG matters); K: the same run whose launcher is
  killed with SIGKILL after its first checkpoint. The orphaned workers notice, agree, checkpoint and stop; then
  `--resume` under two processes must end bit-identical to D.
- T: SIGTERM to rank 1 only: both ranks stop at the same step with one checkpoint, in bounded time; C: Ctrl-C
  (SIGINT to the launcher's whole process group) does the same.
- a run directory that already holds a run is refused once, by every rank, without a hang.
- F: two processes with sharded weights (train.fsdp, FSDP2 over gloo) against S as above, with an evaluation task
  before and after (run on the main process's gathered copy); FK: the same run stopped by SIGTERM to rank 0 after
  its first checkpoint, then resumed, must end bit-identical to F (sharded state gathered, written, scattered back).
Each check also reads `world_size: 2` from the metrics, so a launch that silently ran two independent single
processes (accelerate does that on CPU unless asked to join the group) fails here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from conftest import REPO, chat_rows, write_jsonl

BIN = Path(sys.executable).parent
CONFIG = str(REPO / "configs" / "tiny" / "sft_lora.yaml")
TIMEOUT = 300
STEPS = 12


class Launch:
    def __init__(self, cwd: Path, env: dict[str, str], nproc: int, *args: str) -> None:
        cmd = ([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m", "tunelab.cli"]
               if nproc > 1 else [str(BIN / "tunelab")])
        # a session of its own, so cleanup can kill the launcher and every worker it started
        self.p = subprocess.Popen([*cmd, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        self.out = self.err = ""

    def workers(self) -> dict[int, psutil.Process]:
        """rank -> worker process (torchrun's children)."""
        found = {}
        for child in psutil.Process(self.p.pid).children():
            try:
                found[int(child.environ()["RANK"])] = child
            except (psutil.Error, KeyError):
                continue
        return found

    def wait(self, timeout: float = TIMEOUT) -> Launch:
        try:
            self.out, self.err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.out, self.err = self.p.communicate()
            pytest.fail(f"launch timed out (hang?)\n{self.err[-3000:]}")
        return self

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)


def poll(cond: Any, launch: Launch, what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if launch.p.poll() is not None:
            pytest.fail(f"launch ended (rc={launch.p.returncode}) before {what}: {launch.p.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_gone(procs: list[psutil.Process], timeout: float) -> float:
    """Seconds until every process has exited; fails past `timeout`."""
    t0 = time.monotonic()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"{len(alive)} worker(s) still running {timeout}s after the launcher died"
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cwd = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(cwd / "train.jsonl", chat_rows(30))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    base = [f"data.train={data}", "train.batch_size=1", f"train.max_steps={STEPS}", "train.save_every=4", "--quiet"]
    res: dict[str, Any] = {"cwd": cwd}
    started: list[Launch] = []

    def launch(nproc: int, out: str, *extra: str) -> Launch:
        started.append(Launch(cwd, env, nproc, "train", CONFIG, "--out", out, *base, *extra))
        return started[-1]

    try:
        # per-block learning rates (several optimizer groups) must survive the DDP wrapper and FSDP2's sharding
        s = launch(1, "runs/s", "method.dropout=0", "train.grad_accum=2", "train.layer_lr_decay=0.8")
        e = launch(2, "runs/e", "method.dropout=0", "train.layer_lr_decay=0.8")
        res["s"], res["e"] = s.wait(), e.wait()

        d = launch(2, "runs/d")
        k = launch(2, "runs/k")
        poll(lambda: any((cwd / "runs/k").glob("checkpoints/step-*/loop.json")), k, "run k's first checkpoint")
        workers = list(k.workers().values())
        k.p.send_signal(signal.SIGKILL)  # the launcher only: its workers are orphaned
        k.wait()
        res["k_workers"] = len(workers)
        res["k_gone_s"] = wait_gone(workers, 60)
        res["k_after_kill"] = sorted(p.parent.name for p in (cwd / "runs/k").glob("checkpoints/step-*/loop.json"))
        res["k_final_after_kill"] = (cwd / "runs/k/final").exists()
        res["d"] = d.wait()
        res["k"] = launch(2, "runs/k", "--resume").wait()

        t = launch(2, "runs/t", "train.max_steps=10000", "train.save_every=0")
        poll(lambda: '"loss"' in ((cwd / "runs/t/metrics.jsonl").read_text() if (cwd / "runs/t/metrics.jsonl").is_file() else ""),
             t, "run t's first step")
        ranks = t.workers()
        res["t_ranks"] = sorted(ranks)
        t0 = time.monotonic()
        ranks[1].send_signal(signal.SIGTERM)
        res["t"] = t.wait(timeout=120)
        res["t_stop_s"] = time.monotonic() - t0
        res["t_left"] = [p.pid for p in ranks.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

        c = launch(2, "runs/c", "train.max_steps=10000", "train.save_every=0")  # Ctrl-C: SIGINT to the whole group
        poll(lambda: '"loss"' in ((cwd / "runs/c/metrics.jsonl").read_text() if (cwd / "runs/c/metrics.jsonl").is_file() else ""),
             c, "run c's first step")
        c_ranks = list(c.workers().values())
        t0 = time.monotonic()
        os.killpg(c.p.pid, signal.SIGINT)
        res["c"] = c.wait(timeout=120)
        res["c_gone_s"] = wait_gone(c_ranks, 60) + time.monotonic() - t0

        t0 = time.monotonic()
        res["exists"] = launch(2, "runs/e").wait(timeout=120)
        res["exists_s"] = time.monotonic() - t0

        qa = write_jsonl(cwd / "qa.jsonl", [{"prompt": "Say hi.", "reference": "hi"}, {"prompt": "2+2?", "reference": "4"}])
        fsdp = ["method.dropout=0", "train.fsdp=true", "train.layer_lr_decay=0.8"]
        evals = ["eval.before=true", "eval.after=true",
                 f"eval.tasks=[{{name: generation, path: '{qa}', max_new_tokens: 4, prompt_mode: completion}}]"]
        f = launch(2, "runs/f", *fsdp, *evals)
        fk = launch(2, "runs/fk", *fsdp)
        poll(lambda: any((cwd / "runs/fk").glob("checkpoints/step-*/loop.json")), fk, "run fk's first checkpoint")
        fk.workers()[0].send_signal(signal.SIGTERM)
        res["fk_stopped"] = fk.wait(timeout=120)
        res["fk_after_stop"] = sorted(p.parent.name for p in (cwd / "runs/fk").glob("checkpoints/step-*/loop.json"))
        res["f"] = f.wait()
        res["fk"] = launch(2, "runs/fk", "--resume", *fsdp).wait()
    finally:
        for x in started:
            x.kill()
    return res


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def steps(run: Path) -> list[dict[str, Any]]:
    return [r for r in metrics(run) if "loss" in r]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "adapter_model.safetensors")


def test_two_processes_really_ran(runs: dict) -> None:
    for name in ("e", "d", "k"):
        assert runs[name].p.returncode == 0, runs[name].err[-3000:]
        rows = steps(runs["cwd"] / f"runs/{name}")
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one row per step, not one per rank
        assert {r.get("world_size") for r in rows} == {2}
    assert "world_size" not in steps(runs["cwd"] / "runs/s")[0]
    assert runs["t_ranks"] == [0, 1]


def test_two_processes_equal_one_with_doubled_accumulation(runs: dict) -> None:
    assert runs["s"].p.returncode == 0, runs["s"].err[-3000:]
    one, two = steps(runs["cwd"] / "runs/s"), steps(runs["cwd"] / "runs/e")
    # the same global batches: identical token counts and data positions, step by step
    assert [(r["tokens"], r["epoch"]) for r in one] == [(r["tokens"], r["epoch"]) for r in two]
    assert one[-1]["epoch"] > 1  # the steps straddle epoch boundaries
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), a["step"]
    va = [r["val_loss"] for r in metrics(runs["cwd"] / "runs/s") if "val_loss" in r]
    vb = [r["val_loss"] for r in metrics(runs["cwd"] / "runs/e") if "val_loss" in r]
    assert va == pytest.approx(vb, rel=1e-5) and len(va) == 2
    a, b = adapter(runs["cwd"] / "runs/s"), adapter(runs["cwd"] / "runs/e")
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    norm = sum((a[k] ** 2).sum() for k in a) ** 0.5
    # Adam's normalised update turns summation-order noise in near-zero gradients into up to lr-sized steps for a
    # few elements (measured 3e-4 relative); a wrong batch split or loss scale differs by orders of magnitude more
    assert diff / norm < 3e-3


def test_orphaned_workers_checkpoint_and_stop(runs: dict) -> None:
    assert runs["k_workers"] == 2
    assert runs["k_gone_s"] < 60
    assert runs["k_after_kill"] and not runs["k_final_after_kill"]


def test_resume_under_two_processes_is_bit_identical(runs: dict) -> None:
    k, cwd = runs["k"], runs["cwd"]
    assert k.p.returncode == 0, k.err[-3000:]
    ck = cwd / "runs/k/checkpoints"
    assert {p.name for p in next(iter(sorted(ck.glob("step-*")))).iterdir()} >= {"rng-0.pt", "rng-1.pt"}
    want, got = adapter(cwd / "runs/d"), adapter(cwd / "runs/k")
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert {r["step"]: r["loss"] for r in steps(cwd / "runs/k")} == {r["step"]: r["loss"] for r in steps(cwd / "runs/d")}


def test_sigterm_to_one_rank_stops_all_at_one_step(runs: dict) -> None:
    t, run = runs["t"], runs["cwd"] / "runs/t"
    assert runs["t_stop_s"] < 60 and not runs["t_left"]
    ckpts = list(run.glob("checkpoints/step-*/loop.json"))
    assert len(ckpts) == 1, ckpts
    step = json.loads(ckpts[0].read_text())["step"]
    assert json.loads(ckpts[0].read_text())["world_size"] == 2
    assert {p.name for p in ckpts[0].parent.iterdir()} >= {"rng-0.pt", "rng-1.pt"}
    assert f"stopped at step {step}" in t.out and t.out.count("stopped at step") == 1  # the main process reports once
    assert not (run / "final").exists()


def test_ctrl_c_stops_every_rank_with_one_checkpoint(runs: dict) -> None:
    c, run = runs["c"], runs["cwd"] / "runs/c"
    assert runs["c_gone_s"] < 60
    ckpts = list(run.glob("checkpoints/step-*/loop.json"))
    assert len(ckpts) == 1 and json.loads(ckpts[0].read_text())["world_size"] == 2
    step = json.loads(ckpts[0].read_text())["step"]
    assert c.out.count(f"stopped at step {step}") == 1 and not (run / "final").exists()


def test_existing_run_is_refused_by_every_rank(runs: dict) -> None:
    x = runs["exists"]
    assert x.p.returncode != 0 and runs["exists_s"] < 120
    assert x.err.count("already holds a run") == 1  # said once, by the main process
    assert (runs["cwd"] / "runs/e/final").is_dir()  # nothing deleted


def test_sharded_two_processes_equal_one(runs: dict) -> None:
    f, cwd = runs["f"], runs["cwd"]
    assert f.p.returncode == 0, f.err[-3000:]
    one, two = steps(cwd / "runs/s"), steps(cwd / "runs/f")
    assert {r.get("world_size") for r in two} == {2}
    assert [(r["tokens"], r["epoch"]) for r in one] == [(r["tokens"], r["epoch"]) for r in two]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), a["step"]
    a, b = adapter(cwd / "runs/s"), adapter(cwd / "runs/f")
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    norm = sum((a[k] ** 2).sum() for k in a) ** 0.5
    assert diff / norm < 3e-3  # as for DDP: Adam's normalisation of near-zero gradients (measured 1e-3)
    for label in ("before", "after"):  # evaluated on the main process's gathered, unsharded copy
        summary = json.loads((cwd / f"runs/f/eval/generation/{label}/summary.json").read_text())
        assert summary["metrics"] and summary["n_problems"] == 2


def test_sharded_resume_is_bit_identical(runs: dict) -> None:
    stopped, fk, cwd = runs["fk_stopped"], runs["fk"], runs["cwd"]
    assert stopped.p.returncode != 0 and runs["fk_after_stop"], stopped.err[-3000:]
    assert fk.p.returncode == 0, fk.err[-3000:]
    # the optimizer state was gathered from shards: keyed by parameter name, not by a replicated optimizer's index
    blob = torch.load(next((cwd / "runs/fk/checkpoints").glob("step-*/state.pt")), weights_only=False)
    assert blob["optimizer"]["state"] and all(isinstance(k, str) for k in blob["optimizer"]["state"])
    want, got = adapter(cwd / "runs/f"), adapter(cwd / "runs/fk")
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert {r["step"]: r["loss"] for r in steps(cwd / "runs/fk")} == {r["step"]: r["loss"] for r in steps(cwd / "runs/f")}
