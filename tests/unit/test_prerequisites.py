"""The suite's policy for what CI must have (../shared data, bubblewrap, sandbox modes): a missing one fails the
test; only an explicit opt-out (TUNELAB_TESTS_ALLOW_SKIP=1) turns that into a skip."""

from __future__ import annotations

import pytest
from conftest import ALLOW_SKIP, MBPP_FILE, need


def test_missing_prerequisite_fails_unless_opted_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_SKIP, raising=False)
    with pytest.raises(pytest.fail.Exception, match="thing is missing .*TUNELAB_TESTS_ALLOW_SKIP=1 skips"):
        need(False, "thing is missing")
    monkeypatch.setenv(ALLOW_SKIP, "1")
    with pytest.raises(pytest.skip.Exception, match="thing is missing"):
        need(False, "thing is missing")
    need(True, "present: returns quietly")


def test_the_mbpp_data_the_suite_uses_is_here() -> None:
    need(MBPP_FILE.is_file(), f"MBPP data not found at {MBPP_FILE}")
    assert sum(1 for _ in MBPP_FILE.open(encoding="utf-8")) == 974
