"""`tunelab list`: registered parts with their fields and defaults, from the registries themselves."""

from __future__ import annotations

from tunelab.errors import UserError


def _registry(what: str):  # noqa: ANN202
    if what == "methods":
        from tunelab.methods import METHODS

        return METHODS
    if what == "objectives":
        from tunelab.objectives import OBJECTIVES

        return OBJECTIVES
    if what == "tasks":
        from tunelab.evaluate.tasks import TASKS

        return TASKS
    raise UserError(f"cannot list '{what}': choose methods, objectives, tasks or models")


def render(what: str) -> str:
    if what == "models":
        from tunelab.models.presets import PRESETS

        lines = [f"{n:24s} {p.description}" for n, p in PRESETS.items()]
        return "\n".join(lines + ["(or any local transformers dir, .gguf file, or hub id when online)"])
    reg = _registry(what)
    out = []
    for name in reg.names():
        d = reg.describe(name)
        out.append(f"{name}: {d['summary']}")
        for fname, f in d["fields"].items():
            default = "required" if f["required"] else f"default {f['default']!r}"
            out.append(f"    {fname}: {f['type']} ({default}) {f['help']}".rstrip())
        if what == "methods":
            out.extend(f"    {line}" for line in reg.get(name).listing_notes())
    return "\n".join(out)
