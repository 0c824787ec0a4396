"""Gradient accumulation: micro-batch losses normalised by the step's total label count (the loop's rule)
give the same loss and gradients as one big batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import chat_rows, write_jsonl

from tunelab.data.packing import collate
from tunelab.data.templating import Encoded
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.sft import SFTConfig


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _accumulate(model: Any, micro: list[dict[str, torch.Tensor]], per_micro_mean: bool = False) -> tuple[float, dict]:
    """What train/loop.py does for one optimizer step (optionally with the wrong per-micro normalisation)."""
    obj = OBJECTIVES.get("sft")(SFTConfig())
    model.zero_grad(set_to_none=True)
    num_items = sum(obj.num_items(b) for b in micro)
    total = 0.0
    for b in micro:
        loss, _ = obj.loss(model, b, obj.num_items(b) if per_micro_mean else num_items)
        if per_micro_mean:
            loss = loss / len(micro)
        loss.backward()
        total += loss.item()
    return total, _grads(model)


def _batches(samples: list[Encoded], pad: int, packed: bool) -> tuple[dict, list[dict]]:
    # rows with clearly different label counts, so a per-micro mean would weigh tokens unequally
    rows = [samples[:1], samples[1:4], samples[4:6]] if packed else [[s] for s in samples]
    split = [rows[:1], rows[1:]] if packed else [rows[:1], rows[1:3], rows[3:]]

    def mk(r: list[list[Encoded]]) -> dict:
        b = collate(r, pad, packed)
        b.pop("real_tokens")
        return b

    return mk(rows), [mk(r) for r in split]


@pytest.mark.parametrize("packed", [True, False])
def test_accumulated_equals_big_batch(model: Any, samples: list[Encoded], tok: Any, packed: bool) -> None:
    model.train()  # tiny-llama has no dropout, so train mode is deterministic
    big, micro = _batches(samples, tok.pad_token_id, packed)
    obj = OBJECTIVES.get("sft")(SFTConfig())
    assert sum(obj.num_items(b) for b in micro) == obj.num_items(big)

    loss_big, g_big = _accumulate(model, [big])
    loss_acc, g_acc = _accumulate(model, micro)
    assert loss_acc == pytest.approx(loss_big, abs=1e-6)
    assert g_acc.keys() == g_big.keys() and len(g_big) == len(list(model.parameters()))
    for name in g_big:
        assert torch.allclose(g_acc[name], g_big[name], atol=1e-6, rtol=0), name

    # the check can fail: the common mistake (mean per micro-batch, then average) gives other gradients
    loss_bad, g_bad = _accumulate(model, micro, per_micro_mean=True)
    assert abs(loss_bad - loss_big) > 1e-4
    assert max((g_bad[n] - g_big[n]).abs().max().item() for n in g_big) > 1e-5


def _train_adapter(tmp_path: Path, data: Path, bs: int, ga: int, tag: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from tunelab.config import validate
    from tunelab.train.loop import train

    cfg = validate({
        "model": {"name": "tiny-llama"}, "out": str(tmp_path / tag),
        "data": {"train": str(data), "valid_size": 0, "packing": False, "max_length": 256},
        "method": {"name": "lora", "r": 4, "dropout": 0.0},
        "train": {"lr": 1e-2, "max_steps": 2, "batch_size": bs, "grad_accum": ga, "max_grad_norm": None,
                  "warmup_ratio": 0, "save_every": 0, "tensorboard": False,
                  "mixed_precision": "no"},  # exactness check: bf16 rounding depends on batch shape
        "eval": {"before": False, "after": False},
    })
    train(cfg, quiet=True)
    return load_file(tmp_path / tag / "final" / "adapter_model.safetensors")


def test_loop_accumulation_equals_big_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real loop: batch 2 x accum 1 and batch 1 x accum 2 see the same rows and must end equal."""
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))  # unpacked, even count: same rows per step
    big = _train_adapter(tmp_path, data, 2, 1, "big")
    acc = _train_adapter(tmp_path, data, 1, 2, "acc")
    assert big.keys() == acc.keys() and big
    for k in big:
        assert torch.allclose(big[k], acc[k], atol=1e-6, rtol=0), k

    # negative control: an objective that normalises per micro-batch makes the same comparison fail
    from tunelab.objectives.sft import SFT

    real_loss = SFT.loss
    monkeypatch.setattr(SFT, "loss", lambda self, m, b, n, ref=None: real_loss(self, m, b, self.num_items(b)))
    wrong = _train_adapter(tmp_path, data, 1, 2, "wrong")
    assert max((wrong[k] - big[k]).abs().max().item() for k in big) > 1e-4
