"""The `tunelab` command line: the only place that parses argv.

Every user mistake surfaces as a `UserError`: one line on stderr, exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tunelab.errors import UserError

app = typer.Typer(
    help="tunelab: fine-tune a language model and show, with evidence, that it got better.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
_DEBUG = {"on": False}

def _quiet_libraries() -> None:
    """tunelab's own progress and results only: transformers' weight-loading and GGUF bars, its info logs and
    the libraries' deprecation warnings stay hidden (set before they are imported; children inherit the env)."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow this switch
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch|accelerate|datasets)(\.|$)")


Overrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. method.r=8 train.max_steps=50")]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False,
    allow_weak_sandbox: Annotated[bool, typer.Option(
        "--allow-weak-sandbox", help="run model-written code even where bubblewrap's isolation is unavailable (weaker: rlimits / unshare only)")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="also show the libraries' own progress bars, logs and warnings")] = False,
) -> None:
    _DEBUG["on"] = debug
    if not verbose:
        _quiet_libraries()
    if allow_weak_sandbox:
        from tunelab.evaluate.sandbox import allow_weak_isolation

        allow_weak_isolation()


def _config(path: str | None, overrides: list[str] | None, out: str | None):  # noqa: ANN202
    from tunelab.config import load_config

    if path and "=" in path and not Path(path).exists():  # only overrides given
        overrides, path = [path, *(overrides or [])], None
    cfg = load_config(path, overrides)
    if out:
        cfg.out = out
    return cfg


@app.command()
def train(
    config: Annotated[str | None, typer.Argument(help="run config YAML")] = None,
    overrides: Overrides = None,
    out: Annotated[str | None, typer.Option("--out", help="run directory (default runs/<config name>)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run in --out")] = False,
    quiet: Quiet = False,
) -> None:
    """Train: data -> method -> objective -> checkpoints -> final adapter/weights -> report."""
    from tunelab.train.loop import train as run_train

    cfg = _config(config, overrides, out)
    result = run_train(cfg, resume=resume, overwrite=overwrite, quiet=quiet)
    if not result.main:  # another rank of a multi-process run: the main process reports
        raise typer.Exit(130 if result.interrupted else 0)
    if result.interrupted:
        typer.echo(f"stopped at step {result.summary['step']}; checkpoint saved. Continue with: --resume --out {result.run_dir}")
        raise typer.Exit(130)
    _print_summary(result.run_dir, result.summary)


def _print_summary(run_dir: Path, s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"run {run_dir}", show_header=False)
    t.add_row("final", str(run_dir / "final"))
    t.add_row("metrics", str(run_dir / "metrics.jsonl"))
    t.add_row("report", str(run_dir / "report.html"))
    t.add_row("trainable params", f"{s['trainable_params']:,} of {s['total_params']:,}")
    t.add_row("steps / tokens", f"{s['steps']} / {s['train_tokens']:,} ({s['tokens_per_s'] or 0:,.0f} tok/s)")
    if s.get("val_loss_before") is not None:
        t.add_row("validation loss", f"{s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}")
    for v in s.get("verdicts") or []:
        t.add_row(f"verdict: {v['what']}", v["verdict"])
    for task_dir in sorted((run_dir / "eval").glob("*")):
        scores = []
        for label in ("before", "after"):
            f = task_dir / label / "summary.json"
            if f.is_file():
                metrics = json.loads(f.read_text()).get("metrics", {})
                scores.append(f"{label} " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float | int)))
        if scores:
            t.add_row(f"eval {task_dir.name}", " -> ".join(scores))
    Console().print(t)


