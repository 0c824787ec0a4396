"""Sharded data parallel (`train.fsdp: true`): torch's FSDP2 (`fully_shard`) under the same loop.

Each decoder block and then the root are sharded over all processes, so every rank holds 1/N of the weights,
gradients and optimizer state; a block's parameters are gathered for its forward and backward only. FSDP2
shards in place and keeps parameter names, so per-group learning rates, the methods' parameter groups and the
reference-model switch work unchanged. tunelab applies FSDP2 itself (not through accelerate, which on CPU only
offers DDP), so the same path runs on CPUs over gloo and on GPUs over NCCL.

What changes against DDP, all here:
- checkpoints: the trainable tensors and the optimizer state are gathered in full to the main process, which
  writes them in the usual files (the optimizer state keyed by parameter name, so a sharded run resumes sharded,
  on any number of processes); resuming scatters them back (`set_model_state_dict` / `set_optimizer_state_dict`);
- validation runs on every rank in lockstep (a sharded forward is a collective);
- evaluation, `Method.finalize` and the final save need the whole model: its full state is gathered to the main
  process, which builds one unsharded copy (the same construction, under a forked RNG so the training streams do
  not move) and uses it alone. That copy costs the main process one model's memory for the duration.

Loading: only the main process reads the base weights. The other ranks build the architecture on the meta device
(no memory) from the main process's config, tune it the same way, shard it, allocate their shards and receive
them from the main process (`set_model_state_dict(broadcast_from_rank0)`, buffers by broadcast). So no rank but
the main one ever holds the whole model. Exception: an objective whose `prepare` reads the model's weights
(self-distillation) has every rank load them.

Tested (tests/e2e/test_multiprocess.py, 2 processes over gloo): LoRA, against one process with doubled
accumulation, and stop + resume bit-identical. Not yet: CPU offload of the shards, methods that calibrate on data
before tuning (refused), and no-sync accumulation (gradients are reduce-scattered after every micro-batch:
correct, more communication).
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.methods._adapters import decoder_blocks
from tunelab.train.dist import Dist


def shard(model: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world,))
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def skeleton(model_cfg: Any, config: Any) -> torch.nn.Module:
    """The main process's architecture on the meta device: shapes only, no memory, no weights read."""
    from transformers import AutoModelForCausalLM

    from tunelab.models import resolve_dtype

    kw: dict[str, Any] = {"dtype": resolve_dtype(model_cfg.dtype), "trust_remote_code": model_cfg.trust_remote_code}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kw)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def fill_from_main(model: torch.nn.Module, main_state: dict[str, torch.Tensor], dist: Dist, device: torch.device) -> None:
    """After sharding: ranks that built a meta skeleton allocate their shards; the main process's weights (its
    full, pre-shard state) are scattered to every rank, and every buffer (rotary tables are not in a state dict)
    is broadcast."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if on_meta(model):
        model.to_empty(device=device)
    set_model_state_dict(model, main_state if dist.is_main else {}, options=_options(broadcast_from_rank0=True))
    for buf in model.buffers():
        torch.distributed.broadcast(buf, src=0)


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model: torch.nn.Module, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Every rank calls this; the main process gets the full tensors (CPU), the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    return {k: v for k, v in state.items() if keys is None or k in keys}


def full_optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Scatter full tensors (read by every rank from the checkpoint) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, tensors, options=_options(strict=False))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


def scalar(x: Any) -> float:
    """A float from a plain tensor or a DTensor (the gradient norm of sharded gradients is one)."""
    from torch.distributed.tensor import DTensor

    return float(x.full_tensor() if isinstance(x, DTensor) else x)


def unsharded_copy(model: torch.nn.Module, build: Any) -> torch.nn.Module | None:
    """Every rank calls this; the main process gets an unsharded model with the sharded model's current weights
    (`build()` constructs the same architecture, e.g. load the base and apply the method), the others None."""
    state = full_state(model)
    if not state:
        return None
    with torch.random.fork_rng(devices=[]):  # building draws random inits: keep the training RNG where it was
        copy = build()
    missing, unexpected = copy.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"unsharded copy does not match the sharded model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return copy
