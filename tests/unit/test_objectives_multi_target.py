"""multi_target_loss against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from tunelab.objectives.multi_target import multi_target_loss


def test_weighted_sum_of_per_target_nll() -> None:
    # two prompts, targets [code, rationale]: mean log-probs -0.5, -2.0 and -1.0, -0.25
    mean = torch.tensor([-0.5, -2.0, -1.0, -0.25])
    losses, metrics = multi_target_loss(mean, torch.tensor([0, 1, 0, 1]), torch.tensor([1.0, 0.5]))
    assert losses.tolist() == pytest.approx([0.5 + 0.5 * 2.0, 1.0 + 0.5 * 0.25])
    assert metrics == pytest.approx({"nll/target_0": 0.75, "nll/target_1": 1.125})


def test_gradient_follows_the_weights() -> None:
    mean = torch.tensor([-0.5, -2.0], requires_grad=True)
    losses, _ = multi_target_loss(mean, torch.tensor([0, 1]), torch.tensor([1.0, 3.0]))
    losses.sum().backward()
    assert mean.grad.tolist() == [-1.0, -3.0]


def test_wrong_target_count_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 3 targets per prompt"):
        multi_target_loss(torch.zeros(4), torch.tensor([0, 1, 0, 1]), torch.ones(3))
