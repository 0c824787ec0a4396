"""Pairwise objectives (DPO family, SimPO, ORPO, ASFT): hand-computed values, edge cases, gradient signs,
parity with trl on identical log-probs, and the Objective classes on fake pairwise batches."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from tunelab.objectives import OBJECTIVES, _pairwise, asft, dpo, orpo, simpo
from tunelab.objectives._logprobs import SeqLogps
from tunelab.objectives.asft import asft_loss
from tunelab.objectives.dpo import DPOConfig, dpo_loss
from tunelab.objectives.orpo import orpo_loss
from tunelab.objectives.simpo import simpo_loss

CPU = torch.device("cpu")


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def nls(x: float) -> float:
    """-log sigma(x) = log(1 + e^-x), by hand."""
    return math.log1p(math.exp(-x))


def log_odds(avg: float) -> float:
    """log(p / (1 - p)) for p = exp(avg), in float64."""
    return avg - math.log(1 - math.exp(avg))


# ---------------------------------------------------------------- DPO family: hand-computed values
# chosen log-ratios [1, 0.5, -1], rejected log-ratios [-0.5, 0.5, 1] -> h = [1.5, 0, -2]
PC, PR = t(-10.0, -5.0, -8.0), t(-12.0, -4.0, -8.0)
RC, RR = t(-11.0, -5.5, -7.0), t(-11.5, -4.5, -9.0)
H = [1.5, 0.0, -2.0]


def run_dpo(variant: str, beta: float = 0.1, eps: float = 0.0) -> list[float]:
    return dpo_loss(PC, PR, RC, RR, beta=beta, variant=variant, label_smoothing=eps)[0].tolist()


def test_dpo_sigmoid_hand_computed() -> None:
    assert run_dpo("sigmoid") == pytest.approx([nls(0.15), math.log(2), nls(-0.2)], abs=1e-6)


def test_ipo_hand_computed() -> None:
    # (h - 1/(2 beta))^2 with 1/(2 * 0.1) = 5
    assert run_dpo("ipo") == pytest.approx([3.5**2, 5.0**2, 7.0**2], abs=1e-4)
    assert run_dpo("ipo", beta=0.5) == pytest.approx([0.25, 1.0, 9.0], abs=1e-5)


def test_hinge_hand_computed() -> None:
    assert run_dpo("hinge") == pytest.approx([0.85, 1.0, 1.2], abs=1e-6)
    assert run_dpo("hinge", beta=1.0) == pytest.approx([0.0, 1.0, 3.0], abs=1e-6)  # margin met: no loss


def test_cdpo_hand_computed_and_zero_eps_is_sigmoid() -> None:
    eps = 0.2
    expected = [(1 - eps) * nls(0.1 * h) + eps * nls(-0.1 * h) for h in H]
    assert run_dpo("cdpo", eps=eps) == pytest.approx(expected, abs=1e-6)
    assert run_dpo("cdpo", eps=0.0) == pytest.approx(run_dpo("sigmoid"), abs=1e-7)


def test_robust_hand_computed_and_unbiased() -> None:
    eps = 0.2
    expected = [((1 - eps) * nls(0.1 * h) - eps * nls(-0.1 * h)) / (1 - 2 * eps) for h in H]
    assert run_dpo("robust", eps=eps) == pytest.approx(expected, abs=1e-6)
    assert run_dpo("robust", eps=0.0) == pytest.approx(run_dpo("sigmoid"), abs=1e-7)
    # unbiased: averaging over labels flipped with probability eps recovers the clean DPO loss
    flipped = dpo_loss(PR, PC, RR, RC, beta=0.1, variant="robust", label_smoothing=eps)[0].tolist()
    mixed = [(1 - eps) * a + eps * b for a, b in zip(run_dpo("robust", eps=eps), flipped, strict=True)]
    assert mixed == pytest.approx(run_dpo("sigmoid"), abs=1e-6)


def test_dpo_metrics_hand_computed() -> None:
    _, m = dpo_loss(PC, PR, RC, RR, beta=0.1, variant="sigmoid")
    # rewards: chosen 0.1 * [1, 0.5, -1], rejected 0.1 * [-0.5, 0.5, 1]; only pair 0 has chosen > rejected
    assert m["rewards/chosen"] == pytest.approx(0.05 / 3, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(0.1 / 3, abs=1e-6)
    assert m["rewards/accuracy"] == pytest.approx(1 / 3)
    assert m["rewards/margin"] == pytest.approx(0.1 * sum(H) / 3, abs=1e-6)
    assert m["logps/chosen"] == pytest.approx(-23 / 3, abs=1e-5)
    assert m["logps/rejected"] == pytest.approx(-8.0, abs=1e-5)
    assert all(type(v) is float for v in m.values())


@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "cdpo", "robust", "hinge"])
def test_dpo_equal_logps(variant: str) -> None:
    z = torch.full((2,), -7.0)
    eps = 0.1 if variant in ("cdpo", "robust") else 0.0
    losses, m = dpo_loss(z, z, z, z, beta=0.25, variant=variant, label_smoothing=eps)
    expected = {"ipo": (1 / 0.5) ** 2, "hinge": 1.0}.get(variant, math.log(2))
    assert losses.tolist() == pytest.approx([expected] * 2, abs=1e-6)
    assert m["rewards/accuracy"] == 0.0 and m["rewards/margin"] == 0.0


@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "cdpo", "robust", "hinge"])
def test_dpo_gradient_signs(variant: str) -> None:
    """Every variant raises the chosen log-prob and lowers the rejected one (below IPO's target margin)."""
    pc, pr = t(-10.0, -6.0, grad=True), t(-9.0, -6.5, grad=True)
    eps = 0.2 if variant in ("cdpo", "robust") else 0.0
    losses, _ = dpo_loss(pc, pr, t(-10.0, -6.0), t(-9.0, -6.0), beta=0.1, variant=variant, label_smoothing=eps)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # type: ignore[operator]
    # the loss depends on the margin only: chosen and rejected gradients mirror each other
    assert pc.grad.tolist() == pytest.approx((-pr.grad).tolist(), abs=1e-7)  # type: ignore[union-attr]


def test_dpo_large_margins_are_finite() -> None:
    pc, pr = t(0.0, -1e4, grad=True), t(-1e4, 0.0, grad=True)
    z = t(-50.0, -50.0)
    losses, _ = dpo_loss(pc, pr, z, z, beta=0.1, variant="sigmoid")
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert losses[1].item() == pytest.approx(1000.0, rel=1e-6)
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and pc.grad[1].item() == pytest.approx(-0.1)  # type: ignore[union-attr,index]


def test_cdpo_half_is_symmetric() -> None:
    """eps = 0.5 says labels carry no information: the loss is even in h and flat at h = 0."""
    h = t(0.0, 3.0, -3.0, grad=True)
    z = torch.zeros(3)
    losses, _ = dpo_loss(h, z, z, z, beta=1.0, variant="cdpo", label_smoothing=0.5)
    assert losses[1].item() == pytest.approx(losses[2].item(), abs=1e-6)
    losses.sum().backward()
    assert h.grad[0].item() == pytest.approx(0.0, abs=1e-7)  # type: ignore[index]


@pytest.mark.parametrize(
    ("variant", "eps"), [("sigmoid", 0.1), ("ipo", 0.1), ("hinge", 0.1), ("robust", 0.5), ("cdpo", 0.6), ("kto", 0.0)]
)
def test_dpo_loss_rejects_bad_arguments(variant: str, eps: float) -> None:
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta=0.1, variant=variant, label_smoothing=eps)


