"""The shared log-prob helpers (objectives/_logprobs.py) on the tiny model: the decoder + head fast path and when
it must not be taken, the chunked head, running inside a parallel wrapper, and per-sequence sums by hand."""

from __future__ import annotations

import functools
from types import MethodType, SimpleNamespace
from typing import Any

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from tunelab.data.templating import IGNORE
from tunelab.objectives import _logprobs
from tunelab.objectives._logprobs import (
    _plain_lm,
    chunked_head_logprobs,
    label_logits,
    label_token_logprobs,
    model_inputs,
    reduce_by_sequence,
    sequence_logps,
    through_wrapper,
    token_logprobs,
    unwrap,
)


def _full_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own forward over every position, then the labelled ones: what the fast path must equal."""
    sel = batch["labels"] != IGNORE
    with torch.no_grad():
        logits = model(**model_inputs(batch), use_cache=False).logits
    return logits[sel], batch["labels"][sel]


def _forbid_forward(model: Any) -> None:
    def forward(**_: Any) -> Any:
        raise AssertionError("the model's own forward ran (computes the head over every position)")

    model.forward = forward


def test_model_inputs_are_exactly_the_model_arguments(packed_batch: dict[str, torch.Tensor]) -> None:
    batch = {**packed_batch, "attention_mask": torch.ones_like(packed_batch["input_ids"])}
    assert set(batch) > {"input_ids", "attention_mask", "position_ids"}  # labels, seq_index, num_seqs... too
    got = model_inputs(batch)
    assert set(got) == {"input_ids", "attention_mask", "position_ids"}
    assert all(got[k] is batch[k] for k in got)


@pytest.mark.parametrize("name", ["sft_batch", "packed_batch"])
def test_fast_path_equals_the_full_forward_without_calling_it(name: str, make_model: Any, request: pytest.FixtureRequest) -> None:
    batch = request.getfixturevalue(name)
    model = make_model()
    want_logits, want_labels = _full_logits(model, batch)
    _forbid_forward(model)
    with torch.no_grad():
        logits, labels = label_logits(model, batch)
        lp, lp_labels = label_token_logprobs(model, batch)
        seqs = sequence_logps(model, batch)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    assert torch.equal(labels, want_labels) and torch.equal(lp_labels, want_labels)
    want_lp = token_logprobs(want_logits, want_labels)
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-5)
    # per sequence, by the batch's seq_index: a plain loop over the labelled positions
    seq = batch["seq_index"][batch["labels"] != IGNORE].tolist()
    sums, counts = [0.0] * int(batch["num_seqs"]), [0] * int(batch["num_seqs"])
    for s, v in zip(seq, want_lp.tolist(), strict=True):
        sums[s] += v
        counts[s] += 1
    assert seqs.count.tolist() == counts and min(counts) > 0
    assert seqs.sum.tolist() == pytest.approx(sums, abs=1e-4)


def _spy_forward(model: Any, virtual: int) -> list[dict[str, Any]]:
    """Record the model's forward calls; prepend `virtual` junk positions to its logits (as prompt tuning does)."""
    calls: list[dict[str, Any]] = []
    real = model.forward

    def forward(**kwargs: Any) -> Any:
        calls.append(kwargs)
        out = real(**kwargs)
        junk = torch.full((out.logits.shape[0], virtual, out.logits.shape[2]), 1e4)
        return SimpleNamespace(logits=torch.cat([junk, out.logits], dim=1))

    model.forward = forward
    return calls


@pytest.mark.parametrize("why", ["softcapping", "logit_scale", "prompt_learning", "no_output_embeddings"])
def test_models_the_fast_path_would_get_wrong_use_their_own_forward(why: str, make_model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    model = make_model()
    want_logits, labels = _full_logits(model, sft_batch)
    if why == "softcapping":
        model.config.final_logit_softcapping = 30.0  # the head does more than a linear map
    elif why == "logit_scale":
        model.config.logit_scale = 0.5
    elif why == "prompt_learning":  # a caller's PeftModel with a soft prompt: the decoder alone is not the model
        model.active_peft_config = SimpleNamespace(is_prompt_learning=True)
    else:
        model.get_output_embeddings = lambda: None
    assert _plain_lm(model) is None
    calls = _spy_forward(model, virtual=3)
    with torch.no_grad():
        logits, got_labels = label_logits(model, sft_batch)
        lp, _ = label_token_logprobs(model, sft_batch)
    assert len(calls) == 2
    for kw in calls:
        assert set(kw) == {"input_ids", "attention_mask", "use_cache"} and kw["use_cache"] is False
        assert kw["input_ids"] is sft_batch["input_ids"]
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)  # the virtual positions are cut off
    assert torch.equal(got_labels, labels)
    torch.testing.assert_close(lp, token_logprobs(want_logits, labels), rtol=0, atol=1e-5)


def _head() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(16, 500, bias=False), torch.randn(70, 16), torch.randint(0, 500, (70,))