@app.command()
def compare(
    grid: Annotated[str, typer.Argument(help="grid YAML: base run config + cells (method/objective/train overrides)")],
    overrides: Overrides = None,
    quiet: Quiet = False,
) -> None:
    """Train every cell of a grid on the same data, steps, seed and eval; writes compare.md/json/png (resumable).

    Overrides (key.sub=value) change the shared base config, e.g. train.max_steps=10."""
    from tunelab.compare import run_grid

    out = run_grid(Path(grid), quiet=quiet, overrides=overrides)
    typer.echo((out / "compare.md").read_text())
    typer.echo(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")


@app.command()
def search(
    space: Annotated[str, typer.Argument(help="search YAML: base run config + method templates with distributions")],
    quiet: Quiet = False,
) -> None:
    """AutoPEFT search: optuna multi-objective over method configs; Pareto front of score vs trainable params (resumable)."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        from tunelab.errors import UserError

        raise UserError("tunelab search needs optuna: pip install 'tunelab[search]'")
    from tunelab.search import run_search

    out = run_search(Path(space), quiet=quiet)
    typer.echo((out / "search.md").read_text())
    typer.echo(f"wrote {out / 'search.md'}, {out / 'pareto.json'}, {out / 'search.png'}")


@app.command()
def config(
    config: Annotated[str | None, typer.Argument(help="run config YAML")] = None,
    overrides: Overrides = None,
    schema: Annotated[bool, typer.Option("--schema", help="print the JSON schema instead")] = False,
) -> None:
    """Validate a config and print it resolved (no model is loaded)."""
    import yaml

    from tunelab.config import json_schema

    if schema:
        typer.echo(json.dumps(json_schema(), indent=2))
        return
    typer.echo(yaml.safe_dump(_config(config, overrides, None).dump(), sort_keys=False), nl=False)


@app.command("list")
def list_(what: Annotated[str, typer.Argument(help="methods | objectives | tasks | models")] = "methods") -> None:
    """List registered parts with their fields and defaults."""
    from tunelab.listing import render

    typer.echo(render(what))


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="run directory")],
    merge: Annotated[bool, typer.Option("--merge", help="fold the adapter into the base weights")] = False,
    out: Annotated[str | None, typer.Option("--out", help="output dir (default RUN/merged or RUN/export)")] = None,
) -> None:
    """Write the tuned model as a standalone transformers checkpoint (safetensors + tokenizer)."""
    from tunelab.export import export_run

    path = export_run(Path(run), merge=merge, out=Path(out) if out else None)
    typer.echo(f"wrote {path}")


def _eval_model(spec: str, backend: str) -> tuple[object, object, str | None, str | None, str]:
    """(model or None, tokenizer, weights dir, adapter dir, backend) for `tunelab eval`.

    A run directory (RUN/final/tunelab.json) means base + tuned weights; anything else is a model name. When
    vLLM will generate, the transformers model is not loaded at all (vLLM loads the weights itself).
    """
    import torch

    from tunelab.config import ModelConfig
    from tunelab.generate.backends import vllm_usable, weights_on_disk
    from tunelab.models import load_model, load_tokenizer

    run, device = Path(spec), "cuda" if torch.cuda.is_available() else "cpu"
    if (run / "final" / "tunelab.json").is_file():
        from tunelab.export import run_info

        info = run_info(run)
        mcfg = ModelConfig(**info["model"])
        if info["saved_format"] == "peft":
            path, adapter = weights_on_disk(mcfg.name), str(run / "final")
        elif info["saved_format"] == "full":
            path, adapter = str(run / "final"), None
        else:  # tunelab's own adapter format: only tunelab's loader (hf backend) rebuilds it
            path, adapter = None, str(run / "final")
    else:
        mcfg, path, adapter = ModelConfig(name=spec), weights_on_disk(spec), None
    if backend == "vllm" or (backend == "auto" and path is not None and vllm_usable()):
        return None, load_tokenizer(mcfg), path, adapter, "vllm"
    if adapter is not None or path == str(run / "final"):
        from tunelab.export import load_tuned

        model, tok, _ = load_tuned(run, device)
        return model, tok, None, None, "hf"
    model, tok = load_model(mcfg, device)
    return model, tok, None, None, "hf"


@app.command("eval")
def eval_(
    model_arg: Annotated[str | None, typer.Argument(metavar="[MODEL | RUN_DIR]", help="model name/path, or a run directory (base + tuned weights)")] = None,
    model: Annotated[str | None, typer.Option("--model", help="same as the positional argument")] = None,
    task: Annotated[list[str], typer.Option("--task", help="task name (repeatable): humaneval, mbpp, codetasks, generation")] = ["humaneval"],  # noqa: B006
    data: Annotated[str | None, typer.Option("--data", help="data file for tasks that take a path (mbpp, codetasks, generation)")] = None,
    split: Annotated[str | None, typer.Option("--split", help="dataset split (mbpp: prompt, test, validation, train, all)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="only the first N problems")] = None,
    n_samples: Annotated[int | None, typer.Option("--n-samples", help="completions per problem")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="0 = greedy")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="tokens per completion")] = None,
    prompt_mode: Annotated[str | None, typer.Option("--prompt-mode", help="chat | completion | fewshot (mbpp) | auto")] = None,
    out: Annotated[str | None, typer.Option("--out", help="output dir (default: the run dir, else runs/eval)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="rows decoded at once (continuous batching: a finished row makes room for the next)")] = 16,
    backend: Annotated[str, typer.Option("--backend", help="auto | hf | vllm")] = "auto",
    quiet: Quiet = False,
) -> None:
    """Evaluate a model or a trained run on benchmark tasks; writes OUT/eval/<task>/eval/{summary.json,samples.jsonl}."""
    from pydantic import ValidationError

    from tunelab.evaluate.tasks import TASKS

    spec = model or model_arg
    if spec is None or (model and model_arg):
        raise UserError("eval: give exactly one model: a name/path/run directory, positionally or with --model")
    given = {"limit": limit, "n_samples": n_samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
             "prompt_mode": prompt_mode, "path": data, "split": split}
    configs = []
    for name in task:
        fields = TASKS.config_class(name).model_fields if name in TASKS else {}
        extra = [k for k, v in given.items() if v is not None and k not in fields and name in TASKS]
        if extra:
            flags = ", ".join("--data" if k == "path" else "--" + k.replace("_", "-") for k in extra)
            raise UserError(f"eval: task '{name}' takes no {flags}")
        try:
            configs.append(TASKS.parse({"name": name, **{k: v for k, v in given.items() if v is not None}}, "--task"))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(map(str, err["loc"]))
            raise UserError(f"eval: task '{name}': {loc + ': ' if loc else ''}{err['msg']}") from None
    for cfg in configs:  # read every task's data now: a bad file should not wait for a model to load
        TASKS.get(cfg.name)(cfg).problems()  # type: ignore[attr-defined]
    run_dir = Path(out) if out else Path(spec) if (Path(spec) / "final" / "tunelab.json").is_file() else Path("runs/eval")
    # imported only now: it pulls in torch, and argument mistakes above should fail fast
    from tunelab.evaluate.runner import evaluate_tasks

    mdl, tok, path, adapter, used = _eval_model(spec, backend)
    summaries = evaluate_tasks(mdl, tok, configs, run_dir, "eval", batch_size=batch_size, backend=used,
                               model_path=path, adapter_path=adapter, quiet=quiet)
    _print_eval(run_dir, summaries)


def _print_eval(run_dir: Path, summaries: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for key, s in summaries.items():
        t = Table(title=f"eval {key}", show_header=False)
        for name, value in s["metrics"].items():
            t.add_row(name, f"{value:.4f}")
        t.add_row("problems x samples", f"{s['n_problems']} x {s['n_samples']} ({s['settings']['decoding']})")
        t.add_row("wall time", f"{s['wall_s']:.1f} s")
        console.print(t)
        # plain echo: paths must not be wrapped or ellipsised by the table layout
        for warning in s.get("warnings") or []:
            console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
        folder = run_dir / "eval" / key / s["label"]
        typer.echo(f"samples: {folder / 'samples.jsonl'}\nsummary: {folder / 'summary.json'}")


data_app = typer.Typer(help="Build training data: preference pairs from the model's own samples, ...", no_args_is_help=True)
app.add_typer(data_app, name="data")


# options shared by the data builders that sample from a model
SampleModel = Annotated[str, typer.Argument(metavar="MODEL | RUN_DIR", help="the model to sample from (the one you will tune)")]
CodeTask = Annotated[str, typer.Option("--task", help="code task judged by execution: mbpp, humaneval, codetasks")]
TaskData = Annotated[str | None, typer.Option("--data", help="the task's data file (mbpp: mbpp.jsonl)")]
TrainSplit = Annotated[str | None, typer.Option("--split", help="dataset split (default train, for tasks with splits)")]
Samples = Annotated[int, typer.Option("--k", help="samples per problem")]
Temperature = Annotated[float, typer.Option("--temperature", help="sampling temperature")]
NewTokens = Annotated[int, typer.Option("--max-new-tokens", help="tokens per sample")]
Limit = Annotated[int | None, typer.Option("--limit", help="only the first N problems")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="rows decoded at once")]
Seed = Annotated[int, typer.Option("--seed", help="sampling seed")]
Quiet = Annotated[bool, typer.Option("--quiet", help="no progress bar")]


def _training_task(task: str, data: str | None, split: str | None, **fields: object):  # noqa: ANN202
    """The task config a data builder samples from: the given fields the task has, split `train` by default (a
    builder writes training data, so never the test split unless asked); the data file is read now, so a bad one
    fails before the model loads."""
    from tunelab.evaluate.tasks import TASKS

    known = TASKS.config_class(task).model_fields if task in TASKS else {}
    fields |= {"path": data, "split": split if split is not None or "split" not in known else "train"}
    cfg = TASKS.parse({"name": task, **{f: v for f, v in fields.items() if v is not None and f in known}}, "--task")
    TASKS.get(task)(cfg).problems()  # type: ignore[attr-defined]
    return cfg


@data_app.command("build-pairs")
def build_pairs_(
    model: SampleModel,
    out: Annotated[str, typer.Option("--out", help="pairs JSONL to write (prompt, chosen, rejected)")],
    task: CodeTask = "mbpp",
    data: TaskData = None,
    split: TrainSplit = None,
    k: Samples = 8,
    temperature: Temperature = 0.8,
    max_new_tokens: NewTokens = 384,
    limit: Limit = None,
    per_problem: Annotated[int, typer.Option("--per-problem", help="pairs per problem (distinct failing samples)")] = 1,
    reference_chosen: Annotated[bool, typer.Option("--reference-chosen/--no-reference-chosen", help="where no sample passes, the reference solution is chosen")] = True,
    batch_size: BatchSize = 16,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Sample k programs per problem, judge them in the sandbox, write passing/failing pairs for DPO-like objectives."""
    if k < 2 and not reference_chosen:
        raise UserError("data build-pairs: --k must be >= 2 to find both a passing and a failing sample")
    cfg = _training_task(task, data, split, n_samples=k, temperature=temperature, max_new_tokens=max_new_tokens, limit=limit, seed=seed)
    from tunelab.data.build_pairs import build_pairs

    mdl, tok, _, _, _ = _eval_model(model, "hf")
    stats = build_pairs(mdl, tok, cfg, Path(out), batch_size=batch_size, per_problem=per_problem,
                        reference_chosen=reference_chosen, quiet=quiet)
    typer.echo(json.dumps(stats, indent=2))


@data_app.command("gold")
def gold_(
    out: Annotated[str, typer.Option("--out", help="SFT rows JSONL to write (messages, or prompt + completion)")],
    task: Annotated[str, typer.Option("--task", help="task whose problems and reference answers to write: mbpp, humaneval, codetasks, generation")] = "mbpp",
    data: TaskData = None,
    split: Annotated[list[str] | None, typer.Option("--split", help="split to include; repeat for several (default train)")] = None,
    prompt_mode: Annotated[str, typer.Option("--prompt-mode", help="the prompt the rows use, as the task's prompt_mode (mbpp: chat or fewshot)")] = "chat",
    limit: Limit = None,
) -> None:
    """Write a task's problems with their reference answers as SFT rows, in the exact prompt the task evaluates with (no model needed)."""
    from tunelab.data.build_gold import write_gold
    from tunelab.evaluate.tasks import TASKS

    if prompt_mode == "auto":
        raise UserError("data gold: --prompt-mode must name the mode (chat, or the task's plain mode such as fewshot); "
                        "auto depends on a model's tokenizer")
    tasks = []
    for s in split or [None]:
        cfg = _training_task(task, data, s, prompt_mode=prompt_mode, limit=limit)
        tasks.append((getattr(cfg, "split", None), TASKS.get(task)(cfg)))  # type: ignore[operator]
    typer.echo(json.dumps(write_gold(tasks, Path(out)), indent=2))


@data_app.command("s3ft")
def s3ft_(
    model: Annotated[str, typer.Argument(metavar="MODEL | RUN_DIR", help="the base model (the one you will tune)")],
    out: Annotated[str, typer.Option("--out", help="SFT rows JSONL to write (messages, source, problem_id)")],
    task: Annotated[str, typer.Option("--task", help="task that judges answers: mbpp, humaneval, codetasks (sandbox), generation (text metric)")] = "mbpp",
    data: TaskData = None,
    split: TrainSplit = None,
    limit: Limit = None,
    paraphrase: Annotated[bool, typer.Option("--paraphrase/--no-paraphrase", help="ask the model to restate the gold where its own answer fails")] = True,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens per answer")] = 512,
    batch_size: BatchSize = 16,
    quiet: Quiet = False,
) -> None:
    """S3FT data (arXiv 2502.08130): the model's own answer if judged correct, else its accepted paraphrase of the gold, else the gold; train with objective sft."""
    cfg = _training_task(task, data, split, n_samples=1, temperature=0.0, max_new_tokens=max_new_tokens, limit=limit)
    from tunelab.data.build_s3ft import build_s3ft

    mdl, tok, _, _, _ = _eval_model(model, "hf")
    stats = build_s3ft(mdl, tok, cfg, Path(out), paraphrase=paraphrase, batch_size=batch_size, quiet=quiet)
    typer.echo(json.dumps(stats, indent=2))


@data_app.command("refusal-aware")
def refusal_aware_(
    model: Annotated[str, typer.Argument(metavar="MODEL | RUN_DIR", help="the pre-trained model (the one you will tune)")],
    data: Annotated[str, typer.Option("--data", help='QA JSONL: {"question", "answer"} per line')],
    out: Annotated[str, typer.Option("--out", help="SFT rows JSONL to write (prompt, completion)")],
    variant: Annotated[str, typer.Option("--variant", help="unsure: gold + 'I am sure/unsure.'; unknown: refusal for unknown questions")] = "unsure",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens per greedy answer")] = 15,
    limit: Annotated[int | None, typer.Option("--limit", help="only the first N questions")] = None,
    batch_size: BatchSize = 16,
    seed: Annotated[int, typer.Option("--seed", help="seed for picking refusal sentences (unknown variant)")] = 0,
) -> None:
    """R-Tuning data (arXiv 2311.09677): split QA into known/unknown by the model's greedy answers, write refusal-aware rows."""
    from tunelab.data.build_rtuning import build_rtuning, load_qa

    if variant not in ("unsure", "unknown"):
        raise UserError(f"data refusal-aware: --variant must be unsure or unknown, got {variant!r}")
    if max_new_tokens < 1 or (limit is not None and limit < 1):
        raise UserError("data refusal-aware: --max-new-tokens and --limit must be at least 1")
    load_qa(data)  # a bad data file fails before the model loads
    mdl, tok, _, _, _ = _eval_model(model, "hf")
    stats = build_rtuning(mdl, tok, data, Path(out), variant=variant, max_new_tokens=max_new_tokens,  # type: ignore[arg-type]
                          batch_size=batch_size, limit=limit, seed=seed)
    typer.echo(json.dumps(stats, indent=2))


@data_app.command("feedback")
def feedback_(
    model: SampleModel,
    out: Annotated[str, typer.Option("--out", help="feedback JSONL to write (prompt, attempt, reward, feedback)")],
    task: CodeTask = "mbpp",
    data: TaskData = None,
    split: TrainSplit = None,
    k: Samples = 8,
    temperature: Temperature = 0.8,
    max_new_tokens: NewTokens = 384,
    limit: Limit = None,
    coarse: Annotated[bool, typer.Option("--coarse", help="binary feedback only: no error text (the paper's coarse-grained ablation)")] = False,
    batch_size: BatchSize = 16,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """LeTI data (arXiv 2305.10314): sample k programs per problem, judge them in the sandbox, write one row per sample with its reward and error feedback; train with objective leti."""
    if k < 1:
        raise UserError("data feedback: --k must be at least 1")
    cfg = _training_task(task, data, split, n_samples=k, temperature=temperature, max_new_tokens=max_new_tokens, limit=limit, seed=seed)
    from tunelab.data.build_feedback import build_feedback

    mdl, tok, _, _, _ = _eval_model(model, "hf")
    stats = build_feedback(mdl, tok, cfg, Path(out), batch_size=batch_size, coarse=coarse, quiet=quiet)
    typer.echo(json.dumps(stats, indent=2))


@app.command()
def quickstart(
    out: Annotated[str, typer.Option("--out", help="run directory")] = "runs/quickstart",
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="override the number of training steps")] = None,
) -> None:
    """Fine-tune the embedded SmolLM2-135M-Instruct with LoRA on tunelab's code-instruction set."""
    from tunelab.quickstart import run_quickstart

    run_quickstart(out, steps)


def main() -> None:
    try:
        # non-standalone click returns the code of a `typer.Exit` raised in a command instead of exiting
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as e:
        if _DEBUG["on"]:
            raise
        _error(f"error: {e}")
        sys.exit(e.exit_code)
    except NotImplementedError as e:
        if _DEBUG["on"]:
            raise
        _error(f"error: not implemented: {e}")
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors come through here in non-standalone mode
        if isinstance(e, _usage_errors()):
            e.show()  # type: ignore[attr-defined]
            sys.exit(2)
        raise


def _error(line: str) -> None:
    """One error line; in a multi-process run every rank meets the same error, and the main one says it."""
    from tunelab.train.dist import launched_rank

    if launched_rank() == 0:
        typer.echo(line, err=True)


def _usage_errors() -> tuple[type[Exception], ...]:
    """click's usage errors; typer >= 0.20 raises those of its own vendored click copy instead."""
    import click

    found: list[type[Exception]] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as Vendored
    except ImportError:
        pass
    else:
        found.append(Vendored)
    return tuple(found)


if __name__ == "__main__":
    main()
