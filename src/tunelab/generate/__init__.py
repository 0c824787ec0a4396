"""Batched generation: `Engine(model, tokenizer).generate(prompts, SamplingSettings(...))`.

Backends live in `generate/backends/` (transformers always; vLLM when installed and usable).
"""

from tunelab.generate.engine import Completion, Engine, Generated, SamplingSettings, cut_at_stop, generate

__all__ = ["Completion", "Engine", "Generated", "SamplingSettings", "cut_at_stop", "generate"]
