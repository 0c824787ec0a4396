"""Every registered method through the real loop on the tiny model, as a user runs it.

For each method: a 4-step run with a checkpoint at step 2; resuming from that checkpoint ends on the same
final weights bit for bit, and resuming from a perturbed copy does not (so the resume really loads it);
`tunelab.load(RUN)` rebuilds the tuned model whatever the saved format, and its logits differ from the base
model's; `tunelab export` writes a checkpoint that loads (full weights, or --merge where the method folds) and
refuses with one line where it cannot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tunelab
from tunelab.config import load_config
from tunelab.errors import UserError
from tunelab.export import export_run
from tunelab.methods import METHODS
from tunelab.models.presets import PRESETS
from tunelab.train.loop import train

# fields a method needs beyond its defaults (a required field, or a selection that is empty by default)
FIELDS: dict[str, dict[str, Any]] = {"freeze": {"top_layers": 1}, "peft": {"type": "ia3"}, "bitfit": {"add_biases": True}}
NEEDS_RUN = {"graft"}  # methods configured from another finished run (tested in their own files)
METHOD_NAMES = [n for n in METHODS.names() if n not in NEEDS_RUN]
OVER = ["train.max_steps=4", "train.save_every=2", "data.limit=24", "train.mixed_precision=no", "train.batch_size=2",
        "eval.before=false", "eval.after=false"]


def _config(name: str, out: Path) -> Any:
    method = METHODS.get(name)(METHODS.get(name).Config.model_validate({"name": name, **FIELDS.get(name, {})}))
    over = [*OVER, f"out={out}", f"data.packing={str(method.supports_packing).lower()}"]
    base = {"model": {"name": "tiny-llama"}, "data": {"train": "builtin:code_instructions", "max_length": 256, "valid_size": 0.25},
            "method": {"name": name, **FIELDS.get(name, {})}, "objective": {"name": "sft"}, "train": {"lr": 1e-2, "seed": 0}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return load_config(path, over)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run / "final").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert out, f"no weights in {run / 'final'}"
    return out


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, -ids.shape[1] :]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_trains_resumes_loads_and_exports(name: str, tmp_path: Path) -> None:
    a = tmp_path / "a"
    result = train(_config(name, a), quiet=True)
    info = json.loads((a / "final" / "tunelab.json").read_text())
    method = METHODS.get(name)(METHODS.get(name).Config.model_validate({"name": name, **FIELDS.get(name, {})}))
    assert info["saved_format"] == method.saved_format
    assert result.summary["trainable_params"] > 0
    want = _weights(a)

    for run_name, perturb in (("b", False), ("c", True)):
        run = tmp_path / run_name
        shutil.copytree(a, run)
        shutil.rmtree(run / "final")
        shutil.rmtree(run / "checkpoints" / "step-4")
        (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(a), str(run)))
        if perturb:
            f = run / "checkpoints" / "step-2" / "trainable.safetensors"
            save_file({k: v + 1e-3 for k, v in load_file(f).items()}, f)
        train(_config(name, run), resume=True, quiet=True)
        got = _weights(run)
        steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
        assert steps == [1, 2, 3, 4]
        same = got.keys() == want.keys() and all(torch.equal(want[k], got[k]) for k in want)
        assert same is not perturb, f"{run_name}: resumed weights {'differ' if not perturb else 'match despite the perturbed checkpoint'}"

    model, tok = tunelab.load(a)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b")])
    tuned = _logits(model, ids)
    base = _logits(PRESETS["tiny-llama"].model(dtype=torch.float32).eval(), ids)
    assert tuned.shape == base.shape and not torch.allclose(tuned, base)

    if method.saved_format == "full":
        dest = export_run(a, merge=False)
        assert torch.equal(_logits(_load_plain(dest), ids), tuned)
    else:
        with pytest.raises(UserError, match=r"--merge|tunelab\.load"):  # say how to get a model out instead
            export_run(a, merge=False)
    if method.mergeable and method.saved_format != "full":
        dest = export_run(a, merge=True)
        assert torch.allclose(_logits(_load_plain(dest), ids), tuned, atol=1e-4, rtol=0)
    elif not method.mergeable:
        with pytest.raises(UserError, match="cannot be folded"):
            export_run(a, merge=True)
        assert not (a / "merged").exists()


def _load_plain(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_load_of_an_unfinished_run_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no finished run"):
        tunelab.load(tmp_path)
