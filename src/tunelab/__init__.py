"""tunelab: fine-tune a language model and prove, with evidence, that it got better."""

__version__ = "0.1.0"
