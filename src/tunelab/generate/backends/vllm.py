"""vLLM backend (optional extra `tunelab[vllm]`): fast batched generation on CUDA from weights on disk.

UNTESTED in tunelab's own test suite: vLLM is not installed where the tests run (it needs CUDA and a
matching torch build). The code follows vLLM's documented offline API (`LLM`, `SamplingParams`,
`LoRARequest`, token-id prompts); please report mismatches with your vLLM version.

vLLM loads the model itself, so it evaluates what is on disk: `model_path` is the base model (a directory
or hub id) and `adapter_path` an optional saved PEFT LoRA adapter, applied through `LoRARequest`. Prompts
are passed as token ids produced by tunelab's own tokenization, so both backends see identical inputs.
vLLM batches continuously, so it takes large chunks of rows at once (`min_batch_rows`). Each row gets its
own seed (`engine.row_seed`), which makes sampled outputs reproducible for the same inputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.generate.engine import Completion, SamplingSettings, cut_at_stop

_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values vLLM accepts


def _lora_rank(adapter: Path) -> int:
    cfg = adapter / "adapter_config.json"
    if not cfg.is_file():
        raise UserError(f"{adapter}: not a PEFT adapter directory (adapter_config.json missing)")
    info = json.loads(cfg.read_text())
    if str(info.get("peft_type", "")).upper() != "LORA":
        raise UserError(f"{adapter}: vLLM serves LoRA adapters only (this one is {info.get('peft_type')}); use --backend hf")
    rank = max([int(info.get("r", 8)), *map(int, (info.get("rank_pattern") or {}).values())])
    return next((r for r in _LORA_RANKS if r >= rank), rank)


class VLLMBackend:
    name = "vllm"
    min_batch_rows = 512

    def __init__(self, model_path: str, tokenizer: Any, *, adapter_path: str | None = None) -> None:
        from vllm import LLM

        self.tokenizer = tokenizer
        kw: dict[str, Any] = {}
        self.lora = None
        if adapter_path:
            from vllm.lora.request import LoRARequest

            kw = {"enable_lora": True, "max_lora_rank": _lora_rank(Path(adapter_path))}
            self.lora = LoRARequest("tunelab-adapter", 1, str(adapter_path))
        # the HF model of the caller may still occupy the GPU; leave it room
        self.llm = LLM(model=str(model_path), dtype="auto", gpu_memory_utilization=0.8, seed=0, **kw)

    def generate(
        self, rows: list[list[int]], settings: SamplingSettings, seeds: list[int], batch_size: int
    ) -> Iterator[list[tuple[int, Completion]]]:
        from vllm import SamplingParams

        # vLLM schedules its own continuous batch; big chunks keep it full while results still stream out
        chunk = max(batch_size, self.min_batch_rows)
        sampling = {} if settings.greedy else {"top_p": settings.top_p}
        for start in range(0, len(rows), chunk):
            part = range(start, min(start + chunk, len(rows)))
            params = [
                SamplingParams(
                    n=1, temperature=settings.temperature, max_tokens=settings.max_new_tokens,
                    stop=list(settings.stop) or None, seed=seeds[i], skip_special_tokens=True, **sampling,
                )
                for i in part
            ]
            prompts = [{"prompt_token_ids": rows[i]} for i in part]
            outs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
            yield [(i, self._completion(o.outputs[0], settings)) for i, o in zip(part, outs, strict=True)]

    @staticmethod
    def _completion(out: Any, settings: SamplingSettings) -> Completion:
        # vLLM already strips the stop string; cutting again keeps the rule identical to the hf backend
        text, hit = cut_at_stop(out.text, settings.stop)
        if hit or isinstance(out.stop_reason, str):
            reason = "stop"
        else:
            reason = "length" if out.finish_reason == "length" else "eos"
        return Completion(text, len(out.token_ids), reason)  # type: ignore[arg-type]
