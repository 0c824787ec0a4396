"""Skill localisation by grafting (Panigrahi, Saunshi, Zhao, Arora, ICML 2023, arXiv 2302.06600).

Given the pre-trained weights theta_pre (the model this run loads) and fine-tuned weights theta_ft (a finished
tunelab run of the same base model, `method.finetuned`), grafting looks for a sparse binary mask gamma such that
the grafted model theta_pre + gamma * (theta_ft - theta_pre) keeps the fine-tuned skill. Only the mask trains:

    delta      = theta_ft - theta_pre                                 per grafted tensor, fp32, frozen
    gamma_base = 1 on the top-s fraction of |delta| (all grafted tensors ranked together), 0 elsewhere
    gamma      = gamma_base + (1 - 2 gamma_base) * sigmoid(S - b)     S ~ U[0, 1) (seeded), b = sigmoid_bias
    theta      = theta_pre + gamma * delta

With b = 10, sigmoid(S - b) < 5e-5 at the start, so gamma ~ gamma_base: the model starts as the top-s graft,
not as theta_pre (identity_at_init False). S trains on the task loss through gamma (one logit per grafted
weight). `finalize` rounds gamma (> 0.5 -> 1, else 0), writes theta_pre + round(gamma) * delta into the weights
and removes the parametrisation, so the run delivers a plain transformers model (saved_format "full") with the
base model's parameter names, and `graft_mask.json` beside it (weights kept per tensor, total fraction).

Choices and deviations from the paper:
- Grafted tensors: by default every parameter inside the decoder blocks (matrices, biases, norm scales). The
  embeddings and the LM head stay at theta_pre: the paper grafts all parameters, but the vocabulary tables
  would dominate the mask's memory, and a head tied to the embeddings cannot be parametrised alone.
  `graft_params` (a regex searched in parameter names) picks other tensors; a tied tensor is refused.
- sparsity default 1e-4, the top of the paper's ~1e-5..1e-4 range (the reference code defaults to 1e-5): small
  models have few weights, and the 2-block test models (~74k block weights) then still graft 8. At least one
  weight is always selected: k = max(1, ceil(s * N)); equal |delta| values are ranked by position.
- No L1 penalty on gamma (optional in the paper) and no choice of the best mask over epochs by train +
  validation score: the mask of the run's last step is the one rounded.
- S gets no weight decay (its own parameter group): the paper takes plain gradient steps on S.
- theta_ft may come from a run of any mergeable method (its `merged()` model is used).
- can_disable False: `finalize` removes the mask before the loop's final validation, so an adapter-off
  reference would not survive until then; reference log-probs are precomputed from theta_pre instead.
- `merged()` of a model still training folds the relaxed gamma as it stands (same outputs); the run's final
  model is the rounded one. Checkpoints hold S only: a resume rebuilds delta and gamma_base from the same runs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._adapters import decoder_blocks, freeze_all
from tunelab.methods._base import Method


class GraftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["graft"] = "graft"
    finetuned: str = Field(..., description="directory of a finished tunelab run of the same base model (theta_ft)")
    graft_params: str | None = Field(None, description="regex searched in parameter names: the tensors to graft "
                                     "(default: every parameter in the decoder blocks)")
    sparsity: float = Field(1e-4, gt=0, lt=1, description="s: fraction of grafted weights in the initial mask gamma_base")
    sigmoid_bias: float = Field(10.0, description="b in sigmoid(S - b); large b keeps gamma near gamma_base at the start")
    seed: int = Field(0, description="seed of the mask logits' uniform init")


def relaxed_mask(base: torch.Tensor, logits: torch.Tensor, bias: float) -> torch.Tensor:
    """gamma = gamma_base + (1 - 2 gamma_base) * sigmoid(S - b)."""
    return base + (1 - 2 * base) * torch.sigmoid(logits - bias)


def top_fraction_mask(deltas: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """gamma_base per tensor: 1 on the k = max(1, ceil(s * N)) entries of largest |delta| over all tensors."""
    flat = torch.cat([d.detach().abs().flatten().float() for d in deltas])
    k = max(1, math.ceil(sparsity * flat.numel()))
    chosen = torch.zeros_like(flat)
    chosen[torch.sort(flat, descending=True, stable=True).indices[:k]] = 1.0
    return [m.view_as(d) for m, d in zip(chosen.split([d.numel() for d in deltas]), deltas, strict=True)]


class GraftMask(nn.Module):
    """The parametrisation of one grafted tensor: theta_pre -> theta_pre + gamma * delta."""

    def __init__(self, delta: torch.Tensor, base: torch.Tensor, logits: torch.Tensor, bias: float) -> None:
        super().__init__()
        # not persistent: a resume rebuilds them from the two runs, and checkpoints keep only S
        self.register_buffer("delta", delta, persistent=False)
        self.register_buffer("base", base, persistent=False)
        self.logits = nn.Parameter(logits)
        self.bias = bias

    def gamma(self) -> torch.Tensor:
        return relaxed_mask(self.base, self.logits, self.bias)

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return (pre.float() + self.gamma() * self.delta).to(pre.dtype)


def finetuned_weights(run: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """theta_ft by parameter name, checked to fit `model` (same class, names and shapes)."""
    from tunelab.export import load_tuned

    try:
        ft, _, ft_method = load_tuned(run)
        ft = ft_method.merged(ft)
    except UserError as e:
        raise UserError(f"method.finetuned: {e}") from None
    except NotImplementedError as e:
        raise UserError(f"method.finetuned: {run}: {e}; graft needs a run whose method folds into the weights") from None
    want = {n: p.shape for n, p in model.named_parameters()}
    have = {n: p.detach() for n, p in ft.named_parameters()}
    bad = sorted(n for n in want.keys() | have.keys() if n not in want or n not in have or want[n] != have[n].shape)
    if type(ft).__name__ != type(model).__name__ or bad:
        what = f"{type(ft).__name__} vs {type(model).__name__}" if type(ft).__name__ != type(model).__name__ else f"e.g. {bad[0]}"
        raise UserError(f"method.finetuned: {run} was tuned from another base model ({what}); give a run of this run's model")
    return have


@METHODS.register("graft")
class Graft(Method):
    """Grafting: learn a sparse mask over (fine-tuned - pre-trained) weights; the run delivers the grafted model."""

    Config = GraftConfig
    saved_format = "full"
    mergeable = True
    identity_at_init = False
    can_disable = False

    def __init__(self, cfg: BaseModel) -> None:
        super().__init__(cfg)
        self._grafted: dict[str, tuple[nn.Module, str]] = {}  # parameter name -> (owner module, attribute)
        self._numel: dict[str, int] = {}
        #: weights kept by the rounded mask per tensor, set by `finalize`
        self.kept: dict[str, int] | None = None

    def _select(self, model: nn.Module) -> list[str]:
        cfg: GraftConfig = self.cfg  # type: ignore[assignment]
        named = list(model.named_parameters(remove_duplicate=False))
        uses: dict[int, int] = {}
        for _, p in named:
            uses[id(p)] = uses.get(id(p), 0) + 1
        if cfg.graft_params is None:
            ids = {id(p) for block in decoder_blocks(model) for p in block.parameters()}
            names = [n for n, p in named if id(p) in ids]
        else:
            try:
                rx = re.compile(cfg.graft_params)
            except re.error as e:
                raise UserError(f"method.graft_params: '{cfg.graft_params}' is not a valid regex ({e})") from None
            names = [n for n, p in named if rx.search(n)]
            if not names:
                raise UserError(f"method.graft_params: '{cfg.graft_params}' matches no parameter name; check the model's names")
        tied = [n for n, p in named if n in names and uses[id(p)] > 1]
        if tied:
            raise UserError(f"method.graft_params: {tied[0]} is tied to another tensor and cannot be grafted alone; exclude it")
        return names

    def apply(self, model: nn.Module) -> nn.Module:
        cfg: GraftConfig = self.cfg  # type: ignore[assignment]
        if self._grafted:
            raise UserError("method: graft was applied twice to one model")
        names = self._select(model)
        theta_ft = finetuned_weights(Path(cfg.finetuned), model)
        freeze_all(model)
        params = dict(model.named_parameters())
        deltas = [theta_ft[n].to(params[n].device, torch.float32) - params[n].detach().float() for n in names]
        del theta_ft
        gen = torch.Generator().manual_seed(cfg.seed)
        for name, delta, base in zip(names, deltas, top_fraction_mask(deltas, cfg.sparsity), strict=True):
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            logits = torch.rand(delta.shape, generator=gen).to(delta.device)
            parametrize.register_parametrization(owner, attr, GraftMask(delta, base, logits, cfg.sigmoid_bias))
            self._grafted[name] = (owner, attr)
            self._numel[name] = delta.numel()
        return model

    def expected_trainable(self, model: nn.Module) -> int:
        """One mask logit per grafted weight: the sum of the grafted tensors' sizes."""
        return sum(self._numel.values())

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0, "lr": lr}]

    def _masks(self) -> list[tuple[str, nn.Module, str, GraftMask]]:
        return [(n, owner, attr, owner.parametrizations[attr][0]) for n, (owner, attr) in self._grafted.items()]  # type: ignore[index]

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> nn.Module:
        """Round gamma to {0, 1} and write theta_pre + round(gamma) * delta into the plain weights."""
        if not self._grafted:
            return model
        kept: dict[str, int] = {}
        for name, owner, attr, mask in self._masks():
            keep = mask.gamma() > 0.5
            pre = owner.parametrizations[attr].original  # type: ignore[index]
            grafted = (pre.float() + keep * mask.delta).to(pre.dtype)
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
            getattr(owner, attr).copy_(grafted)
            kept[name] = int(keep.sum())
        self._grafted = {}
        self.kept = kept
        return model

    @torch.no_grad()
    def merged(self, model: nn.Module) -> nn.Module:
        """The model with its current (relaxed, unrounded) gamma folded into plain weights."""
        for _, owner, attr, _ in self._masks():
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
            getattr(owner, attr).requires_grad_(False)
        self._grafted = {}
        return model

    def save_final(self, model: nn.Module, path: Path) -> None:
        if self._grafted or self.kept is None:
            raise RuntimeError("graft: save_final needs the model that finalize() returned (the rounded mask)")
        super().save_final(model, path)
        total = sum(self._numel.values())
        kept_total = sum(self.kept.values())
        stats = {"sparsity": self.cfg.sparsity, "grafted_weights": total, "kept_weights": kept_total,  # type: ignore[attr-defined]
                 "kept_fraction": kept_total / total, "kept": self.kept}
        (path / "graft_mask.json").write_text(json.dumps(stats, indent=2))
