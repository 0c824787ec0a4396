"""CRaSh: Clustering, Removing and Sharing for offsite-tuning emulators (Zhang, Ding, Qi, Zhu, Long, Zhou; EMNLP 2023;
arXiv 2310.15477), on offsite-tuning (Xiao, Lin, Han 2023, arXiv 2302.04870).

Offsite-tuning trains a few bottom and top blocks (the "adapter") with the middle blocks replaced by a cheaper
frozen "emulator", then plugs the trained adapter back into the full model. CRaSh builds the emulator without
training:
1. Cluster (`prepare`): run the base model on calibration batches, pool every block's output per sequence
   (mean over its real tokens, or its last real token), and compute linear CKA between all blocks:
       CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),  Xc = X with column means removed.
   Starting from one cluster per emulated middle block, merge the two ADJACENT clusters whose boundary blocks
   (last of the left, first of the right) have the highest CKA, until K clusters remain. (Boundary blocks are
   always neighbours, so this keeps the M - K most similar neighbour links and cuts the K - 1 weakest.)
2. Remove + 3. Share (`apply`): every position of a cluster holds the SAME module object, the cluster's
   representative, so the emulator keeps the model's depth. Only the adapter blocks train.
`finalize` puts the original middle blocks back: the run delivers the full model with the trained adapter
blocks (saved_format "full"), and `crash_clusters.json` (clusters, representatives, CKA matrix) beside it.

Defaults and choices (ours where the paper leaves them open):
- adapter_bottom / adapter_top: 2 + 2 (offsite-tuning's default). Left unset on a model with fewer than 5
  blocks, the L - 1 blocks that may train are split bottom-first (2 blocks: 1 + 0; 3: 1 + 1; 4: 2 + 1), so at
  least one block is emulated; values set explicitly that leave no block to emulate are an error.
- clusters K: half the emulated middle blocks, rounded down, at least 1.
- Representative: the member with the highest mean CKA to the other members (ties: the lowest block). The
  paper's code repeats a kept layer; which one it keeps is not re-checked here.
- Block outputs are taken by forward hooks on the blocks, not from `output_hidden_states` (whose last entry is
  after the final norm in many architectures). CKA is computed in float64 on the CPU, so `prepare` is
  deterministic, as a resume needs. Packed rows are split into sequences where position_ids restart; a trailing
  segment made only of the pad token is the row's padding and is skipped.
- calibration_batches (default 8 training micro-batches, the first of epoch 0) stand in for the paper's
  calibration set (e.g. 512 validation samples).
- Embeddings, final norm and LM head stay frozen: only the adapter blocks train.
- An evaluation before training (eval.before) runs right after `apply`, so for CRaSh it measures the emulator.
- Shared blocks and the KV cache: transformers attention layers know their depth (`layer_idx`, the cache slot).
  While the emulator is in place a pre-hook re-points a shared block's `layer_idx` to the position it is called
  at (counted from each decoder forward), so generation with a cache (an evaluation before or during training)
  fills one slot per depth. Other per-depth settings fixed at construction (e.g. a sliding-window layer type)
  are the representative's. The finalized full model has none of this.
- mergeable: the delivered model is plain; `merged()` of the emulator itself unshares the repeated blocks
  (deep copies, same outputs). can_disable False: the adapter blocks are trained in place.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._adapters import decoder_blocks, freeze_all
from tunelab.methods._base import Method
from tunelab.methods._cka import cka_matrix, cluster_adjacent, pool, representative, sequence_spans


class CrashConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["crash"] = "crash"
    clusters: int | None = Field(None, ge=1, description="K emulator clusters (default: half the emulated middle blocks, min 1)")
    adapter_bottom: int | None = Field(None, ge=0, description="bottom blocks that train (default 2, fewer on models under 5 blocks)")
    adapter_top: int | None = Field(None, ge=0, description="top blocks that train (default 2, fewer on models under 5 blocks)")
    pooling: Literal["mean", "last"] = Field("mean", description="per-sequence pooling of block outputs: mean of real tokens or the last one")
    calibration_batches: int = Field(8, ge=1, description="training micro-batches the layer similarities are measured on")


@dataclass
class CrashPlan:
    """What `prepare` measured and decided: the emulator's structure."""

    num_blocks: int
    bottom: int
    top: int
    clusters: list[list[int]]
    representatives: list[int]
    cka: torch.Tensor

    def to_json(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "adapter_bottom": self.bottom, "adapter_top": self.top,
                "clusters": self.clusters, "representatives": self.representatives, "cka": self.cka.tolist()}