def test_dpo_config_validation() -> None:
    cfg = DPOConfig()
    assert (cfg.variant, cfg.beta, cfg.label_smoothing) == ("sigmoid", 0.1, 0.0)
    for variant in ("sigmoid", "ipo", "hinge"):
        with pytest.raises(ValidationError, match="use variant 'cdpo'.*'robust'"):
            DPOConfig(variant=variant, label_smoothing=0.1)
    with pytest.raises(ValidationError, match="robust.*< 0.5"):
        DPOConfig(variant="robust", label_smoothing=0.5)
    with pytest.raises(ValidationError):
        DPOConfig(variant="cdpo", label_smoothing=0.6)
    with pytest.raises(ValidationError):
        DPOConfig(beta=0.0)
    with pytest.raises(ValidationError):
        DPOConfig(gamma=1.0)  # type: ignore[call-arg]  # extra keys are errors
    assert DPOConfig(variant="cdpo", label_smoothing=0.5).label_smoothing == 0.5
    assert DPOConfig(variant="robust", label_smoothing=0.49).variant == "robust"
    parsed = OBJECTIVES.parse({"name": "dpo", "variant": "ipo", "beta": 0.5}, "objective")
    assert isinstance(parsed, DPOConfig) and parsed.variant == "ipo"


# ---------------------------------------------------------------- DPO: parity with trl's DPOTrainer


