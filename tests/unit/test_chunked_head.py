"""Chunked LM head + log-softmax (objectives/_logprobs.chunked_head_logprobs): same values and gradients as one
pass, and no [N, vocab] tensor kept for backward."""

from __future__ import annotations

import torch

from tunelab.objectives._logprobs import chunked_head_logprobs, token_logprobs


def _setup() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 500, bias=False)
    hidden = torch.randn(70, 16, requires_grad=True)
    labels = torch.randint(0, 500, (70,))
    return head, hidden, labels


def _largest_saved(fn) -> tuple[int, torch.Tensor]:  # noqa: ANN001
    biggest = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        biggest[0] = max(biggest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return biggest[0], out


def test_chunks_equal_one_pass_in_value_and_gradient() -> None:
    head, hidden, labels = _setup()
    want = token_logprobs(head(hidden), labels)
    want.sum().backward()
    gw, gh = head.weight.grad.clone(), hidden.grad.clone()
    head.weight.grad, hidden.grad = None, None
    got = chunked_head_logprobs(head, hidden, labels, chunk_bytes=4 * 500 * 16)  # 16 positions per chunk
    got.sum().backward()
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(head.weight.grad, gw, atol=1e-6) and torch.allclose(hidden.grad, gh, atol=1e-6)


def test_no_full_logits_are_kept_for_backward() -> None:
    head, hidden, labels = _setup()
    full, _ = _largest_saved(lambda: token_logprobs(head(hidden), labels))
    chunked, out = _largest_saved(lambda: chunked_head_logprobs(head, hidden, labels, chunk_bytes=4 * 500 * 16))
    assert full >= 70 * 500  # one pass keeps the [N, V] logits (the check can fail)
    assert chunked < 16 * 500 + 1  # checkpointed chunks keep only their inputs; logits are recomputed in backward
    assert out.shape == (70,)


def test_short_rows_take_the_plain_pass() -> None:
    head, hidden, labels = _setup()
    full, _ = _largest_saved(lambda: chunked_head_logprobs(head, hidden, labels))  # default: 256 MiB per chunk
    assert full >= 70 * 500


def _lora_grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    from tunelab.config import ModelConfig
    from tunelab.methods import METHODS
    from tunelab.methods.lora import LoRAConfig
    from tunelab.models import load_model
    from tunelab.objectives._logprobs import label_token_logprobs

    torch.manual_seed(0)
    base, _ = load_model(ModelConfig(name="tiny-llama", gradient_checkpointing=checkpointing), "cpu")
    model = METHODS.get("lora")(LoRAConfig(r=4, init="gaussian")).tune(base)
    model.train()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 500, (2, 48), generator=gen)
    labels = torch.where(torch.arange(48) % 3 == 0, -100, torch.roll(ids, -1, 1))
    saved = [0]
    weights = {p.data_ptr() for p in model.parameters()}
    vocab = base.config.vocab_size

    def pack(t: torch.Tensor) -> torch.Tensor:
        # the decoder's activations only: weights are kept anyway, and the head's logits are not checkpointed
        if t.data_ptr() not in weights and t.shape[-1:] != (vocab,):
            saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, _ = label_token_logprobs(model, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    (-lp.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]


def test_gradient_checkpointing_saves_memory_with_the_same_gradients() -> None:
    plain, plain_bytes = _lora_grads(False)
    ckpt, ckpt_bytes = _lora_grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name
    assert ckpt_bytes < plain_bytes / 2, (ckpt_bytes, plain_bytes)  # activations kept for backward, measured
