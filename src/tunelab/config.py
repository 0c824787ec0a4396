"""Run configuration: YAML + dotted overrides -> one strict, typed `RunConfig`.

Every section forbids unknown keys; an unknown key is reported as one line naming the dotted key and the
closest valid one. Swappable sections (`method`, `objective`, eval tasks) are keyed by `name` and validated
by the config class that the named plugin owns, so a plugin adds its own fields without editing this file.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from tunelab.errors import UserError, read_utf8


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    name: str = Field("smollm2-135m-instruct", description="preset name, local dir, .gguf file, or hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = float32 on CPU, bfloat16 on GPUs that support it"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    attn_implementation: str | None = Field(
        None, description="e.g. sdpa, eager, flash_attention_2, tunelab_packed; unset = per-sample attention for "
        "packed rows on CPU (tunelab_packed, checked against the model's own), the model's default otherwise")
    trust_remote_code: bool = Field(False, description="allow custom modelling code from the model dir")


class DataConfig(Strict):
    train: str | None = Field(None, description="JSONL/JSON/CSV/Parquet file, saved dataset dir, builtin:NAME, or hub id")
    valid: str | None = Field(None, description="validation source; default: hold out `valid_size` of train")
    valid_size: float = Field(0.05, ge=0, description="held-out part of train: a fraction (<1) or a count (>=1)")
    split: str = Field("train", description="split to read when the source is a `datasets` dataset")
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "text"] = Field(
        "auto", description="row format; auto detects it from the first row's keys"
    )
    template: Literal["auto", "chat", "raw"] = Field(
        "auto", description="chat = the model's chat template; raw = plain concatenation; auto = chat if the tokenizer has one"
    )
    system_prompt: str | None = Field(None, description="system message added to every conversation that has none")
    loss_on: Literal["assistant", "last_turn", "all"] = Field(
        "assistant", description="which tokens carry loss: every assistant turn, the last one, or all tokens"
    )
    max_length: int = Field(1024, gt=8, description="tokens per sample (and per packed row)")
    truncation: Literal["drop", "truncate"] = Field(
        "drop", description="samples over max_length: drop them (counted, reported) or cut them (labels cut alike)"
    )
    packing: bool = Field(True, description="pack samples into full rows; samples never attend to each other")
    limit: int | None = Field(None, gt=0, description="use only the first N rows (for quick trials)")


class TrainConfig(Strict):
    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0, description="passes over the data; ignored when max_steps is set")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(8, gt=0, description="rows per micro-batch (packed rows when packing)")
    batch_tokens: int | None = Field(
        None, gt=0, description="size micro-batches by tokens instead of rows: rows of similar length grouped so "
        "rows x the widest <= batch_tokens (bounds memory by construction; overrides batch_size)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, description="clip the global grad norm; null disables")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="autocast; auto = bf16 on GPUs and CPUs with native bf16 (AVX512-BF16/AMX), else none"
    )
    seed: int = 0
    save_every: int = Field(100, ge=0, description="checkpoint every N steps (0: only at the end / on signal)")
    keep_last: int = Field(2, gt=0, description="checkpoints kept on disk")
    eval_every: int = Field(0, ge=0, description="validation loss every N steps (0: before and after only)")
    log_every: int = Field(1, gt=0)
    tensorboard: bool = True
    trackers: list[str] = Field(default_factory=list, description="extra accelerate trackers: wandb, mlflow, ...")
    num_threads: int | None = Field(None, description="torch CPU threads; default: all cores")
    layer_lr_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise lr decay xi: block l of L trains at lr * xi^(L-1-l), embeddings at lr * xi^L"
    )
    reinit_top_layers: int = Field(0, ge=0, description="re-initialise the top k blocks before tuning (they must train)")
    fsdp: bool = Field(
        False, description="several processes: shard weights, gradients and optimizer state across them (FSDP2, "
        "each decoder block and the root) instead of replicating the model (DDP)")
    reference: Literal["auto", "adapter", "precomputed"] = Field(
        "auto",
        description="reference log-probs for DPO-like objectives: the model with its adapter off (no second copy), "
        "precomputed once with the base weights and cached, or auto (adapter when the method can switch off)",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_not_false(cls, v: Any) -> Any:
        return "no" if v is False else v  # `mixed_precision: no` in YAML 1.1 arrives as False


class EvalConfig(Strict):
    tasks: list[SerializeAsAny[BaseModel]] = Field(default_factory=list, description="benchmark tasks, each {name: ...}")
    before: bool = Field(True, description="evaluate the base model before training")
    after: bool = Field(True, description="evaluate the tuned model after training")
    every: int = Field(0, ge=0, description="also evaluate every N steps (0: off)")
    allow_weak_sandbox: bool = Field(
        False, description="run model-written code even where bubblewrap's isolation is unavailable (weaker isolation)"
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, v: Any) -> Any:
        from tunelab.evaluate.tasks import TASKS

        return [TASKS.parse(t, f"eval.tasks[{i}]") for i, t in enumerate(v or [])]


class RunConfig(Strict):
    name: str | None = Field(None, description="run name; the default out dir is runs/<name>")
    out: str | None = Field(None, description="run directory (default runs/<name or config file stem>)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: SerializeAsAny[BaseModel] = Field(default_factory=lambda: {"name": "lora"})  # type: ignore[arg-type]
    objective: SerializeAsAny[BaseModel] = Field(default_factory=lambda: {"name": "sft"})  # type: ignore[arg-type]
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> BaseModel:
        from tunelab.methods import METHODS

        return METHODS.parse(v, "method", default="lora")

    @field_validator("objective", mode="before")
    @classmethod
    def _objective(cls, v: Any) -> BaseModel:
        from tunelab.objectives import OBJECTIVES

        return OBJECTIVES.parse(v, "objective", default="sft")

    def dump(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


# ---------------------------------------------------------------------------------------------- loading


def _section_class(cls: type[BaseModel], key: str, value: Any) -> type[BaseModel] | None:
    """The config class that validates `value` found at `cls.key` (resolving `name`-keyed plugins)."""
    if cls is RunConfig and key in ("method", "objective"):
        from tunelab.methods import METHODS
        from tunelab.objectives import OBJECTIVES

        reg, default = (METHODS, "lora") if key == "method" else (OBJECTIVES, "sft")
        name = value.get("name", default) if isinstance(value, dict) else None
        return reg.config_class(name) if name in reg else None
    if key == "task" and _is_online(cls):  # an objective's online rollout task (objectives/_online.py)
        from tunelab.evaluate.tasks import TASKS

        name = value.get("name") if isinstance(value, dict) else None
        return TASKS.config_class(name) if name in TASKS else None
    ann = cls.model_fields[key].annotation
    if value is not None and typing.get_origin(ann) in (typing.Union, types.UnionType):  # an optional section: X | None
        ann = next((a for a in typing.get_args(ann) if a is not type(None)), ann)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _is_online(cls: type[BaseModel]) -> bool:
    from tunelab.objectives._online import OnlineConfig

    return cls is OnlineConfig


def check_keys(cls: type[BaseModel], data: Any, prefix: str = "") -> None:
    """Reject unknown keys with a suggestion, before pydantic produces a multi-line error."""
    if not isinstance(data, dict) or cls.model_config.get("extra") != "forbid":
        return
    valid = list(cls.model_fields)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in cls.model_fields:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f" (valid: {', '.join(valid)})"
            raise UserError(f"unknown config key '{dotted}'{hint}")
        sub = _section_class(cls, key, value)
        if sub is not None:
            check_keys(sub, value, dotted + ".")
        elif key == "tasks" and cls is EvalConfig and isinstance(value, list):
            from tunelab.evaluate.tasks import TASKS

            for i, t in enumerate(value):
                if isinstance(t, dict) and t.get("name") in TASKS:
                    check_keys(TASKS.config_class(t["name"]), t, f"{prefix}tasks[{i}].")


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 1e-4, true, [a, b] work)."""
    if "=" not in item:
        raise UserError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw  # YAML 1.1 reads yes/no/on/off as booleans; on the command line they are words
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {} if nxt is None else {"name": nxt} if isinstance(nxt, str) else nxt
            node[part] = nxt
        node = nxt
    if parts[-1] == "name" and node.get("name") not in (None, value):
        # switching plugin: fields of the old one would be unknown to the new one
        node.clear()
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(read_utf8(p)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: the config must be a mapping of sections (model:, data:, method:, ...)")
    return data


def validate(data: dict[str, Any], source: str = "config") -> RunConfig:
    check_keys(RunConfig, data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        got = err.get("input")
        got_s = f" (got {got!r})" if not isinstance(got, dict | list) else ""
        raise UserError(f"{source}: {loc}: {err['msg']}{got_s}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path) if path else {}
    for item in overrides or []:
        apply_override(data, item)
    cfg = validate(data, str(path) if path else "config")
    if cfg.out is None:
        stem = cfg.name or (Path(path).stem if path else "run")
        cfg.out = str(Path("runs") / stem)
    return cfg


def json_schema() -> dict[str, Any]:
    """JSON schema for editors: the static sections plus a oneOf over every registered plugin config."""
    from tunelab.evaluate.tasks import TASKS
    from tunelab.methods import METHODS
    from tunelab.objectives import OBJECTIVES

    schema = RunConfig.model_json_schema()
    for key, reg in (("method", METHODS), ("objective", OBJECTIVES)):
        schema["properties"][key] = {"oneOf": [reg.config_class(n).model_json_schema() for n in reg.names()]}
    tasks = {"oneOf": [TASKS.config_class(n).model_json_schema() for n in TASKS.names()]}
    schema.setdefault("$defs", {})["EvalConfig"]["properties"]["tasks"] = {"type": "array", "items": tasks}
    return schema
