"""BitFit: train only the bias vectors of the model (and a randomly initialised task head).

Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models", ACL 2022, arXiv 2106.10199.

Maths: every layer y = W x + b (and LayerNorm y = g * norm(x) + b) keeps W (g) frozen and trains b only;
embeddings stay frozen. Trainable count = sum over the chosen layers of their output width, plus the task head.
- `variant: full`: every bias vector of the model (BERT: q, k, v, attention-output, intermediate and output
  dense biases, both LayerNorm biases, and also the embedding LayerNorm and pooler biases).
- `variant: partial`: only the query bias b_q and the FFN-intermediate bias b_m2 of every block (the paper's
  ~0.04% variant). Mapping by architecture: BERT `attention.self.query` / `intermediate.dense`; Llama, Qwen2,
  Mistral `q_proj` / `gate_proj` and `up_proj`; GPT-2 `mlp.c_fc` for b_m2.
- `train_head`: the paper trains the randomly initialised task head too. `auto` (default): the model's task
  head (a child named classifier, score or qa_outputs) when it has one, else nothing (a language model's
  head is pretrained, not a task head); `true`: the task head, else the output embeddings (the LM head; on
  a model with tied embeddings that is the input embedding matrix too); `false`: none.
- Learning rate: the run's `train.lr`; the paper uses about 1e-3 (grid 1e-4..1e-3), far above full FT's rates.

Choices of ours and deviations from the paper:
- SwiGLU splits BERT's intermediate projection (d -> d_ff, then the activation) into gate and up, both
  d -> d_ff; partial BitFit trains the biases of both, as they are together the intermediate map (a fused
  gate_up projection would carry one bias over both).
- GPT-2 fuses q, k, v into `c_attn` with one bias; partial BitFit there raises a UserError (use
  `variant: full`) rather than masking two thirds of a bias's gradient, which would make "trainable" mean
  less than `requires_grad` says.
- Causal LMs without biases (Llama: none; Qwen2: q/k/v only; RMSNorm never has one): BitFit would train
  nothing (full, Llama) or not its own variant (partial, Qwen2/Llama), so that is a UserError naming
  `method.add_biases`. With `add_biases: true` a zero-initialised bias (a tunelab module applied by a forward
  hook, so base parameter names do not change) is added to each chosen linear layer that has none: every
  linear layer inside the blocks for `full`, the partial set for `partial`. Outputs equal the base at init.
  Norm layers without a bias get none (that would change their type). `full` with `add_biases: false` on
  Qwen2 trains the q/k/v biases it has.
- Saving: without `add_biases` BitFit trains base tensors in place, so RUN/final holds full transformers
  weights (saved_format "full", mergeable). With `add_biases: true` the tuned model has tensors that a
  bias-free transformers Linear cannot hold (and a bias is affine, so it cannot be folded into W), so
  RUN/final is tunelab's format and `merged()` raises NotImplementedError; this follows the config, also on
  a model where nothing had to be added.
- `disabled()`: biases trained in place cannot be switched off. When every trained tensor is an added bias
  (a bias-free model, no head), `disabled()` switches the added biases off and `can_disable` is True; it is
  known only once `apply` has seen the model, so before that it reads False (the loop then precomputes the
  reference log-probs, which is always correct).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.methods._adapters import (
    AdapterModule,
    adapters_disabled,
    attach,
    decoder_blocks,
    freeze_all,
    load_tunelab,
    save_tunelab,
)
from tunelab.methods._base import Method

TASK_HEADS = ("classifier", "score", "qa_outputs")
# the paper's b_q and b_m2, by module path inside a block
_QUERY = re.compile(r"(^|\.)(q_proj|query|q|wq|q_lin)$")
_INTERMEDIATE = re.compile(r"(^|\.)(gate_proj|up_proj|gate_up_proj|c_fc|fc1|w1|w3|dense_h_to_4h)$|(^|\.)intermediate\.dense$")
_FUSED_QKV = re.compile(r"(^|\.)(c_attn|qkv_proj|query_key_value|Wqkv|qkv)$")


class BitFitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["bitfit"] = "bitfit"
    variant: Literal["full", "partial"] = Field(
        "full", description="full: every bias vector trains; partial: only the query and FFN-intermediate biases of each block"
    )
    add_biases: bool = Field(
        False, description="add zero-initialised biases to the chosen linear layers that have none (Llama, Qwen2's o/FFN); saved in tunelab format"
    )
    train_head: bool | Literal["auto"] = Field(
        "auto", description="auto: train the task head (classifier/score/qa_outputs) if the model has one; true: also the LM head otherwise; false: none"
    )


class AddedBias(AdapterModule):
    """A zero-initialised bias added to a bias-free layer's output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias


