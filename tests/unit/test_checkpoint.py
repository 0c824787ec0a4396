"""Checkpoints: exact round trip of params, optimizer, scheduler, RNG and loop state; atomicity; pruning."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tunelab.config import TrainConfig, validate
from tunelab.methods import METHODS
from tunelab.methods._base import trainable_state
from tunelab.objectives import OBJECTIVES
from tunelab.train.checkpoint import LoopState, list_checkpoints, load_checkpoint, save_checkpoint
from tunelab.train.optim import build_optimizer, build_scheduler, param_groups


def setup(make_model: Any, seed: int) -> tuple[Any, Any, Any]:
    torch.manual_seed(seed)  # LoRA's A init draws from the global RNG: different seeds, different weights
    cfg = validate({"method": {"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]}}).method
    model = METHODS.get("lora")(cfg).tune(make_model())
    tc = TrainConfig(lr=1e-2, warmup_ratio=0.2, scheduler="cosine")
    opt = build_optimizer(param_groups(model, tc.lr, 0.0), tc)
    return model, opt, build_scheduler(opt, tc, total_steps=10)


def steps(model: Any, opt: Any, sched: Any, batch: dict, n: int) -> None:
    obj = OBJECTIVES.get("sft")(OBJECTIVES.config_class("sft")())
    model.train()
    for _ in range(n):
        loss, _ = obj.loss(model, batch, obj.num_items(batch))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_round_trip_restores_everything(make_model: Any, sft_batch: dict, tmp_path: Path) -> None:
    model, opt, sched = setup(make_model, 0)
    steps(model, opt, sched, sft_batch, 3)
    state = LoopState(step=3, epoch=1, micro=2, tokens=1234, wall_s=5.5, val_loss_before=2.5, extra={"k": 1})
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    path = save_checkpoint(tmp_path / "ckpt", trainable_state(model), opt, sched, state, keep_last=2)
    assert path == tmp_path / "ckpt" / "step-3"
    expect_rng = (random.random(), float(np.random.rand()), torch.rand(3))
    # the continuation we expect to reproduce
    params_at_save = trainable(model)
    steps(model, opt, sched, sft_batch, 2)
    params_after = trainable(model)
    lr_after = sched.get_last_lr()

    model2, opt2, sched2 = setup(make_model, 99)
    assert any(not torch.equal(params_at_save[n], p) for n, p in trainable(model2).items())
    random.seed(0)
    torch.manual_seed(0)
    loaded = load_checkpoint(path, model2, opt2, sched2)
    assert loaded == state
    for n, p in trainable(model2).items():
        assert torch.equal(p, params_at_save[n]), n
    assert sched2.last_epoch == 3
    assert opt2.state_dict()["state"][0]["step"] == 3
    got_rng = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got_rng[0] == expect_rng[0] and got_rng[1] == expect_rng[1] and torch.equal(got_rng[2], expect_rng[2])

    # continuing from the checkpoint is bit-identical to continuing without it
    steps(model2, opt2, sched2, sft_batch, 2)
    for n, p in trainable(model2).items():
        assert torch.equal(p, params_after[n]), n
    assert sched2.get_last_lr() == lr_after


def test_optimizer_state_matters(make_model: Any, sft_batch: dict, tmp_path: Path) -> None:
    """Negative control: without the optimizer state, the continuation differs (so the check above can fail)."""
    model, opt, sched = setup(make_model, 0)
    steps(model, opt, sched, sft_batch, 3)
    path = save_checkpoint(tmp_path, trainable_state(model), opt, sched, LoopState(step=3), keep_last=1)
    steps(model, opt, sched, sft_batch, 1)
    want = trainable(model)
    model2, opt2, sched2 = setup(make_model, 0)
    load_checkpoint(path, model2, opt2, sched2)
    opt2.state.clear()  # lose Adam moments
    steps(model2, opt2, sched2, sft_batch, 1)
    assert any(not torch.equal(p, want[n]) for n, p in trainable(model2).items())


def test_checkpoint_holds_only_trainable_params(make_model: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model, opt, sched = setup(make_model, 0)
    path = save_checkpoint(tmp_path, trainable_state(model), opt, sched, LoopState(step=1), keep_last=1)
    saved = load_file(path / "trainable.safetensors")
    assert set(saved) == set(trainable(model)) and len(saved) == 2 * 2 * 2
    assert json.loads((path / "loop.json").read_text())["step"] == 1


def test_leftover_tmp_and_incomplete_dirs_are_ignored(make_model: Any, tmp_path: Path) -> None:
    model, opt, sched = setup(make_model, 0)
    root = tmp_path / "checkpoints"
    good = save_checkpoint(root, trainable_state(model), opt, sched, LoopState(step=4), keep_last=5)
    # what a kill -9 during a save leaves behind: a temp dir (even a complete-looking one)
    crashed = root / ".tmp-step-8-12345"
    crashed.mkdir()
    (crashed / "loop.json").write_text(json.dumps({"step": 8}))
    # and a step dir without its loop.json (not written by save_checkpoint, but never trusted)
    (root / "step-9").mkdir()
    assert list_checkpoints(root) == [good]
    # a later save with keep_last does not trip over the leftovers
    save_checkpoint(root, trainable_state(model), opt, sched, LoopState(step=12), keep_last=5)
    assert [p.name for p in list_checkpoints(root)] == ["step-4", "step-12"]
    assert not list(root.glob(".tmp-step-*"))


def test_keep_last_prunes_oldest(make_model: Any, tmp_path: Path) -> None:
    model, opt, sched = setup(make_model, 0)
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10):
        save_checkpoint(root, trainable_state(model), opt, sched, LoopState(step=step), keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-8", "step-10"]  # numeric, not lexical order
    assert sorted(p.name for p in root.iterdir()) == ["step-10", "step-8"]


def test_resave_same_step_replaces(make_model: Any, tmp_path: Path) -> None:
    model, opt, sched = setup(make_model, 0)
    save_checkpoint(tmp_path, trainable_state(model), opt, sched, LoopState(step=5, tokens=1), keep_last=3)
    save_checkpoint(tmp_path, trainable_state(model), opt, sched, LoopState(step=5, tokens=2), keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-5"]
    assert json.loads((tmp_path / "step-5" / "loop.json").read_text())["tokens"] == 2


def test_load_into_wrong_model_is_an_error(make_model: Any, tmp_path: Path) -> None:
    model, opt, sched = setup(make_model, 0)
    path = save_checkpoint(tmp_path, trainable_state(model), opt, sched, LoopState(step=1), keep_last=1)
    other = make_model()
    with pytest.raises(RuntimeError, match="not in the model"):
        load_checkpoint(path, other, opt, sched)


def test_resume_without_a_run_is_refused(tmp_path: Path) -> None:
    """--resume where no run exists must not silently start a new one (the user expects to continue)."""
    from tunelab.config import validate
    from tunelab.errors import UserError
    from tunelab.train.rundir import prepare

    cfg = validate({"out": str(tmp_path / "none")})
    with pytest.raises(UserError, match="nothing to resume"):
        prepare(cfg, resume=True, overwrite=False)
    assert not (tmp_path / "none").exists()
    run, resuming = prepare(cfg, resume=False, overwrite=False)
    assert not resuming and (run / "config.yaml").is_file()
    assert prepare(cfg, resume=True, overwrite=False) == (run, True)


def test_method_state_and_given_optimizer_state_round_trip(make_model: Any, tmp_path: Path) -> None:
    """A method's non-parameter state (any picklable values) comes back to its restore hook; a sharded run's
    gathered optimizer state is what gets written, not the local one; a caller's tensor loader gets the tensors."""
    model, opt, sched = setup(make_model, 0)
    extra = {"clusters": [[0, 1], [2]], "scale": np.float64(0.5), "ids": np.arange(3)}
    gathered = {"state": {}, "param_groups": [{**opt.state_dict()["param_groups"][0], "lr": 0.123}]}
    path = save_checkpoint(tmp_path / "a" / "b", trainable_state(model), opt, sched, LoopState(step=2), keep_last=1,
                           method_state=extra, optimizer_state=gathered)
    got: dict[str, Any] = {}
    load_checkpoint(path, model, opt, sched, method_state=lambda s: got.update(method=s),
                    load_tensors=lambda t: got.update(tensors=t), load_optimizer=lambda o: got.update(optimizer=o))
    assert got["method"]["clusters"] == [[0, 1], [2]] and got["method"]["scale"] == 0.5
    assert np.array_equal(got["method"]["ids"], np.arange(3))
    assert got["optimizer"]["param_groups"][0]["lr"] == 0.123
    assert set(got["tensors"]) == set(trainable_state(model)) and all(torch.equal(got["tensors"][k], v) for k, v in trainable_state(model).items())
    # no method state saved: the hook still runs, with an empty dict
    path = save_checkpoint(tmp_path / "c", trainable_state(model), opt, sched, LoopState(step=3), keep_last=1)
    load_checkpoint(path, model, opt, sched, method_state=lambda s: got.update(empty=s))
    assert got["empty"] == {}


