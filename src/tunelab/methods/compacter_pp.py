"""Compacter++: PHM (Kronecker-product) adapters after the feed-forward sub-layer of every block only.

Karimi Mahabadi, Henderson, Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", NeurIPS 2021,
arXiv 2106.04647. The same adapter as `compacter`, h <- h + PHM_up(GeLU(PHM_down(h))) with
W = sum_{i=1..n} A_i ⊗ s_i t_i^T (rule matrices A_i shared model-wide, rank-one fast matrices per layer), but
in Pfeiffer placement as the paper's Compacter++: one adapter per block, on the feed-forward sub-layer's output
before its residual add; the norm layers are trained too. Half of Compacter's adapter parameters.

Defaults from the reference configs (rabeehk/compacter `seq2seq/configs/compacter++.json`) and AdapterHub's
`CompacterPlusPlusConfig`: n = 4, reduction factor 32, GeLU, shared rule, rank 1, rule init N(0, 1e-4), norms
trained. Deviations and choices (details in `tunelab.methods._phm`): the up projection's fast factors start at
zero, so the model equals the base at init (the reference inits them glorot-uniform); the bottleneck is rounded
up to a multiple of n; exact GeLU by default (the reference: gelu_new, offered as an option); one rule set shared
by the down and up projections; with train_norms (default) the adapters cannot be switched off (can_disable False).
"""

from __future__ import annotations

from typing import Literal

from tunelab.methods import METHODS
from tunelab.methods._phm import CompacterFields, CompacterMethod


class CompacterPPConfig(CompacterFields):
    name: Literal["compacter_pp"] = "compacter_pp"


@METHODS.register("compacter_pp")
class CompacterPP(CompacterMethod):
    Config = CompacterPPConfig
    placement = ("ffn",)
