"""The quickstart's config: its held-out code tasks are exactly the builtin rows it does not train on."""

from __future__ import annotations

from tunelab.quickstart import quickstart_config


def test_quickstart_evaluates_on_rows_it_never_trains_on(tmp_path) -> None:  # noqa: ANN001
    cfg = quickstart_config(str(tmp_path / "qs"), steps=None)
    assert cfg.data.train == "builtin:code_instructions" and cfg.data.limit == 180
    tasks = {t.name: t for t in cfg.eval.tasks}  # type: ignore[attr-defined]
    assert set(tasks) == {"humaneval", "codetasks"}
    held_out = tasks["codetasks"]
    assert held_out.path == cfg.data.train and held_out.skip == cfg.data.limit  # type: ignore[attr-defined]
    assert cfg.eval.before and cfg.eval.after
    assert quickstart_config(str(tmp_path / "q2"), steps=3).train.max_steps == 3
