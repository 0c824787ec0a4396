"""tunelab: fine-tune a language model and prove, with evidence, that it got better."""

__version__ = "0.1.0"


def load(run_dir: str, device: str = "cpu"):  # type: ignore[no-untyped-def]  # noqa: ANN201
    """The tuned model and tokenizer of a finished run, whatever method trained it (see tunelab.export.load)."""
    from tunelab.export import load as _load

    return _load(run_dir, device)
