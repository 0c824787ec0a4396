"""Benchmark tasks, one file each; a task turns dataset rows into prompts and scores completions."""

from tunelab.registry import Registry, load_plugins

TASKS: Registry = Registry("eval task")

load_plugins(__name__, __path__)
