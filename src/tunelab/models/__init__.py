"""Model loading: presets (the embedded SmolLM2, tiny test models), local dirs, GGUF files, hub ids.

Nothing here reaches for the network unless the user named a hub id, and then an offline machine fails
fast with a message saying so.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch

from tunelab.config import ModelConfig
from tunelab.errors import UserError
from tunelab.models.presets import PRESETS

__all__ = ["load_model", "load_tokenizer", "resolve_dtype", "PRESETS"]


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _source(name: str) -> tuple[str, dict[str, Any]]:
    """Where transformers should load `name` from: (path_or_id, extra kwargs)."""
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model.name: GGUF file not found: {p}")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"model.name: {p} is a directory without config.json (not a transformers model)")
        return str(p), {}
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise UserError(f"model.name: path not found: {p}")
    # a hub id: use the local HF cache if it has it, else the network, if any
    from transformers.utils import cached_file

    try:
        cached_file(name, "config.json", local_files_only=True)
        return name, {"local_files_only": True}
    except Exception:
        pass
    if not _hub_reachable():
        raise UserError(
            f"model.name: '{name}' is not a preset ({', '.join(PRESETS)}), local directory or .gguf file, and "
            "the Hugging Face hub is unreachable (offline); download the model elsewhere and pass its directory"
        )
    return name, {}


def load_tokenizer(cfg: ModelConfig) -> Any:
    if cfg.name in PRESETS:
        return PRESETS[cfg.name].tokenizer()
    from transformers import AutoTokenizer

    src, kw = _source(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code, **kw)
    except Exception as e:  # transformers raises many types for a bad model dir
        raise UserError(f"model.name: could not load a tokenizer from '{cfg.name}': {e}") from None
    return _fix_pad(tok)


def _fix_pad(tok: Any) -> Any:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) on `device`, in the configured dtype."""
    dtype = resolve_dtype(cfg.dtype)
    kw: dict[str, Any] = {"dtype": dtype}
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
        if cfg.attn_implementation == "tunelab_packed":
            from tunelab.models.attention import register

            register()
    if cfg.name in PRESETS:
        model = PRESETS[cfg.name].model(**kw)
    else:
        from transformers import AutoModelForCausalLM

        src, extra = _source(cfg.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=cfg.trust_remote_code, **kw, **extra)
        except (OSError, ValueError) as e:
            raise UserError(f"model.name: could not load '{cfg.name}': {e}") from None
        # a GGUF model remembers its quantization config though its weights are now dequantized tensors
        if extra.get("gguf_file"):
            from tunelab.models.presets import _forget_gguf

            _forget_gguf(model)
    tok = load_tokenizer(cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.to(device), tok
