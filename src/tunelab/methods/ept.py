"""EPT: Efficient Prompt Tuning by Multi-Space Projection and Prompt Fusion (Lan, Yang, Liu, Guo, Zhao, Wang;
AAAI 2025, arXiv 2405.11464).

The paper has no public code and its equations were not available to us: the structure (a DePT-style short
prompt + low-rank matrices, an attention-style prompt fusion, a projection into several subspaces mixed by a
gating network, the reconstructed prompt prepended) is from its abstract; the equations below are the design
suggested in tunelab's METHODS.md (A8), which is OURS, not the paper's:

    Z       = P_s + c * A[:m] B                          (P_s in R^{m x d}, A in R^{s x r}, B in R^{r x d})
    F       = Z + beta * softmax((Z W_q) M^T / sqrt(d)) M,   M = [Z ; c * A B]      (fusion, (m + s) keys)
    S_j     = F W_j   (j = 1..N, W_j in R^{d x d})         (multi-space projection)
    g       = softmax(W_2 tanh(W_1 mean_rows(F) + b_1) + b_2)   in R^N   (gate)
    P_final = sum_j g_j S_j   prepended to the input;  E'(x)[t] = E(x)[t] + c * (A B)[t] for t < s (as DePT)

Trainable parameters: m*d + s*r + r*d (DePT's) + d^2 (W_q) + 1 (beta, with fusion_residual) + N*d^2 (W_j)
+ h*d + h + N*h + N (gate MLP, h = gate_hidden).

Choices of ours (beyond the design note), each a guess where the paper is silent:
- Keys and values are M itself, with no K/V projections (the design's formula has only W_q); M uses the
  scaled offset c * A B, the tensor actually added to the embeddings, so its rows share Z's scale.
- `fusion_residual` (default true): F = Z + beta * attention with a learned scalar beta initialised at 0. The
  design note has F = attention alone (set fusion_residual=false for that); at init that F is a softmax
  average over the m prompt rows and s zero offset rows (B = 0), which collapses the prompt towards zero
  unless the attention is made so sharp that its gradients vanish. The residual starts F at Z exactly.
- Init so that P_final starts at P_s: W_q = I; W_j = I + E_j with small noise E_j (std 0.01 / sqrt(d)) centred
  over j, so sum_j E_j = 0; the gate's output layer is zero, so g = 1/N and P_final = F (I + mean_j E_j) = F = Z
  = P_s (B = 0), up to rounding. The noise breaks the symmetry: with W_j all equal the gate and the W_j
  would get identical gradients forever and the N subspaces could never differ. W_1 is Kaiming-uniform.
- Gate MLP: one hidden layer of `gate_hidden` (64) units with tanh; N = 4 subspaces (UNCONFIRMED numbers).
- Prompt length, s, r, alpha, the prompt init and the two learning rates as DePT's (see dept.py: m = 20, s = 256,
  r = 30, alpha = 8); the fusion, projection and gate weights train at `fusion_lr` (default the run's lr) with
  no weight decay (decay would pull the identity-initialised maps towards zero, shrinking the prompt).
- The paper trains on T5 (encoder-decoder); for a decoder LM the offset is applied at every position t < s,
  prompt and response, in training and in generation (as in dept.py). No packed rows.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field
from torch import nn

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._adapters import hidden_size
from tunelab.methods._softprompt import PromptSource, SoftPromptFields, SoftPromptMethod

SUBSPACE_NOISE = 0.01  # std of E_j times sqrt(d): a 1% relative perturbation of the identity


class EPTConfig(SoftPromptFields):
    model_config = ConfigDict(extra="forbid")
    name: Literal["ept"] = "ept"
    subspaces: int = Field(4, gt=0, description="N: projections d -> d mixed by the gate")
    gate_hidden: int = Field(64, gt=0, description="hidden units of the gate MLP")
    fusion_residual: bool = Field(True, description="F = Z + beta * attention (beta init 0, ours); false: F = attention alone")
    fusion_lr: float | None = Field(None, gt=0, description="learning rate of the fusion, projection and gate weights; null: the run's lr")


def fuse(z: torch.Tensor, memory: torch.Tensor, query: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """Prompt fusion: attention of Z W_q over the rows of `memory` (keys = values), plus Z when `beta` is given."""
    att = torch.softmax((z @ query) @ memory.T / math.sqrt(z.shape[-1]), dim=-1) @ memory
    return att if beta is None else z + beta * att


def gate(f: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """softmax(W_2 tanh(W_1 mean_rows(F) + b_1) + b_2): one weight per subspace."""
    return torch.softmax(w2 @ torch.tanh(w1 @ f.mean(dim=0) + b1) + b2, dim=-1)


def reconstruct(f: torch.Tensor, projections: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_j g_j F W_j, with projections [N, d, d]."""
    return torch.einsum("j,md,jde->me", g, f, projections)


