"""Single sequences (supervised fine-tuning): chat `messages`, prompt/completion, alpaca or plain `text` rows.

The row format is detected from the first row (or set by `data.format`) and holds for the whole file; loss
falls on the tokens `data.loss_on` selects. One unit = one sequence; loss items are label tokens.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.batching._base import Batcher, EncodeContext, Unit, register
from tunelab.data.formats import detect_format, to_example
from tunelab.data.templating import encode


@register("sft")
class SFTBatcher(Batcher):
    def encode(self, row: dict[str, Any], location: str, ctx: EncodeContext) -> Unit | str:
        if "fmt" not in ctx.state:
            ctx.state["fmt"] = detect_format(row, location) if ctx.cfg.format == "auto" else ctx.cfg.format
        ex = to_example(row, ctx.state["fmt"], location, ctx.cfg.system_prompt)
        return Unit([encode(ctx.tok, ex, template=ctx.template, loss_on=ctx.cfg.loss_on)])