def _count_chunks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import torch.utils.checkpoint as ckpt

    sizes: list[int] = []
    real = ckpt.checkpoint

    def spy(fn: Any, head: Any, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(hidden.shape[0])
        return real(fn, head, hidden, *args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", spy)
    return sizes


@pytest.mark.parametrize(
    ("chunk_bytes", "sizes"),
    [
        (4 * 500 * 16, [16, 16, 16, 16, 6]),  # 16 rows of fp32 logits over a 500 vocabulary per chunk
        (4 * 500 * 16 + 4 * 499, [16, 16, 16, 16, 6]),  # floor: not quite 17 rows
        (4 * 500 * 35, [35, 35]),
        (4 * 500 * 70, []),  # exactly one chunk's worth: the plain pass, no checkpointing
        (4 * 500 * 69, [69, 1]),
        (1, [1] * 70),  # less than a row still makes progress, one row at a time
    ],
)
def test_chunk_sizes(chunk_bytes: int, sizes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    head, hidden, labels = _head()
    seen = _count_chunks(monkeypatch)
    got = chunked_head_logprobs(head, hidden, labels, chunk_bytes=chunk_bytes)
    assert seen == sizes
    torch.testing.assert_close(got, token_logprobs(head(hidden), labels), rtol=0, atol=1e-6)


def test_chunked_head_trains_a_head_whose_inputs_need_no_gradient() -> None:
    """Only the head trainable (a frozen decoder): the checkpointed chunks must still give the head its gradient."""
    head, hidden, labels = _head()
    token_logprobs(head(hidden), labels).sum().backward()
    want = head.weight.grad.clone()
    head.weight.grad = None
    got = chunked_head_logprobs(head, hidden, labels, chunk_bytes=4 * 500 * 16)
    got.sum().backward()
    assert head.weight.grad is not None
    torch.testing.assert_close(head.weight.grad, want, rtol=0, atol=1e-6)


def test_reduce_by_sequence_by_hand() -> None:
    token_lp = torch.tensor([0.5, -1.0, -2.0, 3.0], dtype=torch.float64)
    out = reduce_by_sequence(token_lp, torch.tensor([1, 0, 1, 1]), 3)
    assert out.sum.dtype == torch.float64 and out.count.dtype == torch.long  # the caller's precision is kept
    assert out.sum.tolist() == [-1.0, 1.5, 0.0] and out.count.tolist() == [1, 3, 0]
    assert out.mean.tolist() == [-1.0, 0.5, 0.0]  # an empty sequence averages to 0, not NaN
    with torch.device("meta"):  # on an accelerator the default device is not the inputs': results follow the inputs
        on_inputs = reduce_by_sequence(token_lp, torch.tensor([1, 0, 1, 1], device="cpu"), 3)
    assert on_inputs.sum.device.type == on_inputs.count.device.type == "cpu" and torch.equal(on_inputs.sum, out.sum)
    leaf = token_lp.clone().requires_grad_()
    detached = reduce_by_sequence(leaf, torch.tensor([1, 0, 1, 1]), 3).detach()
    assert not detached.sum.requires_grad and detached.count.tolist() == [1, 3, 0]


def test_unwrap_keeps_the_mixed_precision_forward(model: Any) -> None:
    """accelerate installs its autocast forward on the model and keeps the original beside it; unwrapping for a
    fast-path pass must not strip it (that would silently train the rest of the run in fp32)."""
    original = model.forward

    @functools.wraps(original)
    def autocast_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return original(*args, **kwargs)

    model._original_forward = original
    model.forward = MethodType(autocast_forward, model)
    assert unwrap(model) is model
    assert model.__dict__["forward"].__func__ is autocast_forward and model.__dict__["_original_forward"] is original
    dp = torch.nn.DataParallel(model)  # CPU: no devices, its forward calls the module directly
    assert unwrap(dp) is model and model.__dict__["forward"].__func__ is autocast_forward


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _hook_counter(module: torch.nn.Module) -> list[int]:
    ran: list[int] = []
    module.register_forward_pre_hook(lambda *_: ran.append(1))
    return ran


def test_through_wrapper_runs_inside_the_wrapper_forward(model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    """Under DDP/FSDP the pass must go through the wrapper's call (gradient sync, parameter gathering)."""
    dp = torch.nn.DataParallel(model)
    wrapper_ran, inner_ran = _hook_counter(dp), _hook_counter(model)
    seen: list[dict[str, torch.Tensor]] = []

    def fn(**inputs: torch.Tensor) -> str:
        seen.append(inputs)
        return "fn's result"

    assert through_wrapper(dp, fn, **_inputs(sft_batch)) == "fn's result"
    assert wrapper_ran == [1] and inner_ran == [1] and seen[0]["input_ids"] is sft_batch["input_ids"]
    assert "forward" not in model.__dict__  # the class forward is back
    with torch.no_grad():
        assert model(**_inputs(sft_batch)).logits.shape[:2] == sft_batch["input_ids"].shape
    # an instance forward (accelerate's autocast wrapper) is put back, not dropped
    own = MethodType(lambda self, **kw: "own", model)
    model.forward = own
    assert through_wrapper(dp, fn, **_inputs(sft_batch)) == "fn's result"
    assert model.__dict__["forward"] is own and wrapper_ran == [1, 1]


def test_through_wrapper_without_wrapper_calls_fn_directly(model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    ran = _hook_counter(model)
    assert through_wrapper(model, lambda **kw: kw["input_ids"], **_inputs(sft_batch)) is sft_batch["input_ids"]
    assert ran == [] and "forward" not in model.__dict__


def test_through_wrapper_runs_an_fsdp2_root_through_its_own_call(model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    """FSDP2 shards the module in place (its class becomes a subclass of FSDPModule) and gathers the parameters in
    its forward hooks, so even with no wrapper object the pass must go through the module's call."""
    model.__class__ = type(f"FSDP{type(model).__name__}", (FSDPModule, type(model)), {})
    assert _logprobs._sharded(model) and unwrap(model) is model
    ran = _hook_counter(model)
    assert through_wrapper(model, lambda **kw: "fn's result", **_inputs(sft_batch)) == "fn's result"
    assert ran == [1] and "forward" not in model.__dict__
