"""Compacter's PHM layer and adapter, shared by `compacter` (Houlsby placement) and `compacter_pp` (Pfeiffer).

Paper: Karimi Mahabadi, Henderson, Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers",
NeurIPS 2021, arXiv 2106.04647.

Maths. A PHM (parameterised hypercomplex multiplication) layer maps x in R^{d_in} to y = x W + b with

    W = sum_{i=1..n} A_i ⊗ B_i,   A_i in R^{n x n} ("slow" rule),   B_i in R^{(d_in/n) x (d_out/n)} ("fast"),

so W costs n^3 + d_in d_out / n parameters instead of d_in d_out; n must divide d_in and d_out. Compacter shares
the rule matrices A_i across every PHM layer of the model and factorises each fast matrix, B_i = s_i t_i^T with
s_i in R^{(d_in/n) x rank}, t_i in R^{(d_out/n) x rank}: a layer then costs rank (d_in + d_out) + d_out.
The adapter is h <- h + PHM_up(act(PHM_down(h))) with bottleneck m ~ hidden / reduction_factor.

Defaults (reference configs rabeehk/compacter `seq2seq/configs/compacter.json`, `compacter++.json`; AdapterHub's
`CompacterConfig`): n = 4, reduction_factor 32, GeLU, one shared rule set, rank-1 fast matrices, rule entries
~ N(0, phm_init_range = 1e-4), fast matrices glorot-uniform, bias zero, the model's norm layers trained.

Choices of ours and deviations, stated plainly:
- ONE rule set {A_i} for the whole model, shared by the down AND up projections of every adapter (n^3 parameters
  in total), as AdapterHub keeps a single shared `phm_rule` for both positions. With shared_phm_rule false each
  PHM layer has its own (2 n^3 per adapter).
- Identity at init (deviation): the up projection's output-side fast factors t_i (its full B_i when
  factorized_phm is false) start at zero, so W_up = 0, b_up = 0 and the tuned model equals the base exactly. The
  reference initialises every fast matrix glorot-uniform (non-zero adapter output at init). Gradients still flow:
  b_up and t_up are updated by the first step, the down projection and the rule from the second.
- Bottleneck rounded up to a multiple of n (at least n) so that n divides it: m = n * ceil((hidden // rf) / n).
  Unchanged for T5-base (768/32 = 24) and common LLM widths (896, 1536, 2048, 4096); the 64-wide test models
  get m = 4 instead of 2.
- Activation "gelu" is the exact GeLU; the reference configs use gelu_new (tanh approximation), offered as
  "gelu_new".
- train_norms unfreezes every LayerNorm/RMSNorm module of the model, the final norm included (the reference's
  unfreeze_layer_norms). Those are trained in place, so switching the adapters off no longer gives the base
  model: can_disable is False (and `disabled()` refuses) while train_norms is true.
- The adapter sits on the attention / feed-forward sub-layer's output before the residual add (decoder-only
  models; the paper used T5). No LayerNorm inside the adapter (the reference configs switch them off).
- Not offered: the reference's learn_phm=false, factorised rule matrices, fast matrices shared across layers,
  normalize_phm_weight.
- Computation: W is materialised once per forward (d_in x d_out, the size of a plain adapter weight, small at
  our widths) by one einsum over rule and fast matrices; the n x d_in x d_out stack of Kronecker products that a
  literal sum of torch.kron would build is never formed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunelab.errors import UserError
from tunelab.methods._adapters import (
    ACTIVATIONS,
    AdapterModule,
    TunelabMethod,
    adapters_disabled,
    attach,
    block_part,
    decoder_blocks,
    freeze_all,
    hidden_size,
)

ACTS = {**ACTIVATIONS, "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh")}


class CompacterFields(BaseModel):
    """Fields shared by `compacter` and `compacter_pp` (each adds its own `name`)."""

    model_config = ConfigDict(extra="forbid")
    phm_dim: int = Field(4, gt=0, description="n: number of Kronecker terms; must divide the hidden size")
    reduction_factor: int = Field(32, gt=0, description="bottleneck = hidden // reduction_factor, rounded up to a multiple of phm_dim")
    activation: Literal["gelu", "gelu_new", "relu", "swish", "silu", "tanh", "identity"] = Field(
        "gelu", description="nonlinearity between the down and up PHM projections")
    shared_phm_rule: bool = Field(True, description="one set of rule matrices A_i for every PHM layer of the model")
    factorized_phm: bool = Field(True, description="fast matrices B_i = s_i t_i^T of rank phm_rank (else full B_i)")
    phm_rank: int = Field(1, gt=0, description="rank of the factorised fast matrices")
    phm_init_range: float = Field(1e-4, gt=0, description="std of the normal init of the rule matrices A_i")
    train_norms: bool = Field(True, description="also train the model's LayerNorm/RMSNorm weights (then the adapters cannot be switched off)")


# -- the maths ---------------------------------------------------------------------------------------------


def phm_weight(rule: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
    """W = sum_i A_i ⊗ B_i for rule (n, n, n) and fast (n, p, q): a (n p) x (n q) matrix.

    kron(A, B)[b p + r, a q + c] = A[b, a] B[r, c], so one einsum into (b, r, a, c) and a reshape give the sum."""
    n, p, q = fast.shape
    return torch.einsum("iba,irc->brac", rule, fast).reshape(n * p, n * q)


def bottleneck_size(hidden: int, reduction_factor: int, n: int) -> int:
    """hidden // reduction_factor, rounded up to a multiple of n (at least n) so that n divides it."""
    return max(n, math.ceil((hidden // reduction_factor) / n) * n)


def phm_layer_params(d_in: int, d_out: int, n: int, rank: int, factorized: bool) -> int:
    """Per-layer trainable parameters of a PHM layer without its rule: fast matrices plus the bias."""
    fast = rank * (d_in + d_out) if factorized else d_in * d_out // n
    return fast + d_out


def new_rule(n: int, init_range: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, n, n) * init_range)


class PHMLinear(nn.Module):
    """y = x W + b with W = sum_i A_i ⊗ B_i; `rule` (A, shape (n, n, n)) may be a Parameter shared with other layers."""

    def __init__(self, d_in: int, d_out: int, rule: nn.Parameter, *, factorized: bool = True, rank: int = 1,
                 zero_out: bool = False) -> None:
        super().__init__()
        n = rule.shape[0]
        if d_in % n or d_out % n:
            raise UserError(f"method.phm_dim: {n} does not divide the layer sizes {d_in} -> {d_out}; choose a phm_dim that divides the hidden size")
        self.rule = rule
        p, q = d_in // n, d_out // n
        self.s = nn.Parameter(torch.empty(n, p, rank)) if factorized else None
        self.t = nn.Parameter(torch.empty(n, q, rank)) if factorized else None
        self.fast = None if factorized else nn.Parameter(torch.empty(n, p, q))
        self.bias = nn.Parameter(torch.zeros(d_out))
        with torch.no_grad():
            # glorot-uniform per Kronecker term (the reference's init); the output-side factor of an up
            # projection starts at zero so that the adapter starts as the identity
            out_side = self.t if self.t is not None else self.fast
            assert out_side is not None
            for i in range(n):
                if self.s is not None:
                    nn.init.xavier_uniform_(self.s[i])
                if zero_out:
                    out_side[i].zero_()
                else:
                    nn.init.xavier_uniform_(out_side[i])

    def fast_matrices(self) -> torch.Tensor:
        """B_i, shape (n, d_in/n, d_out/n)."""
        if self.s is not None and self.t is not None:
            return self.s @ self.t.transpose(1, 2)
        assert self.fast is not None
        return self.fast

    def weight(self) -> torch.Tensor:
        fast = self.fast_matrices()
        # a model split over devices holds the one shared rule on a single device
        return phm_weight(self.rule.to(fast.device), fast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight() + self.bias


class CompacterAdapter(AdapterModule):
    """delta(h) = PHM_up(act(PHM_down(h))); the sequential hook adds it to h."""

    def __init__(self, hidden: int, bottleneck: int, cfg: CompacterFields, rule: nn.Parameter | None) -> None:
        super().__init__()
        f, r = cfg.factorized_phm, cfg.phm_rank
        # without sharing, each projection draws its own rule
        down_rule = rule if rule is not None else new_rule(cfg.phm_dim, cfg.phm_init_range)
        up_rule = rule if rule is not None else new_rule(cfg.phm_dim, cfg.phm_init_range)
        self.down = PHMLinear(hidden, bottleneck, down_rule, factorized=f, rank=r)
        self.up = PHMLinear(bottleneck, hidden, up_rule, factorized=f, rank=r, zero_out=True)
        self.act = ACTS[cfg.activation]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of every LayerNorm/RMSNorm module (by class: nn.LayerNorm, *LayerNorm, *RMSNorm)."""
    seen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("LayerNorm", "RMSNorm")):
            seen.update({id(p): p for p in m.parameters(recurse=False)})
    return list(seen.values())


# -- the method ----------------------------------------------------------------------------------------------


class CompacterMethod(TunelabMethod):
    """Compacter adapters at `placement` (the sub-layers of every block whose output they modify)."""

    placement: ClassVar[tuple[Literal["attn", "ffn"], ...]]
    mergeable = False  # the GeLU between the projections makes the adapter nonlinear
    identity_at_init = True  # the up projection starts at zero (see the module docstring)

    @property
    def cfg_(self) -> CompacterFields:
        return self.cfg  # type: ignore[return-value]

    @property
    def can_disable(self) -> bool:  # type: ignore[override]
        # norms trained in place are not switched off with the adapters
        return not self.cfg_.train_norms

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        if self.cfg_.train_norms:
            raise NotImplementedError(
                f"method '{self.cfg.name}' with train_norms trains the norm weights in place, so switching its "  # type: ignore[attr-defined]
                "adapters off does not give the base model; its reference log-probs are precomputed instead"
            )
        with adapters_disabled(model):
            yield

    def _bottleneck(self, model: nn.Module) -> tuple[int, int]:
        cfg = self.cfg_
        d = hidden_size(model)
        if d % cfg.phm_dim:
            raise UserError(f"method.phm_dim: {cfg.phm_dim} does not divide the hidden size {d} of this model; choose a divisor of {d}")
        return d, bottleneck_size(d, cfg.reduction_factor, cfg.phm_dim)

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg_
        d, m = self._bottleneck(model)
        blocks = decoder_blocks(model)
        norms = norm_parameters(model) if cfg.train_norms else []
        if cfg.train_norms and not norms:
            raise UserError(f"method.train_norms: {type(model).__name__} has no LayerNorm/RMSNorm weights to train; set it to false")
        freeze_all(model)
        rule = new_rule(cfg.phm_dim, cfg.phm_init_range) if cfg.shared_phm_rule else None
        for block in blocks:
            for part in self.placement:
                _, sub = block_part(block, part)
                attach(sub, "compacter", CompacterAdapter(d, m, cfg, rule), "sequential")
        for p in norms:
            p.requires_grad_(True)
        return model

    def expected_trainable(self, model: nn.Module) -> int:
        """adapters = blocks x len(placement); per adapter PHM_down(d -> m) + PHM_up(m -> d), each
        rank (d_in + d_out) + d_out (factorised) or d_in d_out / n + d_out (full); rule matrices n^3 once
        (shared) or 2 n^3 per adapter; plus the norm weights when train_norms."""
        cfg = self.cfg_
        d, m = self._bottleneck(model)
        n = cfg.phm_dim
        adapters = len(decoder_blocks(model)) * len(self.placement)
        per_adapter = sum(phm_layer_params(a, b, n, cfg.phm_rank, cfg.factorized_phm) for a, b in ((d, m), (m, d)))
        rules = n**3 if cfg.shared_phm_rule else 2 * adapters * n**3
        norms = sum(p.numel() for p in norm_parameters(model)) if cfg.train_norms else 0
        return adapters * per_adapter + rules + norms