class FakeModel:
    training = True

    def __init__(self, outputs: Any) -> None:
        self.outputs = outputs

    def __call__(self, **kwargs: Any) -> Any:
        return self.outputs


def trl_dpo(loss_type: str, beta: float, eps: float, sums: list[torch.Tensor], counts: torch.Tensor) -> tuple[float, dict]:
    """trl's DPOTrainer._compute_loss on a stand-in trainer and model whose token log-probs sum to `sums`.

    sums = [policy chosen, policy rejected, ref chosen, ref rejected] (each [P]); counts = completion
    lengths [2P] in trl's order (all chosen, then all rejected). The reference log-probs go in as precomputed.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    pc, pr, rc, rr = sums
    n, width = counts.numel(), int(counts.max()) + 2
    completion_mask = (torch.arange(width)[None, :] >= 1) & (torch.arange(width)[None, :] <= counts[:, None])
    log_probs = torch.zeros(n, width - 1)
    log_probs[:, 0] = torch.cat([pc, pr])  # trl sums each row; only the totals matter to the loss
    outputs = SimpleNamespace(
        log_probs=log_probs, entropy=torch.zeros(n, width - 1),
        mean_logits=torch.zeros(n, width - 1), is_top1=torch.zeros(n, width - 1, dtype=torch.bool),
    )
    model = FakeModel(outputs)
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, width, dtype=torch.long), "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": completion_mask.long(), "ref_chosen_logps": rc, "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def random_pairs(num_pairs: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[policy chosen, policy rejected, ref chosen, ref rejected] summed log-probs and the lengths [2P]."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 40, (2 * num_pairs,), generator=g)
    pc, pr = (-(torch.rand(num_pairs, generator=g) * 2 + 0.1) * n for n in (counts[:num_pairs], counts[num_pairs:]))
    rc, rr = (s + 4 * torch.randn(num_pairs, generator=g) for s in (pc, pr))  # spread of margins
    return [pc, pr, rc, rr], counts


@pytest.mark.parametrize(("variant", "eps"), [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.3), ("hinge", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_objective_matches_trl(variant: str, eps: float, beta: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our DPO objective (summed log-probs; per-token means for ipo) gives trl's loss on the same sequences."""
    num_pairs = 5
    sums, counts = random_pairs(num_pairs, seed=int(beta * 10) + len(variant))
    want_loss, want = trl_dpo(variant, beta, eps, sums, counts)
    # our batches interleave [chosen, rejected] per pair; trl stacks all chosen, then all rejected
    pc, pr, rc, rr = sums
    cc, cr = counts[:num_pairs], counts[num_pairs:]
    policy = SeqLogps(torch.stack([pc, pr], 1).flatten(), torch.stack([cc, cr], 1).flatten())
    reference = SeqLogps(torch.stack([rc, rr], 1).flatten(), policy.count)
    obj = make("dpo", variant=variant, beta=beta, label_smoothing=eps)
    loss, metrics = run_objective(obj, policy, num_pairs, num_pairs, monkeypatch, ref=reference)
    assert loss.item() == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    if variant != "ipo":  # ipo's metrics are per-token here (what its loss sees); trl logs summed rewards
        for ours, theirs in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                             ("rewards/accuracy", "rewards/accuracies"), ("rewards/margin", "rewards/margins"),
                             ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")]:
            assert metrics[ours] == pytest.approx(want[theirs], rel=1e-5, abs=1e-6)


