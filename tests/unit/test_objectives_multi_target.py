"""multi_target_loss against hand-computed values; the MultiTarget objective against per-sequence NLLs."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from tunelab.data.batching import Unit, get_batcher
from tunelab.data.templating import IGNORE, Encoded
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.multi_target import multi_target_loss


def _refused(k: int) -> str:
    """The exact refusal (the whole message) for data that does not hold k targets per prompt in order."""
    msg = f"multi_target: expected {k} targets per prompt, in order; the data has another count (set objective.weights)"
    return f"^{re.escape(msg)}$"


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
    with pytest.raises(ValueError, match=_refused(3)):
        multi_target_loss(torch.zeros(4), torch.tensor([0, 1, 0, 1]), torch.ones(3))


def test_targets_out_of_order_are_refused() -> None:
    # the count divides evenly, but the targets are not 0..k-1 prompt by prompt
    with pytest.raises(ValueError, match=_refused(2)):
        multi_target_loss(torch.zeros(4), torch.tensor([0, 1, 1, 0]), torch.ones(2))


def test_loss_keeps_the_logps_dtype() -> None:
    # float64 weights do not widen float32 log-probs (the weights are cast to them)
    losses, _ = multi_target_loss(torch.tensor([-0.5, -2.0]), torch.tensor([0, 1]), torch.tensor([1.0, 0.25], dtype=torch.float64))
    assert losses.dtype == torch.float32 and losses.tolist() == [1.0]


def test_target_order_check_follows_the_inputs_device() -> None:
    """On an accelerator the inputs' device is not the default one; here the default is meta, the inputs CPU."""
    mean, index, weights = torch.tensor([-0.5, -2.0]), torch.tensor([0, 1]), torch.tensor([1.0, 3.0])
    with torch.device("meta"):
        losses, metrics = multi_target_loss(mean, index, weights)
    assert losses.device.type == "cpu" and losses.tolist() == [6.5]
    assert metrics == {"nll/target_0": 0.5, "nll/target_1": 2.0}


def _mean_nll(model: Any, s: Encoded) -> float:
    """Mean token NLL of one sequence's labels, from a forward over that sequence alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0, :-1]
    target = torch.tensor(s.labels[1:])
    keep = target != IGNORE
    return torch.nn.functional.cross_entropy(logits[keep], target[keep]).item()


def test_objective_weighs_per_target_mean_nll(samples: list[Encoded], make_model: Any) -> None:
    model = make_model().train()
    cls = OBJECTIVES.get("multi_target")
    assert cls.Config().weights == [1.0, 1.0]
    obj = cls(cls.Config(weights=[2.0, 0.5]))
    assert obj.batch_format == "multi_target" and obj.loss_items == "units" and not obj.needs_reference
    nll = [_mean_nll(model, s) for s in samples[:4]]
    units = [Unit(samples[0:2], sid=4), Unit(samples[2:4], sid=9)]
    # two prompts, padded or packed: sum over prompts of 2 * NLL_0 + 0.5 * NLL_1, over the step's prompts
    for packed in (False, True):
        batch = get_batcher("multi_target").collate([units[:1], units[1:]] if packed else [units], 2, packed)
        assert batch["target_index"].tolist() == [0, 1, 0, 1] and obj.num_items(batch) == 2
        loss, metrics = obj.loss(model, batch, 2)
        want = (2 * nll[0] + 0.5 * nll[1] + 2 * nll[2] + 0.5 * nll[3]) / 2
        assert loss.item() == pytest.approx(want, rel=1e-5)
        assert metrics == pytest.approx({"nll/target_0": (nll[0] + nll[2]) / 2, "nll/target_1": (nll[1] + nll[3]) / 2}, rel=1e-5)
    loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
    # one prompt (num_items 1): its loss undivided; as one of 3 prompts in the step: a third of it
    one = get_batcher("multi_target").collate([units[1:]], 2, False)
    assert obj.loss(model, one, 1)[0].item() == pytest.approx(2 * nll[2] + 0.5 * nll[3], rel=1e-5)
    assert obj.loss(model, one, 3)[0].item() == pytest.approx((2 * nll[2] + 0.5 * nll[3]) / 3, rel=1e-5)
