"""Generation backends: `hf` (transformers, always available) and `vllm` (optional extra).

A backend decodes token-id rows and yields `(row index, Completion)` pairs as rows finish:
`generate(rows, settings, seeds, batch_size)`, one sampling seed per row. `auto`
picks vLLM only when it is importable, CUDA is available and the weights are on disk (`model_path`);
otherwise transformers. Both apply the same stop-string rule, so results have the same form either way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from tunelab.errors import UserError, missing_extra


class Backend(Protocol):
    name: str

    def generate(self, rows: list[list[int]], settings: Any, seeds: list[int], batch_size: int) -> Iterator[list[tuple[int, Any]]]: ...


def vllm_usable() -> bool:
    """vLLM is installed and there is a CUDA device for it (checked without importing vLLM)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def make_backend(
    kind: str, model: Any, tokenizer: Any, *, model_path: str | None = None, adapter_path: str | None = None
) -> Backend:
    if kind not in ("auto", "hf", "vllm"):
        raise UserError(f"generation backend '{kind}' is unknown (choose auto, hf or vllm)")
    use_vllm = kind == "vllm" or (kind == "auto" and model_path is not None and vllm_usable())
    if use_vllm:
        if importlib.util.find_spec("vllm") is None:
            raise missing_extra("vllm", "vllm", "the vllm generation backend")
        if model_path is None:
            raise UserError("the vllm backend loads weights from disk: it needs the model's directory (model_path)")
        from tunelab.generate.backends.vllm import VLLMBackend

        return VLLMBackend(model_path, tokenizer, adapter_path=adapter_path)
    if model is None:
        raise UserError("the hf generation backend needs a loaded model")
    from tunelab.generate.backends.hf import HFBackend

    return HFBackend(model, tokenizer)


def weights_on_disk(name: str) -> str | None:
    """The directory (or hub id) holding the weights of model `name` as tunelab loads it, if there is one.

    Presets built in memory (tiny test models) and GGUF files (dequantized while loading) have none that
    another engine could load identically.
    """
    from tunelab.models.presets import PRESETS

    if name in PRESETS:
        path_fn = PRESETS[name].path
        return str(path_fn()) if path_fn is not None else None
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        return None
    if p.is_dir():
        return str(p) if (p / "config.json").is_file() else None
    return name  # a hub id: vLLM resolves it through the same HF cache