def test_ipo_objective_feeds_per_token_means(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = SeqLogps(t(-10.0, -12.0), torch.tensor([5, 3]))
    reference = SeqLogps(t(-12.5, -9.0), torch.tensor([5, 3]))
    loss, m = run_objective(make("dpo", variant="ipo", beta=0.5), policy, 1, 1, monkeypatch, ref=reference)
    h = (-10.0 + 12.5) / 5 - (-12.0 + 9.0) / 3  # 0.5 + 1 = 1.5
    assert loss.item() == pytest.approx((h - 1.0) ** 2, abs=1e-6)
    assert m["logps/chosen"] == pytest.approx(-2.0) and m["rewards/chosen"] == pytest.approx(0.25)


# ---------------------------------------------------------------- SimPO


def test_simpo_hand_computed_and_metrics() -> None:
    losses, m = simpo_loss(t(-0.5, -1.0), t(-1.5, -0.8), beta=2.5, gamma=1.375)
    # beta * (c - r) - gamma = 2.5 - 1.375 = 1.125 and -0.5 - 1.375 = -1.875
    assert losses.tolist() == pytest.approx([nls(1.125), nls(-1.875)], abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(2.5 * -0.75)
    assert m["rewards/rejected"] == pytest.approx(2.5 * -1.15)
    assert m["rewards/accuracy"] == pytest.approx(0.5)
    assert m["rewards/margin"] == pytest.approx(2.5 * 0.4, abs=1e-6)
    assert m["logps/chosen"] == pytest.approx(-0.75) and m["logps/rejected"] == pytest.approx(-1.15)


def test_simpo_edges_and_gradients() -> None:
    z = t(-1.2, -0.3)
    # equal rewards: the margin gamma is still unmet
    assert simpo_loss(z, z, beta=2.5, gamma=1.375)[0].tolist() == pytest.approx([nls(-1.375)] * 2, abs=1e-6)
    assert simpo_loss(z, z, beta=2.0, gamma=0.0)[0].tolist() == pytest.approx([math.log(2)] * 2, abs=1e-6)
    c, r = t(-1.0, -0.1, grad=True), t(-1.1, -500.0, grad=True)
    losses, _ = simpo_loss(c, r, beta=2.5, gamma=1.375)
    assert losses[1].item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(losses).all()
    losses.sum().backward()
    assert c.grad[0].item() < 0 and r.grad[0].item() > 0  # type: ignore[index]
    assert c.grad[1].item() == pytest.approx(0.0, abs=1e-6)  # type: ignore[index]  # saturated, not nan


@pytest.mark.parametrize(("beta", "gamma"), [(2.5, 1.375), (2.0, 0.5), (10.0, 3.0)])
def test_simpo_matches_trl_cpo(beta: float, gamma: float) -> None:
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(7)
    c, r = -torch.rand(16, generator=g) * 2, -torch.rand(16, generator=g) * 2
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                              accelerator=SimpleNamespace(device=CPU))
    want, want_chosen, want_rejected = CPOTrainer.cpo_loss(trainer, c, r)
    losses, m = simpo_loss(c, r, beta=beta, gamma=gamma)
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6)
    assert m["rewards/chosen"] == pytest.approx(want_chosen.mean().item(), rel=1e-6)
    assert m["rewards/rejected"] == pytest.approx(want_rejected.mean().item(), rel=1e-6)


