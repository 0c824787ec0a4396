"""IFT, Intuitive Fine-Tuning (Hua et al., "Intuitive Fine-Tuning: Towards Simplifying Alignment into a
Single Process", arXiv 2405.11870): SFT data, no reference model. A no-grad pass over the gold sequence gives
the model's greedy guess yhat_t of each response token; the second, trained pass reads, at every response
input position, the embedding mix E = (1 - lam) E(gold) + lam E(yhat) ("temporal residual connection") and
scores the gold labels, l_t = -log p(y_t | mix). Each token is weighted by the discounted sum of the losses
from it to the end of its sequence, w_t ~ sum_{k>=t} gamma^(k-t) l_k, L1-normalised so a sequence's weights
sum to its label-token count ("relation propagation"); L = sum_t w_t l_t / N. Defaults (reference
`config/loss/ift.yaml`): lam 0.2 static, gamma 0.95. As in the reference code (TsinghuaC3I/Intuitive-
Fine-Tuning `src/trainers.py`) the weights are not detached, and gamma = 0 gives all-one weights, so
lam = gamma = 0 is exactly SFT. Deviations: N counts the label tokens of the whole optimizer step (the
reference takes a per-sequence mean, then the batch mean), so gradient accumulation is exact; the discount
distance k - t counts a sequence's label tokens (the reference counts row positions, so in multi-turn data
the tokens of the turns in between also decay the sum; identical for single-turn data); the embeddings are
the live model's (the reference mixes embeddings from a frozen copy of the initial table); lam has no
schedule or jitter (the reference's optional extras, off by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunelab.objectives import OBJECTIVES
from tunelab.objectives._base import Batch, Objective
from tunelab.objectives._logprobs import (
    IGNORE,
    _plain_lm,
    label_logits,
    model_inputs,
    through_wrapper,
    token_logprobs,
    unwrap,
)
from tunelab.objectives.sft import sft_loss

if TYPE_CHECKING:
    from tunelab.train.reference import Reference

_CHUNK = 256  # tokens per block of the discounted scan: a [C, C] decay matrix per block, carries between


class IFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["ift"] = "ift"
    lam: float = Field(0.2, ge=0, le=1, description="weight of the model's own greedy guess in the input mix")
    gamma: float = Field(0.95, ge=0, le=1, description="discount of the reverse cumulative loss weights (0: SFT)")


def ift_mix_embeddings(gold_emb: torch.Tensor, pred_emb: torch.Tensor, mix_mask: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 - lam) * gold + lam * pred at positions where `mix_mask` [R, T] is set, gold elsewhere ([R, T, H])."""
    mixed = (1 - lam) * gold_emb + lam * pred_emb
    return torch.where(mix_mask.unsqueeze(-1), mixed, gold_emb)


