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

Overrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. method.r=8 train.max_steps=50")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False) -> None:
    _DEBUG["on"] = debug


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
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """Train: data -> method -> objective -> checkpoints -> final adapter/weights -> report."""
    from tunelab.train.loop import train as run_train

    cfg = _config(config, overrides, out)
    result = run_train(cfg, resume=resume, overwrite=overwrite, quiet=quiet)
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
    for task, rows in (s.get("eval") or {}).items():
        t.add_row(f"eval {task}", rows)
    Console().print(t)


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


@app.command()
def quickstart(
    out: Annotated[str, typer.Option("--out", help="run directory")] = "runs/quickstart",
    steps: Annotated[int | None, typer.Option("--steps", help="override the number of training steps")] = None,
) -> None:
    """Fine-tune the embedded SmolLM2-135M-Instruct with LoRA on tunelab's code-instruction set."""
    from tunelab.quickstart import run_quickstart

    run_quickstart(out, steps)


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as e:
        if _DEBUG["on"]:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except NotImplementedError as e:
        if _DEBUG["on"]:
            raise
        typer.echo(f"error: not implemented: {e}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