# ---------------------------------------------------------------- ORPO


def test_orpo_hand_computed_and_metrics() -> None:
    c, r, lam = [-0.5, -2.0], [-1.0, -0.3], 0.1
    losses, m = orpo_loss(t(*c), t(*r), t(0.5, 2.0), lam=lam)
    diff = [log_odds(a) - log_odds(b) for a, b in zip(c, r, strict=True)]
    assert losses.tolist() == pytest.approx([-a + lam * nls(d) for a, d in zip(c, diff, strict=True)], abs=1e-5)
    assert m["nll"] == pytest.approx(1.25)
    assert m["log_odds_ratio"] == pytest.approx(sum(diff) / 2, abs=1e-5)
    assert m["or_loss"] == pytest.approx(sum(nls(d) for d in diff) / 2, abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(lam * -1.25) and m["rewards/accuracy"] == pytest.approx(0.5)
    assert m["logps/chosen"] == pytest.approx(-1.25) and m["logps/rejected"] == pytest.approx(-0.65)


def test_orpo_edges_and_gradients() -> None:
    z = t(-0.7, -3.0)
    # equal responses: the odds-ratio term is log 2
    assert orpo_loss(z, z, -z, lam=0.2)[0].tolist() == pytest.approx([0.7 + 0.2 * math.log(2), 3.0 + 0.2 * math.log(2)], abs=1e-6)
    # p(y) ~ 1 (avg log-prob 0 or just below) and very unlikely responses: finite values and gradients
    c, r = t(0.0, -1e-9, -60.0, -0.5, grad=True), t(-1e-7, -60.0, 0.0, -0.4, grad=True)
    losses, _ = orpo_loss(c, r, -c, lam=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()  # type: ignore[arg-type]
    assert c.grad[3].item() < 0 and r.grad[3].item() > 0  # type: ignore[index]


def test_log1mexp_is_accurate_near_zero() -> None:
    xs = [-1e-5, -1e-3, -0.1, -0.69, -0.7, -5.0, -40.0]
    got = _pairwise.log1mexp(t(*xs)).tolist()
    assert got == pytest.approx([math.log(-math.expm1(x)) for x in xs], rel=1e-5)
    # the naive float32 form loses about 3 digits at -1e-5; ours does not
    naive = torch.log1p(-torch.exp(t(-1e-5))).item()
    assert abs(naive - math.log(-math.expm1(-1e-5))) > 1e-4
    assert _pairwise.log1mexp(t(0.0)).item() == pytest.approx(math.log(1e-6), rel=1e-3)  # clamped, not -inf


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_orpo_matches_trl_odds_ratio_loss(lam: float) -> None:
    """trl returns lam * log sigma(log odds ratio) per pair and subtracts its mean from a batch-token-mean NLL;
    our per-pair loss minus the NLL we pass in is minus trl's term (the NLL normalisation is our deviation)."""
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(3)
    c = torch.cat([-torch.rand(14, generator=g) * 3, t(-1e-4, -0.01)])
    r = torch.cat([-torch.rand(14, generator=g) * 3, t(-0.02, -1e-3)])
    trainer = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=CPU))
    want, want_chosen, want_rejected, _, want_log_odds = ORPOTrainer.odds_ratio_loss(trainer, c, r)
    nll = torch.rand(16, generator=g)
    losses, m = orpo_loss(c, r, nll, lam=lam)
    torch.testing.assert_close(losses - nll, -want, rtol=1e-5, atol=1e-6)
    assert m["log_odds_ratio"] == pytest.approx(want_log_odds.item(), rel=1e-5)
    assert m["rewards/chosen"] == pytest.approx(want_chosen.mean().item(), rel=1e-6)
    assert m["rewards/rejected"] == pytest.approx(want_rejected.mean().item(), rel=1e-6)


