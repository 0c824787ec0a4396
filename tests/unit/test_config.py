"""Strict config: unknown keys with suggestions, type errors, YAML overrides, plugin switching, schema, round trip."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.config import RunConfig, apply_override, load_config, validate
from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "sft_lora.yaml"


def test_unknown_method_key_names_dotted_key_and_suggests_r() -> None:
    with pytest.raises(UserError) as e:
        load_config(CONFIG, ["method.rr=4"])
    msg = str(e.value)
    assert "method.rr" in msg
    assert "did you mean 'method.r'" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("data", "key", "suggestion"),
    [
        ({"trian": {}}, "trian", "train"),
        ({"train": {"max_step": 3}}, "train.max_step", "train.max_steps"),
        ({"data": {"pakcing": True}}, "data.pakcing", "data.packing"),
        ({"objective": {"name": "sft", "label_smothing": 0.1}}, "objective.label_smothing", "objective.label_smoothing"),
    ],
)
def test_unknown_keys_everywhere_suggest_the_closest(data: dict, key: str, suggestion: str) -> None:
    with pytest.raises(UserError, match=f"'{key}'; did you mean '{suggestion}'"):
        validate(data)


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    with pytest.raises(UserError) as e:
        validate({"method": {"name": "lora", "zzzzzz": 1}})
    assert "'method.zzzzzz'" in str(e.value)
    assert "target_modules" in str(e.value)  # the valid keys are listed


def test_unknown_method_name_suggests() -> None:
    with pytest.raises(UserError, match="did you mean 'lora'"):
        validate({"method": {"name": "lorra"}})


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"method": {"name": "lora", "r": "big"}}, "method.r"),
        ({"data": {"packing": "maybe"}}, "data.packing"),
        ({"data": {"format": "csv-ish"}}, "data.format"),
    ],
)
def test_wrong_type_is_one_line_naming_the_key(data: dict, where: str) -> None:
    with pytest.raises(UserError) as e:
        validate(data)
    msg = str(e.value)
    assert where in msg
    assert "\n" not in msg


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(CONFIG, [
        "train.lr=1e-4", "data.packing=false", "method.target_modules=[q_proj, v_proj]", "train.max_grad_norm=null",
        "method.r=4", "train.adam_betas=[0.8, 0.9]",
    ])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.packing is False
    assert cfg.method.target_modules == ["q_proj", "v_proj"]  # type: ignore[attr-defined]
    assert cfg.train.max_grad_norm is None
    assert cfg.method.r == 4  # type: ignore[attr-defined]
    assert cfg.train.adam_betas == (0.8, 0.9)
    # untouched values come from the file
    assert cfg.method.alpha == 16  # type: ignore[attr-defined]
    assert cfg.out == "runs/sft_lora"


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(UserError, match="key.sub=value"):
        load_config(CONFIG, ["train.lr"])


def test_switching_method_name_drops_old_fields() -> None:
    cfg = load_config(CONFIG, ["method.name=full"])
    assert cfg.method.name == "full"  # type: ignore[attr-defined]
    assert set(cfg.dump()["method"]) == {"name"}
    # then new fields of the new plugin are accepted
    cfg = load_config(CONFIG, ["method.name=freeze", "method.top_layers=1"])
    assert cfg.method.top_layers == 1  # type: ignore[attr-defined]


def test_setting_same_method_name_keeps_fields() -> None:
    cfg = load_config(CONFIG, ["method.name=lora"])
    assert cfg.method.r == 8  # type: ignore[attr-defined]


def test_apply_override_creates_sections_and_switches_string_plugins() -> None:
    data: dict = {"method": "lora"}
    apply_override(data, "method.r=2")
    assert data == {"method": {"name": "lora", "r": 2}}
    apply_override(data, "train.seed=3")
    assert data["train"] == {"seed": 3}


def test_schema_cli_is_json_with_every_method_and_objective(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from tunelab.cli import main

    monkeypatch.setattr(sys, "argv", ["tunelab", "config", "--schema"])
    main()
    schema = json.loads(capsys.readouterr().out)
    method_titles = {s["properties"]["name"]["const"] for s in schema["properties"]["method"]["oneOf"]}
    assert method_titles == set(METHODS.names())
    objective_titles = {s["properties"]["name"]["const"] for s in schema["properties"]["objective"]["oneOf"]}
    assert objective_titles == set(OBJECTIVES.names())
    lora = next(s for s in schema["properties"]["method"]["oneOf"] if s["properties"]["name"]["const"] == "lora")
    assert {"r", "alpha", "target_modules", "dora"} <= set(lora["properties"])
    assert lora["additionalProperties"] is False
    for section in ("model", "data", "train", "eval"):
        assert section in schema["properties"]


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(CONFIG, ["train.lr=3e-4", "method.target_modules=[q_proj]", "data.train=x.jsonl"])
    text = yaml.safe_dump(cfg.dump(), sort_keys=False)
    (tmp_path / "resolved.yaml").write_text(text)
    again = load_config(tmp_path / "resolved.yaml")
    assert again.dump() == cfg.dump()
    assert again == cfg
    assert isinstance(again, RunConfig)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: tiny-llama\ntrain: [\n")
    with pytest.raises(UserError, match="bad.yaml:.*invalid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_defaults_resolve_to_lora_sft() -> None:
    cfg = validate({})
    assert cfg.method.name == "lora" and cfg.objective.name == "sft"  # type: ignore[attr-defined]


# run configs; configs/compare holds grids and search spaces (tests/unit/test_shipped_grids.py validates those),
# configs/accelerate launcher configs (tests/unit/test_dist.py)
RUN_CONFIGS = sorted(p for p in CONFIG.parents[1].rglob("*.yaml") if not {"compare", "accelerate"} & set(p.parts))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_their_data_resolves(path: Path) -> None:
    from tunelab.data.sources import resolve

    cfg = load_config(path)
    assert cfg.method.name in METHODS and cfg.objective.name in OBJECTIVES  # type: ignore[attr-defined]
    if cfg.data.train and cfg.data.train.startswith("builtin:"):
        assert Path(resolve(cfg.data.train)).is_file()