def _discounted_reverse_cumsum(x: torch.Tensor, seq: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_t = sum_{k>=t, seq_k == seq_t} gamma^(k-t) x_k for `x` whose sequences are contiguous runs, in blocks."""
    n = x.numel()
    parts: list[torch.Tensor] = []
    carry: tuple[torch.Tensor, torch.Tensor] | None = None  # y and seq of the first token after this block
    for start in reversed(range(0, n, _CHUNK)):
        xb, sb = x[start : start + _CHUNK], seq[start : start + _CHUNK]
        i = torch.arange(xb.numel(), device=x.device)
        dist = (i[None, :] - i[:, None]).to(x.dtype)  # k - t
        same = (sb[None, :] == sb[:, None]) & (dist >= 0)
        decay = torch.where(same, gamma ** dist.clamp(min=0), 0.0)
        yb = decay @ xb
        if carry is not None:
            to_end = (xb.numel() - i).to(x.dtype)  # distance from t to the first token of the next block
            yb = yb + torch.where(sb == carry[1], gamma**to_end * carry[0], 0.0)
        carry = (yb[0], sb[0])
        parts.append(yb)
    return torch.cat(parts[::-1]) if parts else x.clone()


def ift_weights(token_losses: torch.Tensor, seq: torch.Tensor, gamma: float) -> torch.Tensor:
    """Relation-propagation weights [N] for per-token losses [N] with sequence ids `seq` [N] (tokens in order).

    w_t = sum_{k>=t in t's sequence} gamma^(k-t) l_k, scaled so each sequence's weights sum to its token
    count. gamma = 0 returns ones (as the reference code does), so the loss is plain SFT. Not detached.
    """
    if gamma == 0 or token_losses.numel() == 0:
        return torch.ones_like(token_losses)
    order = torch.argsort(seq, stable=True)  # group each sequence's tokens, keeping their order
    s = seq[order]
    w = _discounted_reverse_cumsum(token_losses[order], s, gamma)
    _, inv = torch.unique_consecutive(s, return_inverse=True)
    size = int(inv.max()) + 1
    totals = torch.zeros(size, dtype=w.dtype, device=w.device).index_add(0, inv, w)
    counts = torch.zeros(size, dtype=w.dtype, device=w.device).index_add(0, inv, torch.ones_like(w))
    w = w * (counts[inv] / totals[inv].clamp(min=torch.finfo(w.dtype).tiny))
    return torch.empty_like(w).index_copy(0, order, w)


def _mixed_inputs(model: Any, batch: Batch, lam: float) -> torch.Tensor:
    """Input embeddings [R, T, H]: response inputs mixed with the embedding of the previous position's guess."""
    input_ids, sel = batch["input_ids"], batch["labels"] != IGNORE
    embed = unwrap(model).get_input_embeddings()
    gold = embed(input_ids)
    if lam == 0:
        return gold
    with torch.no_grad():
        preds = label_logits(model, batch)[0].argmax(-1)
    guess = torch.zeros_like(input_ids)
    guess[sel] = preds  # the guess made at t is the input at t + 1
    pred_ids = input_ids.clone()
    pred_ids[:, 1:] = torch.where(sel[:, :-1], guess[:, :-1], input_ids[:, 1:])
    mix_mask = torch.zeros_like(sel)
    mix_mask[:, 1:] = sel[:, :-1]
    return ift_mix_embeddings(gold, embed(pred_ids), mix_mask, lam)


def _logits_from_embeds(model: Any, batch: Batch, embeds: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at labelled positions for `inputs_embeds` (same fast path as `label_logits`)."""
    labels = batch["labels"]
    sel = labels != IGNORE
    kwargs = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
    lm = _plain_lm(model)
    if lm is None:
        logits = model(inputs_embeds=embeds, **kwargs, use_cache=False).logits
        return logits[:, -labels.shape[1] :][sel]

    def head_at_labels(**inputs: torch.Tensor) -> torch.Tensor:
        hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return lm.get_output_embeddings()(hidden[sel])

    return through_wrapper(model, head_at_labels, inputs_embeds=embeds, **kwargs)


@OBJECTIVES.register("ift")
class IFT(Objective):
    """IFT: SFT whose inputs mix gold and the model's own guesses, with discounted loss weights."""

    Config = IFTConfig
    batch_format = "sft"
    loss_items = "tokens"

    def loss(self, model: Any, batch: Batch, num_items: int, ref: Reference | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg: IFTConfig = self.cfg  # type: ignore[assignment]
        sel = batch["labels"] != IGNORE
        labels = batch["labels"][sel]
        logits = _logits_from_embeds(model, batch, _mixed_inputs(model, batch, cfg.lam))
        tokens = max(labels.numel(), 1)
        if cfg.gamma == 0:  # all-one weights: the SFT loss itself, bit for bit
            loss = sft_loss(logits, labels, num_items)
            return loss, {"tokens": float(labels.numel()), "nll": float(loss.detach()) * max(num_items, 1) / tokens}
        token_nll = -token_logprobs(logits, labels)
        weights = ift_weights(token_nll, batch["seq_index"][sel], cfg.gamma)
        loss = (weights * token_nll).sum() / max(num_items, 1)
        return loss, {"tokens": float(labels.numel()), "nll": float(token_nll.detach().sum()) / tokens}