def test_orpo_objective_uses_per_pair_mean_nll(monkeypatch: pytest.MonkeyPatch) -> None:
    # pair 0: chosen 4 tokens summing to -2 (mean -0.5); pair 1: chosen 1 token at -3
    lp = SeqLogps(t(-2.0, -1.0, -3.0, -4.0), torch.tensor([4, 2, 1, 8]))
    loss, m = run_objective(make("orpo", lam=0.0), lp, 2, 2, monkeypatch)
    assert loss.item() == pytest.approx((0.5 + 3.0) / 2)  # a batch token mean would give 5 / 5 = 1.0
    assert m["nll"] == pytest.approx(1.75)


# ---------------------------------------------------------------- ASFT (no trl implementation: by hand)


def test_asft_hand_computed() -> None:
    c, r, lam = [-0.5, -2.0], [-1.0, -0.3], 0.1
    losses, m = asft_loss(t(*c), t(*r), lam=lam)
    # beta = 1: sigma(log odds) = p, so the loss is -(1 + lam) log p(c) - lam log(1 - p(r))
    expected = [-(1 + lam) * a - lam * math.log(1 - math.exp(b)) for a, b in zip(c, r, strict=True)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-5)
    assert m["nll"] == pytest.approx(1.25)
    assert m["rewards/chosen"] == pytest.approx((log_odds(-0.5) + log_odds(-2.0)) / 2, abs=1e-5)
    assert m["rewards/accuracy"] == pytest.approx(0.5)
    beta = 0.2
    with_beta = [-a + lam * (nls(beta * log_odds(a)) + nls(-beta * log_odds(b))) for a, b in zip(c, r, strict=True)]
    assert asft_loss(t(*c), t(*r), lam=lam, beta=beta)[0].tolist() == pytest.approx(with_beta, abs=1e-5)


def test_asft_identity_with_beta_one_on_random_logps() -> None:
    g = torch.Generator().manual_seed(11)
    c, r = -torch.rand(32, generator=g, dtype=torch.float64) * 4, -torch.rand(32, generator=g, dtype=torch.float64) * 4
    lam = 0.3
    losses, _ = asft_loss(c, r, lam=lam, beta=1.0)
    expected = -(1 + lam) * c - lam * torch.log1p(-torch.exp(r))
    torch.testing.assert_close(losses, expected.float(), rtol=1e-5, atol=1e-5)


def test_asft_edges_and_gradients() -> None:
    half = math.log(0.5)  # p = 1/2: log odds 0, each sigmoid term log 2
    losses, _ = asft_loss(t(half), t(half), lam=0.1)
    assert losses.item() == pytest.approx(-half + 0.1 * 2 * math.log(2), abs=1e-6)
    z = t(-0.4, -2.5)
    assert asft_loss(z, t(-1.0, -1.0), lam=0.0)[0].tolist() == pytest.approx([0.4, 2.5])  # lam 0: plain NLL
    c, r = t(0.0, -1e-9, -60.0, -0.5, grad=True), t(-1e-7, -60.0, 0.0, -0.4, grad=True)
    losses, _ = asft_loss(c, r, lam=0.1, beta=0.3)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()  # type: ignore[arg-type]
    assert c.grad[3].item() < 0 and r.grad[3].item() > 0  # type: ignore[index]


# ---------------------------------------------------------------- the Objective classes on fake batches


def make(name: str, **fields: Any) -> Any:
    cls = OBJECTIVES.get(name)
    return cls(cls.Config.model_validate({"name": name, **fields}))