def _block_list(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(owner, ModuleList) of the decoder blocks."""
    blocks = decoder_blocks(model)
    for owner in model.modules():
        for child in owner.children():
            if isinstance(child, nn.ModuleList) and len(child) == len(blocks) and all(a is b for a, b in zip(child, blocks, strict=True)):
                return owner, child
    raise UserError(f"{type(model).__name__}: the decoder blocks are not held in one ModuleList, so CRaSh cannot share them")


def _indexed(block: nn.Module) -> list[nn.Module]:
    """The block's sub-modules that know their depth (transformers attention: `layer_idx`, the KV-cache slot)."""
    return [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]


@METHODS.register("crash")
class Crash(Method):
    """CRaSh: train bottom and top blocks against a layer-sharing emulator of the middle; deliver the full model."""

    Config = CrashConfig
    saved_format = "full"
    mergeable = True
    identity_at_init = False
    can_disable = False

    def __init__(self, cfg: BaseModel) -> None:
        super().__init__(cfg)
        #: set by `prepare`
        self.plan: CrashPlan | None = None
        self._originals: dict[int, nn.Module] | None = None  # the middle blocks, while the emulator is in place
        self._hooks: list[Any] = []
        self._calls: dict[int, int] = {}  # calls of each shared block in the current decoder forward
        self._layer_idx: list[tuple[nn.Module, int]] = []  # (module, its own layer_idx) of the shared blocks

    @property
    def calibration_batches(self) -> int:  # type: ignore[override]
        return self.cfg.calibration_batches  # type: ignore[attr-defined]

    def adapter_counts(self, num_blocks: int) -> tuple[int, int]:
        cfg: CrashConfig = self.cfg  # type: ignore[assignment]
        room = num_blocks - 1  # at least one block is emulated
        bottom, top = cfg.adapter_bottom, cfg.adapter_top
        if bottom is None and top is None:
            total = min(4, room)
            bottom, top = (total + 1) // 2, total // 2
        elif bottom is None:
            bottom = max(0, min(2, room - top))  # type: ignore[operator]
        elif top is None:
            top = max(0, min(2, room - bottom))
        if bottom + top > room:  # type: ignore[operator]
            raise UserError(f"method.adapter_bottom/adapter_top: {bottom} + {top} adapter blocks leave none of the model's "
                            f"{num_blocks} blocks to emulate; lower them")
        if bottom + top == 0:  # type: ignore[operator]
            raise UserError("method.adapter_bottom/adapter_top: both 0 leaves nothing to train; set at least one")
        return bottom, top  # type: ignore[return-value]

    @torch.no_grad()
    def prepare(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        cfg: CrashConfig = self.cfg  # type: ignore[assignment]
        blocks = decoder_blocks(model)
        bottom, top = self.adapter_counts(len(blocks))
        middle = list(range(bottom, len(blocks) - top))
        n_clusters = cfg.clusters if cfg.clusters is not None else max(1, len(middle) // 2)
        if n_clusters > len(middle):
            raise UserError(f"method.clusters: {n_clusters} clusters but only {len(middle)} middle blocks are emulated; use at most {len(middle)}")
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        feats: list[list[torch.Tensor]] = [[] for _ in blocks]
        spans: list[tuple[int, int, int]] = []

        def hook(i: int) -> Any:
            def record(module: nn.Module, args: tuple, output: Any) -> None:
                feats[i].append(pool(output[0] if isinstance(output, tuple) else output, spans, cfg.pooling))
            return record

        handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                spans[:] = sequence_spans(batch, pad_id)
                if spans:
                    model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}, use_cache=False)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        n_seq = sum(f.shape[0] for f in feats[0])
        if n_seq < 2:
            raise UserError(f"method.calibration_batches: CKA needs at least 2 calibration sequences, got {n_seq}; use more batches or data")
        cka = cka_matrix([torch.cat(f) for f in feats])
        local = cluster_adjacent(cka[middle][:, middle], n_clusters)
        clusters = [[middle[i] for i in c] for c in local]
        self.plan = CrashPlan(len(blocks), bottom, top, clusters, [representative(cka, c) for c in clusters], cka)

    def apply(self, model: nn.Module) -> nn.Module:
        plan = self.plan
        if plan is None:
            raise RuntimeError("crash: prepare(model, calibration batches) must run before apply (the loop does this)")
        owner, layers = _block_list(model)
        if len(layers) != plan.num_blocks:
            raise RuntimeError(f"crash: prepared on a model with {plan.num_blocks} blocks, applied to one with {len(layers)}")
        if self._originals is not None:
            raise UserError("method: crash was applied twice to one model")
        freeze_all(model)
        self._originals = {i: layers[i] for c in plan.clusters for i in c}
        for members, rep in zip(plan.clusters, plan.representatives, strict=True):
            for i in members:
                layers[i] = self._originals[rep]
            if len(members) > 1:
                self._repoint(self._originals[rep], members)
        for i in self._adapter_positions(plan):
            layers[i].requires_grad_(True)
        self._hooks.append(owner.register_forward_pre_hook(self._new_decoder_call))
        return model

    def _adapter_positions(self, plan: CrashPlan) -> list[int]:
        return list(range(plan.bottom)) + list(range(plan.num_blocks - plan.top, plan.num_blocks))

    def _new_decoder_call(self, module: nn.Module, args: tuple) -> None:
        for key in self._calls:
            self._calls[key] = 0

    def _repoint(self, shared: nn.Module, positions: list[int]) -> None:
        """Before each call of a shared block, point its attention's `layer_idx` (its cache slot) at the depth
        it runs at: the n-th call in a decoder forward is the n-th of its positions."""
        indexed = _indexed(shared)
        self._layer_idx += [(m, m.layer_idx) for m in indexed]
        key = id(shared)
        self._calls[key] = 0

        def pre(module: nn.Module, args: tuple) -> None:
            n = self._calls[key]
            self._calls[key] = n + 1
            for m in indexed:
                m.layer_idx = positions[n % len(positions)]

        self._hooks.append(shared.register_forward_pre_hook(pre))

    def _unshare(self, model: nn.Module) -> None:
        """Drop the hooks and give each shared block back its own depth as `layer_idx`."""
        for h in self._hooks:
            h.remove()
        for m, idx in self._layer_idx:
            m.layer_idx = idx
        self._hooks, self._calls, self._layer_idx = [], {}, []

    def expected_trainable(self, model: nn.Module) -> int:
        """The parameters of the adapter blocks (bottom and top), everything else frozen."""
        if self.plan is None:
            raise RuntimeError("crash: expected_trainable before prepare/apply")
        layers = _block_list(model)[1]
        return sum(p.numel() for i in self._adapter_positions(self.plan) for p in layers[i].parameters())

    def finalize(self, model: nn.Module) -> nn.Module:
        """Plug the original middle blocks back around the trained adapter blocks."""
        if self._originals is None:
            return model
        self._unshare(model)
        layers = _block_list(model)[1]
        for i, block in self._originals.items():
            layers[i] = block
        self._originals = None
        return model

    def merged(self, model: nn.Module) -> nn.Module:
        """The emulator as a plain model: each repeated block becomes its own copy (same outputs)."""
        if self._originals is None:
            return model
        self._unshare(model)
        layers = _block_list(model)[1]
        for members, rep in zip(self.plan.clusters, self.plan.representatives, strict=True):  # type: ignore[union-attr]
            for i in members:
                if i != rep:
                    layers[i] = copy.deepcopy(self._originals[rep])
                    for m in _indexed(layers[i]):
                        m.layer_idx = i
        self._originals = None
        return model

    def save_final(self, model: nn.Module, path: Path) -> None:
        if self._originals is not None or self.plan is None:
            raise RuntimeError("crash: save_final needs the full model that finalize() returned, not the emulator")
        super().save_final(model, path)
        (path / "crash_clusters.json").write_text(json.dumps(self.plan.to_json(), indent=2))