def _conv1d() -> type:
    # GPT-2's linear layer; imported here because importing transformers is slow and most commands do not need it
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def out_width(layer: nn.Module) -> int:
    """The length of the layer's bias: its output width."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, _conv1d()):
        return layer.nf
    if isinstance(layer, nn.LayerNorm):
        return int(torch.Size(layer.normalized_shape).numel())
    bias = layer.bias  # another layer type with its own bias (full variant): the bias is as long as the output
    assert isinstance(bias, torch.Tensor)
    return bias.numel()


def _has_bias(layer: nn.Module) -> bool:
    return isinstance(layer._parameters.get("bias"), nn.Parameter)


def _linear(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear | _conv1d())


def task_head(model: nn.Module, train_head: bool | Literal["auto"]) -> nn.Module | None:
    if train_head is False:
        return None
    for name, child in model.named_children():
        if name in TASK_HEADS:
            return child
    if train_head is True:
        out = model.get_output_embeddings()  # type: ignore[operator]
        if out is None:
            raise UserError(f"method.train_head: {type(model).__name__} has no task head ({', '.join(TASK_HEADS)}) and no output "
                            "embeddings; set train_head: auto or false")
        return out
    return None


def partial_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every block's query projection and FFN-intermediate projection(s)."""
    names = {id(m): n for n, m in model.named_modules()}
    found: list[tuple[str, nn.Module]] = []
    for block in decoder_blocks(model):
        subs = [(n, m) for n, m in block.named_modules() if n and _linear(m)]
        query = [(n, m) for n, m in subs if _QUERY.search(n)]
        inter = [(n, m) for n, m in subs if _INTERMEDIATE.search(n)]
        if not query and any(_FUSED_QKV.search(n) for n, _ in subs):
            raise UserError(f"method.variant: partial BitFit trains the query bias, but {type(block).__name__} fuses q, k and v into "
                            "one projection with one bias; use variant: full")
        if not query or not inter:
            raise UserError(f"method.variant: partial BitFit found no {'query' if not query else 'FFN-intermediate'} projection in "
                            f"{type(block).__name__} (layers: {[n for n, _ in subs]}); use variant: full")
        found += [(f"{names[id(block)]}.{n}", m) for n, m in query + inter]
    return found


def full_layers(model: nn.Module, skip: set[int], add_biases: bool) -> list[tuple[str, nn.Module]]:
    """Every layer with a bias outside the head, plus (when adding biases) the bias-free linear layers of the blocks."""
    in_blocks = {id(m) for b in decoder_blocks(model) for m in b.modules()} if add_biases else set()
    return [(n, m) for n, m in model.named_modules()
            if id(m) not in skip and not isinstance(m, AdapterModule) and (_has_bias(m) or (id(m) in in_blocks and _linear(m)))]


@METHODS.register("bitfit")
class BitFit(Method):
    """BitFit: only bias vectors (and the task head) train; optional zero-initialised biases for bias-free LMs."""

    Config = BitFitConfig
    identity_at_init = True

    def __init__(self, cfg: BaseModel) -> None:
        super().__init__(cfg)
        self._layers: list[tuple[str, nn.Module]] = []
        self._head: nn.Module | None = None
        self._switchable = False

    @property
    def saved_format(self) -> Literal["full", "tunelab"]:  # type: ignore[override]
        return "tunelab" if self.cfg.add_biases else "full"  # type: ignore[attr-defined]

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return not self.cfg.add_biases  # type: ignore[attr-defined]

    @property
    def can_disable(self) -> bool:  # type: ignore[override]
        return self._switchable

    def apply(self, model: nn.Module) -> nn.Module:
        cfg: BitFitConfig = self.cfg  # type: ignore[assignment]
        freeze_all(model)
        head = task_head(model, cfg.train_head)
        skip = {id(m) for m in head.modules()} if head is not None else set()
        layers = partial_layers(model) if cfg.variant == "partial" else full_layers(model, skip, cfg.add_biases)
        missing = [n for n, m in layers if not _has_bias(m)]
        if not cfg.add_biases and (missing or not layers):
            what = f"{len(missing)} of the chosen layers have no bias (e.g. {missing[0]})" if missing else "the model has no bias vectors"
            raise UserError(f"method.add_biases: {what}, so BitFit would not train its variant; set add_biases: true to add "
                            "zero-initialised biases (saved in tunelab format)")
        if not layers and head is None:
            raise UserError("method.add_biases: BitFit found no bias vector, no linear layer to add one to and no task head in this model")
        for _, layer in layers:
            if _has_bias(layer):
                layer.bias.requires_grad_(True)
            else:
                attach(layer, "bias", AddedBias(out_width(layer)), "sequential")
        if head is not None:
            head.requires_grad_(True)
        self._layers, self._head = layers, head
        self._switchable = head is None and len(missing) == len(layers)
        return model

    def expected_trainable(self, model: nn.Module) -> int:
        """sum over the chosen layers of their output width (one bias each), plus every tensor of the head."""
        n = sum(out_width(m) for _, m in self._layers)
        if self._head is not None:
            n += sum(p.numel() for p in {id(p): p for p in self._head.parameters()}.values())
        return n

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        if not self._switchable:
            raise NotImplementedError("bitfit trains biases (or a head) of the base model in place, so it cannot switch itself off; "
                                      "only a run whose trained biases are all added ones (add_biases on a bias-free model) can")
        with adapters_disabled(model):
            yield

    def merged(self, model: nn.Module) -> nn.Module:
        if self.cfg.add_biases:  # type: ignore[attr-defined]
            raise NotImplementedError("bitfit with add_biases: an added bias on a bias-free transformers layer has no place in "
                                      "the model's config and, being affine, cannot be folded into its weights")
        return model

    def _saved(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def save_final(self, model: nn.Module, path: Path) -> None:
        if self.saved_format == "full":
            return super().save_final(model, path)
        save_tunelab(model, path, self.cfg, self._saved(model))

    def load_final(self, base: nn.Module, path: Path) -> nn.Module:
        if self.saved_format == "full":
            return super().load_final(base, path)
        model = self.apply(base)
        return load_tunelab(model, path, set(self._saved(model)))
