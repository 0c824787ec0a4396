"""Trainable-parameter count of every registered method on the embedded model (SmolLM2-135M-Instruct), from
`Method.tune` on the real model, checked against the method's own formula (`expected_trainable`), next to the
fraction its paper reports where our notes (shared/docs/METHODS.md) give one.

    python benchmarks/method_params.py            # writes benchmarks/results/method_params.{json,md}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tunelab.methods import METHODS
from tunelab.methods._base import count_params
from tunelab.models.presets import PRESETS, SMOLLM_NAME

RESULTS = Path(__file__).resolve().parent / "results"
# the method configs measured: defaults, plus what a method needs (bitfit on a bias-free model, freeze's layers)
CONFIGS: dict[str, dict[str, Any]] = {
    "full": {}, "freeze": {"top_layers": 2}, "lora": {"r": 16}, "peft-ia3": {"name": "peft", "type": "ia3"},
    "peft-prompt_tuning": {"name": "peft", "type": "prompt_tuning"}, "peft-prefix_tuning": {"name": "peft", "type": "prefix_tuning"},
    "houlsby": {}, "pfeiffer": {}, "parallel_adapter": {}, "mam": {}, "compacter": {}, "compacter_pp": {},
    "dept": {}, "ept": {}, "bitfit": {"add_biases": True}, "hft": {}, "crash": {},
}
# what the papers report (METHODS.md); None: no figure in our notes
PAPER = {
    "lora": None, "peft-ia3": "~0.01% (T0-3B, Liu et al. 2022)", "houlsby": "~3.6% per task (BERT-large, Houlsby et al. 2019)",
    "mam": "6.7% (XSum) / 3.7% (MT) of BART/mBART-large", "compacter": "0.047% (T5-base)", "compacter_pp": "0.047% family (T5-base)",
    "bitfit": "0.08-0.09% (BERT; biases exist there)", "hft": "50% of the block parameters", "dept": "budget of a 100-token prompt (T5-base)",
}


def main() -> None:
    rows = []
    for label, fields in CONFIGS.items():
        name = fields.get("name", label)
        cls = METHODS.get(name)
        method = cls(cls.Config.model_validate({"name": name, **{k: v for k, v in fields.items() if k != "name"}}))
        model = PRESETS[SMOLLM_NAME].model(dtype=torch.float32)
        if method.calibration_batches:  # CRaSh measures layer similarity first
            ids = torch.randint(3, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
            method.prepare(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
        t0 = time.perf_counter()
        model = method.tune(model)
        trainable, total = count_params(model)
        expected = method.expected_trainable(model)
        rows.append({"method": label, "config": fields, "trainable": trainable, "total": total,
                     "percent": 100 * trainable / total, "formula": expected, "formula_matches": expected in (None, trainable),
                     "paper": PAPER.get(label), "apply_s": round(time.perf_counter() - t0, 2)})
        print(f"{label:22s} {trainable:>12,} {100 * trainable / total:9.4f}%  formula {expected}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "method_params.json").write_text(json.dumps(rows, indent=2))
    lines = ["# Trainable parameters on SmolLM2-135M-Instruct", "",
             "`python benchmarks/method_params.py`: each method's defaults (config column) applied to the embedded model; "
             "`formula` is the method's own analytic count (`expected_trainable`), which must equal the real count.", "",
             "| method | config | trainable | % of model | formula = count | paper reports |", "|---|---|---|---|---|---|"]
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k != "name") or "defaults"
        ok = "n/a (peft's own)" if r["formula"] is None else ("yes" if r["formula_matches"] else f"NO ({r['formula']:,})")
        lines.append(f"| {r['method']} | {cfg} | {r['trainable']:,} | {r['percent']:.4f} | {ok} | {r['paper'] or '-'} |")
    (RESULTS / "method_params.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