class EPTSource(PromptSource):
    def __init__(self, prompt: torch.Tensor, cfg: EPTConfig, gen: torch.Generator) -> None:
        super().__init__(prompt, cfg.offset_positions, cfg.r, cfg.alpha, gen)
        d, n, h = prompt.shape[1], cfg.subspaces, cfg.gate_hidden
        self.fusion_query = nn.Parameter(torch.eye(d))
        self.fusion_beta = nn.Parameter(torch.zeros(())) if cfg.fusion_residual else None
        noise = torch.randn(n, d, d, generator=gen) * (SUBSPACE_NOISE / math.sqrt(d))
        self.projections = nn.Parameter(torch.eye(d) + noise - noise.mean(dim=0))
        self.gate_w1 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(h, d), a=math.sqrt(5), generator=gen))
        self.gate_b1 = nn.Parameter(torch.zeros(h))
        self.gate_w2 = nn.Parameter(torch.zeros(n, h))
        self.gate_b2 = nn.Parameter(torch.zeros(n))

    def prompt(self) -> torch.Tensor:
        m = self.prompt_vectors.shape[0]
        z = self.prompt_vectors + self.scale * (self.offset_a[:m] @ self.offset_b)
        memory = torch.cat([z, self.scale * (self.offset_a @ self.offset_b)])
        f = fuse(z, memory, self.fusion_query, self.fusion_beta)
        return reconstruct(f, self.projections, gate(f, self.gate_w1, self.gate_b1, self.gate_w2, self.gate_b2))

    def fusion_parameters(self) -> list[nn.Parameter]:
        own = [self.fusion_query, self.fusion_beta, self.projections, self.gate_w1, self.gate_b1, self.gate_w2, self.gate_b2]
        return [p for p in own if p is not None]


@METHODS.register("ept")
class EPT(SoftPromptMethod):
    """EPT: a short prompt + low-rank offset (as DePT), fused by attention and reweighted over N projected subspaces."""

    Config = EPTConfig

    def build_source(self, model: nn.Module, prompt: torch.Tensor, gen: torch.Generator) -> PromptSource:
        cfg: EPTConfig = self.cfg  # type: ignore[assignment]
        if cfg.offset_positions < cfg.prompt_length:
            raise UserError(f"method.offset_positions ({cfg.offset_positions}) must be >= method.prompt_length ({cfg.prompt_length}): "
                            "Z uses A's first m rows; raise it")
        return EPTSource(prompt, cfg, gen)

    def extra_groups(self, source: PromptSource, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        cfg: EPTConfig = self.cfg  # type: ignore[assignment]
        assert isinstance(source, EPTSource)
        return [{"params": source.fusion_parameters(), "lr": cfg.fusion_lr or lr, "weight_decay": 0.0}]

    def expected_trainable(self, model: nn.Module) -> int:
        """DePT's m*d + s*r + r*d, plus W_q (d^2), beta (1, with fusion_residual), the N projections (N*d^2) and
        the gate MLP (h*d + h + N*h + N)."""
        cfg: EPTConfig = self.cfg  # type: ignore[assignment]
        d, n, h = hidden_size(model), cfg.subspaces, cfg.gate_hidden
        return self.dept_count(model) + d * d + int(cfg.fusion_residual) + n * d * d + h * d + h + n * h + n