def run_objective(
    obj: Any, lp: SeqLogps, num_pairs: int, num_items: int, monkeypatch: pytest.MonkeyPatch, ref: SeqLogps | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """obj.loss on a fake batch whose sequence log-probs are `lp` (and the reference's `ref`)."""
    module = {"dpo": dpo, "simpo": simpo, "orpo": orpo, "asft": asft}[obj.cfg.name]
    model = object()
    batch = {"sample_ids": torch.arange(num_pairs), "num_seqs": torch.tensor(lp.sum.numel())}

    def fake_logps(m: Any, b: dict[str, torch.Tensor]) -> SeqLogps:
        assert m is model and b is batch
        return lp

    monkeypatch.setattr(module, "sequence_logps", fake_logps)
    reference = None if ref is None else SimpleNamespace(logps=lambda m, b: ref)
    assert obj.num_items(batch) == num_pairs
    return obj.loss(model, batch, num_items, ref=reference)


def pure(name: str, cfg: Any, lp: SeqLogps, ref: SeqLogps | None) -> torch.Tensor:
    c, r = lp.mean[0::2], lp.mean[1::2]
    if name == "dpo":
        return dpo_loss(lp.sum[0::2], lp.sum[1::2], ref.sum[0::2], ref.sum[1::2],  # type: ignore[union-attr]
                        beta=cfg.beta, variant=cfg.variant, label_smoothing=cfg.label_smoothing)[0]
    if name == "simpo":
        return simpo_loss(c, r, beta=cfg.beta, gamma=cfg.gamma)[0]
    if name == "orpo":
        return orpo_loss(c, r, -c, lam=cfg.lam)[0]
    return asft_loss(c, r, lam=cfg.lam, beta=cfg.beta)[0]


NAMES = ["dpo", "simpo", "orpo", "asft"]
LP = SeqLogps(t(-6.0, -9.0, -2.0, -1.5, -12.0, -4.0), torch.tensor([4, 6, 2, 3, 8, 2]))
REF = SeqLogps(t(-7.0, -8.0, -2.5, -1.0, -11.0, -5.0), LP.count)


@pytest.mark.parametrize("name", NAMES)
def test_objective_is_pure_sum_over_num_items(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    obj = make(name)
    assert obj.batch_format == "pairwise" and obj.needs_reference == (name == "dpo") and obj.accumulation_invariant
    ref = REF if name == "dpo" else None
    loss, metrics = run_objective(obj, LP, 3, 8, monkeypatch, ref=ref)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(pure(name, obj.cfg, LP, ref).sum().item() / 8, rel=1e-6)
    assert {"rewards/chosen", "rewards/accuracy", "logps/chosen"} <= set(metrics)
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", NAMES)
def test_accumulated_micro_batches_equal_one_batch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two micro-batches (2 pairs + 1 pair) normalised by the step's 3 pairs give the big batch's loss and grads."""
    obj = make(name)

    def run(lo: int, hi: int, leaf: torch.Tensor) -> torch.Tensor:
        lp = SeqLogps(leaf[2 * lo : 2 * hi], LP.count[2 * lo : 2 * hi])
        ref = SeqLogps(REF.sum[2 * lo : 2 * hi], REF.count[2 * lo : 2 * hi]) if name == "dpo" else None
        return run_objective(obj, lp, hi - lo, 3, monkeypatch, ref=ref)[0]

    whole, parts = LP.sum.clone().requires_grad_(), LP.sum.clone().requires_grad_()
    big = run(0, 3, whole)
    big.backward()
    acc = run(0, 2, parts) + run(2, 3, parts)
    acc.backward()
    assert acc.item() == pytest.approx(big.item(), rel=1e-6)
    torch.testing.assert_close(parts.grad, whole.grad)


@pytest.mark.parametrize("name", NAMES)
def test_objective_rejects_unpaired_sequence_count(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lp = SeqLogps(t(-1.0, -2.0, -3.0), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="2 per pair"):
        run_objective(make(name), lp, 2, 2, monkeypatch, ref=lp if name == "dpo" else None)


def test_dpo_objective_needs_ref(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="reference"):
        run_objective(make("dpo"), LP, 3, 3, monkeypatch)


def test_configs_defaults() -> None:
    assert (simpo.SimPOConfig().beta, simpo.SimPOConfig().gamma) == (2.5, 1.375)
    assert orpo.ORPOConfig().lam == 0.1
    assert (asft.ASFTConfig().lam, asft.ASFTConfig().beta) == (0.1, 1.0)
    for cls in (dpo.DPOConfig, simpo.SimPOConfig, orpo.ORPOConfig, asft.ASFTConfig):
        assert all(f.description for k, f in cls.model_fields.items() if k != "name")
        with pytest.raises(ValidationError):
            cls.model_validate({"nope": 1})


@pytest.mark.parametrize("name", NAMES)
def test_objective_on_tiny_model_padded_equals_packed(name: str, make_model: Any, samples: list, tok: Any) -> None:
    """Real sequence log-probs: samples 0-3 as pairs (0 over 1, 2 over 3), padded rows vs one packed row."""
    from tunelab.data.packing import collate
    from tunelab.objectives._logprobs import sequence_logps

    def pairwise(packed: bool) -> dict[str, torch.Tensor]:
        rows = [samples[:4]] if packed else [[s] for s in samples[:4]]
        batch = collate(rows, tok.pad_token_id, packed=packed)
        batch.pop("real_tokens")
        return {**batch, "sample_ids": torch.tensor([0, 1])}

    def reference_logps(m: Any, b: dict[str, torch.Tensor]) -> SeqLogps:
        with torch.no_grad():
            return sequence_logps(m, b).detach()

    ref = SimpleNamespace(logps=reference_logps) if name == "dpo" else None
    obj, model = make(name), make_model().train()
    (padded, m1), (packed, _) = (obj.loss(model, pairwise(p), 2, ref=ref) for p in (False, True))
    assert torch.isfinite(padded) and padded.item() == pytest.approx(packed.item(), rel=1e-4)
    if name == "dpo":  # policy == reference: h = 0
        assert padded.item() == pytest.approx(math.log(2), abs=1e-6) and m1["rewards/margin"] == 0.0
    padded.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


# the objectives' non-default settings must reach the loss (a dropped keyword would fall back to the default)
CONFIGS = {"dpo": {"beta": 0.3, "variant": "robust", "label_smoothing": 0.2}, "simpo": {"beta": 4.0, "gamma": 0.7},
           "orpo": {"lam": 0.5}, "asft": {"lam": 0.4, "beta": 0.35}}


@pytest.mark.parametrize("name", NAMES)
def test_objective_uses_its_config_and_does_not_average_a_single_pair_away(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    obj, default = make(name, **CONFIGS[name]), make(name)
    one = SeqLogps(LP.sum[:2], LP.count[:2])
    ref = SeqLogps(REF.sum[:2], REF.count[:2]) if name == "dpo" else None
    loss, metrics = run_objective(obj, one, 1, 1, monkeypatch, ref=ref)
    want = pure(name, obj.cfg, one, ref).item()  # one pair, one item in the step: the pair's own loss
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert want != pytest.approx(pure(name, default.cfg, one, ref).item(), rel=1e-3)  # the config changes it
    if name == "asft":  # ASFT's absolute-likelihood term is reported on its own
        c, r = one.mean[0], one.mean[1]
        b = CONFIGS["asft"]["beta"]
        align = nls(b * log_odds(c.item())) + nls(-b * log_odds(r.item()))  # -log s(b lo_c) - log s(-b lo_r)
        assert metrics["align_loss"] == pytest.approx(align, rel=1e-5)
        assert metrics["nll"] == pytest.approx(-c.item(), rel=1e-6)


def test_dpo_error_messages_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"^unknown DPO variant 'kto' \(known: sigmoid, ipo, cdpo, robust, hinge\)$"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, variant="kto")
    with pytest.raises(ValueError, match=r"^label_smoothing=0\.5 out of range for variant 'robust'$"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, variant="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"^label_smoothing is only used by variants cdpo and robust, not 'ipo'$"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, variant="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"^objective 'dpo' needs reference log-probs: pass `ref` \(the run's Reference\)$"):
        run_objective(make("dpo"), LP, 3, 3, monkeypatch)