def test_wrong_parameter_names_are_listed_three_at_most(make_model: Any, tmp_path: Path) -> None:
    model, opt, sched = setup(make_model, 0)
    names = sorted(trainable_state(model))
    path = save_checkpoint(tmp_path, {f"ghost{i}": torch.zeros(1) for i in range(5)}, opt, sched, LoopState(step=1), keep_last=1)
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(path, model, opt, sched)
    assert str(err.value) == f"{path}: checkpoint parameters not in the model: ['ghost0', 'ghost1', 'ghost2']"
    assert names  # the model itself has trainable parameters: the error is about the names, not an empty model


def test_resume_on_another_world_size_says_so_and_keeps_its_rng(make_model: Any, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Written by 1 process, resumed as rank 0 of 2: a note on stderr, and the saved RNG streams are NOT
    restored (they belonged to another process layout); on the same world size they are, silently."""
    from tunelab.train.dist import Dist

    model, opt, sched = setup(make_model, 0)
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path, trainable_state(model), opt, sched, LoopState(step=1), keep_last=1)
    saved_next = torch.rand(1)
    torch.manual_seed(99)
    here_next = torch.rand(1)
    torch.manual_seed(99)
    load_checkpoint(path, model, opt, sched, dist=Dist(rank=0, world=2))
    assert torch.equal(torch.rand(1), here_next)  # untouched
    err = capsys.readouterr().err
    assert err == (f"note: {path} was written by 1 process(es) and resumes on 2: the run continues from the same "
                   "step and data position, but is not bit-identical to an uninterrupted run\n")
    load_checkpoint(path, model, opt, sched, dist=Dist(rank=1, world=2))  # not the main process: no note
    assert capsys.readouterr().err == ""
    load_checkpoint(path, model, opt, sched)
    assert torch.equal(torch.rand(1), saved_next) and capsys.readouterr().err == ""


def test_cuda_rng_streams_are_saved_and_restored_where_cuda_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI has no GPU, so CUDA is faked: the state must carry the CUDA generators and give them back."""
    from tunelab.train import checkpoint as ck

    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu0-state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", calls.append)
    state = ck._rng_state()
    assert state["cuda"] == ["gpu0-state"]
    ck._set_rng_state(state)
    assert calls == [["gpu0-state"]]
    ck._set_rng_state({k: v for k, v in state.items() if k != "cuda"})  # written on a CPU machine: nothing to set
    assert calls == [["gpu0-state"]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ck._set_rng_state(state)  # written on a GPU, resumed without one: the CPU streams only
    assert calls == [["gpu0-state"]] and "cuda" not in ck._rng_state()
