"""The Objective base class's own state: the schedule position an objective sees before and during training."""

from __future__ import annotations

from tunelab.objectives import OBJECTIVES


def test_schedule_starts_at_step_zero_and_follows_on_step() -> None:
    """Objectives with a schedule (masked_thought's ramped rate) read `step / total_steps`: before the loop's
    first `on_step` (e.g. a validation pass at step 0) they must be at the schedule's start."""
    cls = OBJECTIVES.get("masked_thought")
    obj = cls(cls.Config())
    assert (obj.step, obj.total_steps) == (0, 1)
    obj.on_step(7, 20)
    assert (obj.step, obj.total_steps) == (7, 20)
