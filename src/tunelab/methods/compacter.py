"""Compacter: PHM (Kronecker-product) adapters after the attention and the feed-forward sub-layer of every block.

Karimi Mahabadi, Henderson, Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", NeurIPS 2021,
arXiv 2106.04647. Each adapter is h <- h + PHM_up(GeLU(PHM_down(h))), a PHM layer's weight being
W = sum_{i=1..n} A_i ⊗ s_i t_i^T with the rule matrices A_i shared by every adapter of the model and rank-one
per-layer fast matrices. Houlsby placement (as the paper's Compacter): two adapters per block, on the outputs of
the attention and of the feed-forward sub-layer, before their residual adds; the norm layers are trained too.

Defaults from the reference configs (rabeehk/compacter `seq2seq/configs/compacter.json`) and AdapterHub's
`CompacterConfig`: n = 4, reduction factor 32, GeLU, shared rule, rank 1, rule init N(0, 1e-4), norms trained.
Deviations and choices (details in `tunelab.methods._phm`): the up projection's fast factors start at zero, so
the model equals the base at init (the reference inits them glorot-uniform); the bottleneck is rounded up to a
multiple of n; exact GeLU by default (the reference: gelu_new, offered as an option); one rule set shared by
the down and up projections; with train_norms (default) the adapters cannot be switched off (can_disable False).
"""

from __future__ import annotations

from typing import Literal

from tunelab.methods import METHODS
from tunelab.methods._phm import CompacterFields, CompacterMethod


class CompacterConfig(CompacterFields):
    name: Literal["compacter"] = "compacter"


@METHODS.register("compacter")
class Compacter(CompacterMethod):
    Config = CompacterConfig
    placement = ("attn", "ffn")
