"""Safe by default: without bubblewrap's isolation, model code is refused unless the user opted in explicitly."""

from __future__ import annotations

from typing import Any

import pytest

from tunelab.errors import UserError
from tunelab.evaluate import sandbox


@pytest.fixture
def weak_only(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A host where only rlimits isolation works (the real rlimits mode, so an allowed run really runs)."""
    iso = sandbox._probe("rlimits")
    assert iso is not None, sandbox._DETECT_ERRORS
    monkeypatch.setattr(sandbox, "_detect", lambda: iso)
    monkeypatch.delenv(sandbox.ALLOW_WEAK_ENV, raising=False)
    return iso


def test_weak_isolation_is_refused_with_one_line(weak_only: Any) -> None:
    for call in (lambda: sandbox.execute("assert True\n"), lambda: sandbox.execute_many(["assert True\n"]),
                 sandbox.check_isolation):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "bubblewrap" in msg
        assert "--allow-weak-sandbox" in msg and "eval.allow_weak_sandbox" in msg and sandbox.ALLOW_WEAK_ENV in msg


def test_explicit_opt_in_runs_with_the_weaker_mode(weak_only: Any) -> None:
    sandbox.allow_weak_isolation()
    try:
        result = sandbox.execute("assert 1 + 1 == 2\n", timeout=10)
        assert result.passed and result.isolation.startswith("rlimits")
    finally:
        sandbox.allow_weak_isolation(False)


def test_full_isolation_needs_no_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sandbox.ALLOW_WEAK_ENV, raising=False)
    if not sandbox.isolation_summary().startswith("bwrap"):
        pytest.fail(f"bubblewrap is not usable on this machine: {sandbox._DETECT_ERRORS}")  # CI installs it
    assert sandbox.execute("assert True\n").passed


def test_training_with_code_eval_is_refused_before_training(weak_only: Any, tmp_path: Any) -> None:
    from tunelab.config import validate
    from tunelab.train.loop import train

    cfg = validate({"model": {"name": "tiny-llama"}, "out": str(tmp_path / "run"),
                    "data": {"train": "builtin:code_instructions", "limit": 8},
                    "eval": {"tasks": [{"name": "humaneval", "limit": 1}]}, "train": {"max_steps": 1}})
    with pytest.raises(UserError, match="bubblewrap"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()  # refused at set-up: no half-made run left behind
    from tunelab.train.loop import _check_sandbox

    cfg.eval.tasks = []
    _check_sandbox(cfg, None)  # nothing executes code: nothing to refuse
    with pytest.raises(UserError, match="bubblewrap"):
        _check_sandbox(cfg, object())  # an online objective judges its rollouts in the sandbox
    cfg.eval.allow_weak_sandbox = True
    try:
        _check_sandbox(cfg, object())  # the config key is the opt-in
    finally:
        sandbox.allow_weak_isolation(False)


def test_cli_flag_is_the_opt_in(weak_only: Any) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app

    try:
        result = CliRunner().invoke(app, ["--allow-weak-sandbox", "list", "models"])
        assert result.exit_code == 0
        import os

        assert os.environ.get(sandbox.ALLOW_WEAK_ENV) == "1"
    finally:
        sandbox.allow_weak_isolation(False)
