"""KTO, RRHF, IFT and Masked Thought: hand-computed values, edge cases, TRL parity (KTO), and each objective
class on a tiny batch against its pure function."""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tunelab.data.batching import Unit, get_batcher
from tunelab.data.packing import collate
from tunelab.data.templating import IGNORE, Encoded
from tunelab.objectives import OBJECTIVES
from tunelab.objectives._logprobs import SeqLogps, _plain_lm, label_logits, sequence_logps, token_logprobs
from tunelab.objectives.ift import _CHUNK, IFTConfig, ift_mix_embeddings, ift_weights
from tunelab.objectives.kto import KTOConfig, kto_kl_estimate, kto_loss
from tunelab.objectives.masked_thought import (
    MaskedThoughtConfig,
    batch_generator,
    corrupt,
    corrupt_sequences,
    mask_rate,
    response_inputs,
)
from tunelab.objectives.rrhf import RRHFConfig, rrhf_loss
from tunelab.objectives.sft import sft_loss


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def with_ids(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SFT fixture batch with `seq_index`, `num_seqs` and `sample_ids` (added if the collator lacks them)."""
    batch = dict(batch)
    labelled = batch["labels"] != IGNORE
    if "seq_index" not in batch:
        if "position_ids" in batch:  # packed: a sequence starts where the positions restart
            starts = (batch["position_ids"] == 0).long()
            starts[:, 0] = 1
            seg = starts.cumsum(1) - 1 + torch.cat([torch.zeros(1, dtype=torch.long), starts.sum(1).cumsum(0)[:-1]])[:, None]
        else:
            seg = torch.arange(labelled.shape[0])[:, None].expand_as(labelled)
        batch["seq_index"] = torch.where(labelled, seg, -1)
    if "num_seqs" not in batch:
        batch["num_seqs"] = torch.tensor(int(batch["seq_index"].max()) + 1)
    if "sample_ids" not in batch:
        batch["sample_ids"] = torch.arange(int(batch["num_seqs"])) + 100
    return batch


def make_obj(name: str, **kw: Any) -> Any:
    cls = OBJECTIVES.get(name)
    return cls(cls.Config(**kw))


class ModelRef:
    """A reference provider backed by a second (perturbed) copy of the tiny model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def logps(self, model: Any, batch: dict[str, torch.Tensor]) -> SeqLogps:
        return sequence_logps(self.model, batch).detach()


def perturbed(make_model: Any, scale: float = 0.05) -> torch.nn.Module:
    model = make_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# =============================================================================================== KTO

POL = torch.tensor([-10.0, -12.0, -8.0])
REF = torch.tensor([-11.0, -11.0, -9.0])  # r = [1, -1, 1]
DES = torch.tensor([True, False, True])


def test_kto_hand_computed() -> None:
    losses, m = kto_loss(POL, REF, DES, torch.tensor(0.5), beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    # desirable: 1 - sig(0.1 * (1 - 0.5)); undesirable: 1 - sig(0.1 * (0.5 - (-1)))
    expected = [1 - sig(0.05), 1 - sig(0.15), 1 - sig(0.05)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.1, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(-0.1, abs=1e-6)
    assert m["kl"] == pytest.approx(0.5)
    assert m["logps/chosen"] == pytest.approx(-9.0) and m["logps/rejected"] == pytest.approx(-12.0)
    weighted, _ = kto_loss(POL, REF, DES, 0.5, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    assert weighted.tolist() == pytest.approx([2 * expected[0], 0.5 * expected[1], 2 * expected[2]], abs=1e-6)


def test_kto_kl_clamped_detached_and_estimate() -> None:
    neg, m = kto_loss(POL, REF, DES, -3.0, beta=0.1)
    zero, _ = kto_loss(POL, REF, DES, 0.0, beta=0.1)
    assert torch.equal(neg, zero) and m["kl"] == 0.0
    kl_p = torch.tensor([-5.0, -7.0, -6.0], requires_grad=True)
    est = kto_kl_estimate(kl_p, torch.tensor([-6.0, -6.0, -7.0]))
    assert est.item() == pytest.approx((1 - 1 + 1) / 3) and not est.requires_grad
    # gradients only reach the completions' log-probs, never through z0
    pol = POL.clone().requires_grad_(True)
    kl = torch.tensor(0.5, requires_grad=True)
    kto_loss(pol, REF, DES, kl, beta=0.1)[0].sum().backward()
    assert kl.grad is None


def test_kto_gradient_signs_and_saturation() -> None:
    pol = POL.clone().requires_grad_(True)
    kto_loss(pol, REF, DES, 0.0, beta=0.1)[0].sum().backward()
    assert pol.grad[0] < 0 and pol.grad[2] < 0  # desirable: raising log p lowers the loss
    assert pol.grad[1] > 0  # undesirable: lowering log p lowers the loss
    # equal log-probs and z0 = 0: every loss is 1 - sig(0) = 0.5
    equal, _ = kto_loss(REF, REF, DES, 0.0, beta=0.1)
    assert equal.tolist() == pytest.approx([0.5, 0.5, 0.5])
    # large margins in the right direction: losses vanish (finite)
    big, _ = kto_loss(torch.tensor([1e4, -1e4]), torch.zeros(2), torch.tensor([True, False]), 0.0, beta=0.1)
    assert torch.isfinite(big).all() and big.max() < 1e-6


def test_kto_metrics_skip_absent_class() -> None:
    _, m = kto_loss(POL, REF, torch.ones(3, dtype=torch.bool), 0.0, beta=0.1)
    assert "rewards/chosen" in m and "rewards/rejected" not in m and "logps/rejected" not in m
    _, m = kto_loss(POL, REF, torch.zeros(3, dtype=torch.bool), 0.0, beta=0.1)
    assert "rewards/rejected" in m and "rewards/chosen" not in m
    assert all(v == v for v in m.values())


class _FakeOut:
    def __init__(self, logps: torch.Tensor) -> None:
        self.log_probs = logps[:, None]  # one completion position per row
        self.entropy = torch.zeros_like(self.log_probs)
        self.mean_logits = torch.zeros_like(self.log_probs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kto_parity_with_trl(seed: int) -> None:
    """TRL 1.16 has no standalone KTO loss: drive `KTOTrainer._compute_loss` with precomputed reference
    log-probs and a stand-in model that returns our log-prob tensors, and compare loss and metrics."""
    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(seed)
    n = 6
    pol, ref, pol_kl, ref_kl = (-20 * torch.rand(n, generator=g) for _ in range(4))
    des = torch.tensor([True, False, True, True, False, seed == 2])
    ids, kl_ids = torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long)

    def model(**kw: Any) -> _FakeOut:
        return _FakeOut(pol_kl if kw["input_ids"] is kl_ids else pol)

    beta, wd, wu = 0.2, 1.3, 0.7
    fake: Any = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        loss_type="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu, precompute_ref_logps=True,
        calculate_KL=True, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    fake._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(fake, m, b)
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * n), "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones(n, 2, dtype=torch.long), "KL_completion_mask": torch.tensor([[0, 1]] * n),
        "label": des, "ref_logps": ref, "ref_KL_logps": ref_kl,
    }
    trl_loss = KTOTrainer._compute_loss(fake, model, inputs, False)
    trl_m = {k: v[-1] for k, v in fake._metrics["train"].items()}

    ours, m = kto_loss(pol, ref, des, kto_kl_estimate(pol_kl, ref_kl), beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert ours.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert m[key] == pytest.approx(trl_m[key], abs=1e-5), key


def _unpaired_batch(samples: list[Encoded], packed: bool) -> dict[str, torch.Tensor]:
    units = [
        Unit([samples[0], samples[1]], {"desirable": True}, sid=7),
        Unit([samples[2], samples[3]], {"desirable": False}, sid=8),
        Unit([samples[4], samples[5]], {"desirable": True}, sid=9),
    ]
    rows = [units[:2], units[2:]] if packed else [units]
    return get_batcher("unpaired").collate(rows, 2, packed)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_kto_objective_equals_pure_function(samples: list[Encoded], make_model: Any, packed: bool) -> None:
    batch = _unpaired_batch(samples, packed)
    model, ref = make_model().train(), ModelRef(perturbed(make_model))
    obj = make_obj("kto", beta=0.3)
    assert obj.batch_format == "unpaired" and obj.needs_reference and not obj.accumulation_invariant
    n = obj.num_items(batch)
    assert n == 3
    loss, metrics = obj.loss(model, batch, 2 * n, ref)
    with torch.no_grad():
        pol, rl = sequence_logps(model, batch).sum, ref.logps(model, batch).sum
        kl = kto_kl_estimate(pol[1::2], rl[1::2])
        want, want_m = kto_loss(pol[0::2], rl[0::2], batch["desirable"], kl, beta=0.3)
    assert loss.item() == pytest.approx(want.sum().item() / (2 * n), rel=1e-5)
    assert metrics == pytest.approx(want_m, rel=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="reference"):
        obj.loss(model, batch, n)


def test_kto_config_defaults() -> None:
    cfg = KTOConfig()
    assert (cfg.beta, cfg.desirable_weight, cfg.undesirable_weight) == (0.1, 1.0, 1.0)


def test_kto_loss_defaults_flags_and_float64() -> None:
    # beta defaults to 0.1: the hand values of test_kto_hand_computed
    losses, m = kto_loss(POL, REF, DES, 0.5)
    assert losses.tolist() == pytest.approx([1 - sig(0.05), 1 - sig(0.15), 1 - sig(0.05)], abs=1e-7)
    # 0/1 flags select the same classes as booleans
    flags, m_flags = kto_loss(POL, REF, torch.tensor([1, 0, 1]), 0.5)
    assert torch.equal(flags, losses) and m_flags == m
    # float64 log-probs: z0 is not rounded through float32 (0.1 stays 0.1) and the losses stay float64
    wide, m64 = kto_loss(POL.double(), REF.double(), DES, 0.1, beta=0.3)
    assert m64["kl"] == 0.1 and wide.dtype == torch.float64
    assert wide.tolist() == pytest.approx([1 - sig(0.3 * 0.9), 1 - sig(0.3 * 1.1), 1 - sig(0.3 * 0.9)], rel=1e-12, abs=0)


def test_kto_objective_config_weights_and_one_unit(samples: list[Encoded], make_model: Any) -> None:
    model, ref = make_model().train(), ModelRef(perturbed(make_model))
    obj = make_obj("kto", beta=0.3, desirable_weight=2.0, undesirable_weight=0.5)
    for batch, n in ((_unpaired_batch(samples, False), 3),
                     (get_batcher("unpaired").collate([[Unit(samples[2:4], {"desirable": False}, sid=8)]], 2, False), 1)):
        assert obj.num_items(batch) == n
        loss, metrics = obj.loss(model, batch, n, ref)
        with torch.no_grad():
            pol, rl = sequence_logps(model, batch).sum, ref.logps(model, batch).sum
            want, want_m = kto_loss(pol[0::2], rl[0::2], batch["desirable"], kto_kl_estimate(pol[1::2], rl[1::2]),
                                    beta=0.3, desirable_weight=2.0, undesirable_weight=0.5)
        assert loss.item() == pytest.approx(want.sum().item() / n, rel=1e-5)
        assert metrics == pytest.approx(want_m, rel=1e-5)
    msg = "kto needs reference log-probs: the loop must pass `ref`"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        obj.loss(model, batch, 1)


# ============================================================================================== RRHF

# unit 0: three responses; unit 1: two responses
SUMS = torch.tensor([-6.0, -4.0, -9.0, -3.0, -8.0])
LENS = torch.tensor([3, 2, 3, 1, 4])
SCORES = torch.tensor([1.0, 0.5, 2.0, 0.0, 3.0])
UNIT = torch.tensor([0, 0, 0, 1, 1])


def test_rrhf_hand_computed() -> None:
    # p = sum / len = [-2, -2, -3 | -3, -2]
    # unit 0: score order 0.5 (#1) < 1 (#0) < 2 (#2); pairs (worse, better): (1,0): relu(-2+2)=0,
    #   (1,2): relu(-2+3)=1, (0,2): relu(-2+3)=1 -> rank 2; best = #2 (score 2): nll = 9/3 = 3
    # unit 1: 0 (#3) < 3 (#4): relu(-3+2) = 0 -> rank 0; best = #4: nll = 8/4 = 2
    losses, m = rrhf_loss(SUMS, LENS, SCORES, UNIT, length_penalty=1.0, rank_weight=1.0)
    assert losses.tolist() == pytest.approx([2 + 3, 0 + 2])
    assert m["rank"] == pytest.approx(1.0) and m["nll"] == pytest.approx(2.5)
    # correctly ordered pairs (p_worse < p_better): only (3,4); (1,0) is a tie, (1,2), (0,2) are violated
    assert m["rewards/accuracy"] == pytest.approx(0.25)
    heavy, _ = rrhf_loss(SUMS, LENS, SCORES, UNIT, length_penalty=1.0, rank_weight=100.0)
    assert heavy.tolist() == pytest.approx([200 + 3, 2])


def test_rrhf_length_penalty() -> None:
    # alpha = 0: p = raw sums [-6, -4, -9 | -3, -8]
    # unit 0: (1,0): relu(-4+6)=2, (1,2): relu(-4+9)=5, (0,2): relu(-6+9)=3 -> 10; unit 1: relu(-3+8)=5
    losses, _ = rrhf_loss(SUMS, LENS, SCORES, UNIT, length_penalty=0.0, rank_weight=1.0)
    assert losses.tolist() == pytest.approx([10 + 3, 5 + 2])  # the SFT term stays a token mean
    # alpha = 2: p = sum / len^2 = [-2/3, -1, -1 | -3, -0.5]
    # unit 0: (1,0): relu(-1+2/3)=0, (1,2): relu(-1+1)=0, (0,2): relu(-2/3+1)=1/3; unit 1: relu(-3+.5)=0
    losses, _ = rrhf_loss(SUMS, LENS, SCORES, UNIT, length_penalty=2.0, rank_weight=1.0)
    assert losses.tolist() == pytest.approx([1 / 3 + 3, 2])


def test_rrhf_ties_and_gradients() -> None:
    # equal scores: no ranked pair; best is the first of the tied
    tied = torch.tensor([1.0, 1.0, 0.0])
    losses, m = rrhf_loss(torch.tensor([-1.0, -5.0, -0.5]), torch.tensor([1, 1, 1]), tied, torch.zeros(3, dtype=torch.long),
                          length_penalty=1.0, rank_weight=1.0)
    # pairs: (2,0): relu(-0.5+1)=0.5, (2,1): relu(-0.5+5)=4.5; nll of #0 = 1
    assert losses.tolist() == pytest.approx([0.5 + 4.5 + 1])
    assert m["rewards/accuracy"] == 0.0
    # a violated pair pushes the worse response down and the better one up
    s = torch.tensor([-1.0, -3.0], requires_grad=True)
    rrhf_loss(s, torch.tensor([1, 1]), torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.long),
              length_penalty=1.0, rank_weight=1.0)[0].sum().backward()
    assert s.grad[0] > 0 and s.grad[1] < 0
    # no violation: only the SFT term of the best acts
    s.grad = None
    rrhf_loss(s, torch.tensor([1, 1]), torch.tensor([1.0, 0.0]), torch.zeros(2, dtype=torch.long),
              length_penalty=1.0, rank_weight=1.0)[0].sum().backward()
    assert s.grad.tolist() == [-1.0, 0.0]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_rrhf_objective_equals_pure_function(samples: list[Encoded], make_model: Any, packed: bool) -> None:
    units = [
        Unit(samples[:3], {"scores": [0.1, 0.9, 0.5]}, sid=3),
        Unit(samples[3:5], {"scores": [2.0, -1.0]}, sid=4),
    ]
    batch = get_batcher("ranked").collate([units] if not packed else [units[:1], units[1:]], 2, packed)
    assert batch["seq_unit"].tolist() == [0, 0, 0, 1, 1]
    model = make_model().train()
    obj = make_obj("rrhf", rank_weight=2.0)
    assert obj.batch_format == "ranked" and not obj.needs_reference
    n = obj.num_items(batch)
    assert n == 2
    loss, metrics = obj.loss(model, batch, n)
    with torch.no_grad():
        lp = sequence_logps(model, batch)
        want, want_m = rrhf_loss(lp.sum, lp.count, batch["scores"], batch["seq_unit"], length_penalty=1.0, rank_weight=2.0)
    assert loss.item() == pytest.approx(want.sum().item() / n, rel=1e-5)
    assert metrics == pytest.approx(want_m, rel=1e-5)
    loss.backward()


def test_rrhf_config_defaults() -> None:
    cfg = RRHFConfig()
    assert (cfg.length_penalty, cfg.rank_weight) == (1.0, 1.0)


def test_rrhf_loss_defaults() -> None:
    # length_penalty 1 and rank_weight 1: the hand values of test_rrhf_hand_computed
    assert rrhf_loss(SUMS, LENS, SCORES, UNIT)[0].tolist() == pytest.approx([2 + 3, 0 + 2])


def _naive_rrhf(sums: list[float], lens: list[int], scores: list[float], unit: list[int], alpha: float, w: float) -> list[float]:
    out = []
    for u in sorted(set(unit)):
        idx = [i for i in range(len(unit)) if unit[i] == u]
        p = {i: sums[i] / max(lens[i], 1) ** alpha for i in idx}
        rank = sum(max(0.0, p[i] - p[j]) for i in idx for j in idx if scores[i] < scores[j])
        best = max(idx, key=lambda i: (scores[i], -i))  # highest score, the first on ties
        out.append(w * rank - sums[best] / max(lens[best], 1))
    return out


def test_rrhf_float64_fractional_alpha() -> None:
    """float64 inputs are computed in float64 throughout (lengths ** alpha included), ties go to the first."""
    sums = torch.tensor([-6.3, -4.1, -9.7, -3.2, -8.9], dtype=torch.float64)
    lens = torch.tensor([3, 2, 5, 1, 4])
    scores = torch.tensor([0.1, 0.3, 0.2, 0.7, 0.7], dtype=torch.float64)
    losses, m = rrhf_loss(sums, lens, scores, UNIT, length_penalty=0.5, rank_weight=1.7)
    want = _naive_rrhf(sums.tolist(), lens.tolist(), scores.tolist(), UNIT.tolist(), 0.5, 1.7)
    assert losses.dtype == torch.float64
    assert losses.tolist() == pytest.approx(want, rel=1e-12, abs=0)
    # unit 0: pairs (0,1), (0,2), (2,1); only (0,2) is violated (p_0 > p_2); unit 1 is a tie (no pair, best #3)
    hinge = -6.3 / 3**0.5 + 9.7 / 5**0.5
    assert m.keys() == {"rank", "nll", "rewards/accuracy"}
    assert m["rank"] == pytest.approx(hinge / 2, rel=1e-12) and m["nll"] == pytest.approx((4.1 / 2 + 3.2) / 2, rel=1e-12)
    assert m["rewards/accuracy"] == pytest.approx(2 / 3)


def test_rrhf_objective_config_and_one_unit(samples: list[Encoded], make_model: Any) -> None:
    batch = get_batcher("ranked").collate([[Unit(samples[:3], {"scores": [0.1, 0.9, 0.5]}, sid=3)]], 2, False)
    model = make_model().train()
    obj = make_obj("rrhf", length_penalty=0.5, rank_weight=2.0)
    assert obj.num_items(batch) == 1
    loss, metrics = obj.loss(model, batch, 1)
    with torch.no_grad():
        lp = sequence_logps(model, batch)
        want, want_m = rrhf_loss(lp.sum, lp.count, batch["scores"], batch["seq_unit"], length_penalty=0.5, rank_weight=2.0)
        alpha1, _ = rrhf_loss(lp.sum, lp.count, batch["scores"], batch["seq_unit"], length_penalty=1.0, rank_weight=2.0)
    assert abs(want.item() - alpha1.item()) > 1e-3  # alpha reaches the loss on this batch
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)  # one unit: its loss, undivided
    assert metrics == pytest.approx(want_m, rel=1e-5)


# =============================================================================================== IFT


def test_ift_weights_hand_computed() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    seq = torch.tensor([0, 0, 0, 1, 1])
    # seq 0: [1 + .5*2 + .25*3, 2 + .5*3, 3] = [2.75, 3.5, 3] (sum 9.25, 3 tokens)
    # seq 1: [4 + .5*5, 5] = [6.5, 5] (sum 11.5, 2 tokens)
    want = [2.75 * 3 / 9.25, 3.5 * 3 / 9.25, 3 * 3 / 9.25, 6.5 * 2 / 11.5, 5 * 2 / 11.5]
    w = ift_weights(losses, seq, 0.5)
    assert w.tolist() == pytest.approx(want, rel=1e-6)
    assert w[:3].sum().item() == pytest.approx(3) and w[3:].sum().item() == pytest.approx(2)
    # gamma 1: plain reverse cumulative sums [6, 5, 3 | 9, 5]
    assert ift_weights(losses, seq, 1.0).tolist() == pytest.approx([6 * 3 / 14, 5 * 3 / 14, 3 * 3 / 14, 9 * 2 / 14, 5 * 2 / 14])
    # gamma 0: all ones (the reference code's special case, so lam = gamma = 0 is SFT)
    assert ift_weights(losses, seq, 0.0).tolist() == [1.0] * 5
    # sequences need not be contiguous: tokens keep their order within their sequence
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert ift_weights(losses[perm], seq[perm], 0.5).tolist() == pytest.approx([want[i] for i in perm.tolist()], rel=1e-6)


def _naive_weights(losses: list[float], seq: list[int], gamma: float) -> list[float]:
    raw = [sum(gamma ** (k - t) * losses[k] for k in range(t, len(losses)) if seq[k] == seq[t]) for t in range(len(losses))]
    tot = defaultdict(float)
    cnt = defaultdict(int)
    for r, s in zip(raw, seq, strict=True):
        tot[s] += r
        cnt[s] += 1
    return [r * cnt[s] / tot[s] for r, s in zip(raw, seq, strict=True)]


def test_ift_weights_across_blocks() -> None:
    """Long sequences span several scan blocks (carries between blocks) and boundaries fall mid-block."""
    g = torch.Generator().manual_seed(0)
    lens = [300, 7, 420, 1]
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    losses = torch.rand(seq.numel(), generator=g, dtype=torch.float64) * 3
    for gamma in (0.95, 0.5, 1.0):
        want = _naive_weights(losses.tolist(), seq.tolist(), gamma)
        assert ift_weights(losses, seq, gamma).tolist() == pytest.approx(want, rel=1e-9)


def test_ift_weights_not_detached() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    w = ift_weights(losses, torch.zeros(3, dtype=torch.long), 0.5)
    assert w.requires_grad
    (w * losses).sum().backward()
    # were the weights constants, the gradient would be the weights themselves
    assert not torch.allclose(losses.grad, w.detach())


def test_ift_mix_embeddings() -> None:
    gold = torch.tensor([[[1.0, 0.0], [2.0, 2.0], [4.0, 0.0]]])
    pred = torch.tensor([[[9.0, 9.0], [0.0, 4.0], [0.0, 8.0]]])
    mask = torch.tensor([[False, True, True]])
    out = ift_mix_embeddings(gold, pred, mask, 0.25)
    assert out.tolist() == [[[1.0, 0.0], [1.5, 2.5], [3.0, 2.0]]]
    assert torch.equal(ift_mix_embeddings(gold, pred, mask, 0.0), gold)


@pytest.mark.parametrize("fixture", ["sft_batch", "packed_batch"])
def test_ift_lam0_gamma0_is_sft(make_model: Any, request: pytest.FixtureRequest, fixture: str) -> None:
    batch = with_ids(request.getfixturevalue(fixture))
    model = make_model()
    obj = make_obj("ift", lam=0.0, gamma=0.0)
    n = obj.num_items(batch)
    loss, metrics = obj.loss(model, batch, n)
    want = sft_loss(*label_logits(model, batch), n)
    # the same maths through inputs_embeds instead of input_ids: equal up to float summation order
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    assert metrics["tokens"] == n


def _manual_ift_nll(model: Any, batch: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """IFT's token NLLs written out with the model's plain forward: greedy guesses, shifted mix, NLL."""
    ids, labels = batch["input_ids"], batch["labels"]
    # use_cache=False matters: with a cache, transformers does not detect packed rows from position_ids
    kw = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch} | {"use_cache": False}
    with torch.no_grad():
        guess = model(input_ids=ids, **kw).logits.argmax(-1)
    pred_ids = ids.clone()
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if labels[r, t] != IGNORE:
                pred_ids[r, t + 1] = guess[r, t]
    emb = model.get_input_embeddings()
    mixed = emb(ids).clone()
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if labels[r, t] != IGNORE:
                mixed[r, t + 1] = (1 - lam) * emb(ids[r, t + 1]) + lam * emb(pred_ids[r, t + 1])
    logits = model(inputs_embeds=mixed, **kw).logits
    sel = labels != IGNORE
    return -token_logprobs(logits[sel], labels[sel])


def _manual_ift(model: Any, batch: dict[str, torch.Tensor], lam: float, gamma: float, n: int) -> torch.Tensor:
    """IFT's loss: the manual token NLLs weighted by `ift_weights` (tested on its own above), over `n`."""
    nll = _manual_ift_nll(model, batch, lam)
    sel = batch["labels"] != IGNORE
    return (ift_weights(nll, batch["seq_index"][sel], gamma) * nll).sum() / n


@pytest.mark.parametrize("fixture", ["sft_batch", "packed_batch"])
def test_ift_objective_matches_manual(make_model: Any, request: pytest.FixtureRequest, fixture: str) -> None:
    batch = with_ids(request.getfixturevalue(fixture))
    model = make_model()
    obj = make_obj("ift")
    assert (obj.cfg.lam, obj.cfg.gamma) == (0.2, 0.95) and obj.batch_format == "sft"
    n = obj.num_items(batch)
    loss, _ = obj.loss(model, batch, n)
    want = _manual_ift(model, batch, 0.2, 0.95, n)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    # the mix changes the loss (lam > 0 feeds the model its own guesses), and grads flow
    plain, _ = make_obj("ift", lam=0.0, gamma=0.95).loss(model, batch, n)
    assert abs(plain.item() - loss.item()) > 1e-6
    loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_ift_config_bounds() -> None:
    with pytest.raises(ValueError):
        IFTConfig(lam=1.5)
    with pytest.raises(ValueError):
        IFTConfig(gamma=-0.1)


def test_ift_weights_carry_when_a_sequence_ends_one_past_a_block() -> None:
    # token 256 (first of the second scan block) is the last of sequence 0: the first block's tokens of
    # sequence 0 take its carry, those after it (sequence 1) do not
    lens = [_CHUNK + 1, 10]
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    losses = torch.rand(seq.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    want = _naive_weights(losses.tolist(), seq.tolist(), 0.9)
    assert ift_weights(losses, seq, 0.9).tolist() == pytest.approx(want, rel=1e-9)


def _one_row(labelled: list[int]) -> dict[str, torch.Tensor]:
    """One 6-token row whose labels sit at the `labelled` positions (each the next input token)."""
    ids = torch.tensor([[5, 17, 29, 41, 53, 65]])
    labels = torch.full_like(ids, IGNORE)
    for t in labelled:
        labels[0, t] = ids[0, t + 1]
    return with_ids({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})


@pytest.mark.parametrize("gamma", [0.95, 0.0])
def test_ift_single_and_no_label_token(make_model: Any, gamma: float) -> None:
    model = make_model()
    obj = make_obj("ift", gamma=gamma)
    # one label token (num_items 1): weight 1 and the mix only feeds later positions, so its plain NLL
    one = _one_row([2])
    want = sft_loss(*label_logits(model, one), 1)
    loss, metrics = obj.loss(model, one, 1)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    assert metrics == pytest.approx({"tokens": 1.0, "nll": want.item()}, rel=1e-6)
    # no label token at all (a prompt-only micro-batch): a zero loss and zero metrics, no error
    loss, metrics = obj.loss(model, _one_row([]), 0)
    assert loss.item() == 0.0 and metrics == {"tokens": 0.0, "nll": 0.0}
    assert ift_weights(torch.empty(0), torch.empty(0, dtype=torch.long), gamma).shape == (0,)


def _small_sft(samples: list[Encoded], packed: bool = False) -> dict[str, torch.Tensor]:
    """Two samples (padded rows), or three packed in two rows."""
    rows = [samples[:2], samples[2:3]] if packed else [[s] for s in samples[:2]]
    batch = collate(rows, 2, packed=packed)
    batch.pop("real_tokens")
    return with_ids(batch)


@pytest.mark.parametrize("gamma", [0.95, 0.0])
def test_ift_metrics_are_the_micro_batch_mean_nll(make_model: Any, samples: list[Encoded], gamma: float) -> None:
    # num_items counts the whole step's tokens (here 3x this micro-batch's): it scales the loss, never the nll
    batch = _small_sft(samples)
    model = make_model()
    n = make_obj("ift").num_items(batch)
    loss, metrics = make_obj("ift", lam=0.2, gamma=gamma).loss(model, batch, 3 * n)
    nll = _manual_ift_nll(model, batch, 0.2)
    assert nll.numel() == n
    torch.testing.assert_close(loss, _manual_ift(model, batch, 0.2, gamma, 3 * n), rtol=1e-5, atol=1e-6)
    assert metrics == pytest.approx({"tokens": float(n), "nll": nll.mean().item()}, rel=1e-5)


def test_ift_lam1_gamma1_matches_manual(make_model: Any, samples: list[Encoded]) -> None:
    # lam 1: the response inputs are the guesses alone; gamma 1: undiscounted reverse sums (not SFT)
    batch = _small_sft(samples)
    model = make_model()
    n = make_obj("ift").num_items(batch)
    loss, _ = make_obj("ift", lam=1.0, gamma=1.0).loss(model, batch, n)
    torch.testing.assert_close(loss, _manual_ift(model, batch, 1.0, 1.0, n), rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - _manual_ift(model, batch, 0.0, 0.0, n).item()) > 1e-3


def test_ift_models_without_the_fast_path(make_model: Any, samples: list[Encoded]) -> None:
    """A model the decoder + head fast path would get wrong (here flagged by a head extra) runs its own
    forward with `inputs_embeds`: on packed rows, position ids and no cache keep the sequences apart."""
    batch = _small_sft(samples, packed=True)
    want = _manual_ift(make_model(), batch, 0.2, 0.95, 7)
    model = make_model()
    model.config.logit_scale = 1.0  # llama ignores it; it only routes the objective to the model's forward
    assert _plain_lm(model) is None
    loss, _ = make_obj("ift").loss(model, batch, 7)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


# ===================================================================================== Masked Thought


def test_mask_rate_schedule() -> None:
    # 100 steps, warm-up over the first 66: linear from 0 to 0.2, then flat
    assert mask_rate(0, 100, 0.2, 0.66) == 0.0
    assert mask_rate(33, 100, 0.2, 0.66) == pytest.approx(0.1)
    assert mask_rate(66, 100, 0.2, 0.66) == pytest.approx(0.2)
    assert mask_rate(99, 100, 0.2, 0.66) == pytest.approx(0.2)
    assert mask_rate(10, 100, 0.4, 0.5) == pytest.approx(0.4 * 10 / 50)
    assert mask_rate(0, 100, 0.4, 0.0) == 0.4  # no warm-up: the full rate from the start


IDS = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 0]])
LABS = torch.tensor([[IGNORE, IGNORE, 13, 14, 15, IGNORE], [IGNORE, 22, 23, IGNORE, IGNORE, IGNORE]])


def test_corrupt_only_response_inputs() -> None:
    labels = LABS.clone()
    resp = response_inputs(labels)
    assert resp.tolist() == [[False, False, False, True, True, True], [False, False, True, True, False, False]]
    out = corrupt(IDS, labels, 1.0, torch.Generator().manual_seed(0), 50, replace_id=99)
    assert torch.equal(out, torch.where(resp, 99, IDS))  # rate 1: every response input, nothing else
    assert torch.equal(labels, LABS)  # labels untouched
    rnd = corrupt(IDS, labels, 0.5, torch.Generator().manual_seed(3), 50)
    assert torch.equal(rnd[~resp], IDS[~resp])
    assert ((rnd >= 0) & (rnd < 50)).all()


def test_corrupt_reproducible_and_rate0() -> None:
    big = torch.arange(4 * 64).reshape(4, 64) % 1000
    labels = big.clone()
    labels[:, :10] = IGNORE
    a = corrupt(big, labels, 0.3, torch.Generator().manual_seed(5), 1000)
    b = corrupt(big, labels, 0.3, torch.Generator().manual_seed(5), 1000)
    c = corrupt(big, labels, 0.3, torch.Generator().manual_seed(6), 1000)
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a != big).float().sum() / response_inputs(labels).sum()
    assert 0.15 < changed.item() < 0.45
    assert torch.equal(corrupt(big, labels, 0.0, torch.Generator().manual_seed(5), 1000), big)


def test_batch_generator_keys() -> None:
    def draw(seed: int, step: int, ids: list[int]) -> torch.Tensor:
        return torch.rand(4, generator=batch_generator(seed, step, torch.tensor(ids)))

    assert torch.equal(draw(0, 3, [1, 2]), draw(0, 3, [1, 2]))
    assert not torch.equal(draw(0, 3, [1, 2]), draw(0, 4, [1, 2]))
    assert not torch.equal(draw(0, 3, [1, 2]), draw(1, 3, [1, 2]))
    assert not torch.equal(draw(0, 3, [1, 2]), draw(0, 3, [1, 3]))


def test_masked_thought_objective(make_model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    batch = with_ids(sft_batch)
    model = make_model().train()
    obj = make_obj("masked_thought", max_rate=0.4, seed=11)
    n = obj.num_items(batch)
    plain = sft_loss(*label_logits(model, batch), n)
    # step 0: rate 0, exactly SFT
    obj.on_step(0, 10)
    loss0, m0 = obj.loss(model, batch, n)
    assert m0["mask_rate"] == 0.0 and torch.equal(loss0, plain)
    # past warm-up: the corrupted batch, reproducibly (same step and sample ids -> same loss)
    obj.on_step(8, 10)
    loss, m = obj.loss(model, batch, n)
    assert m["mask_rate"] == pytest.approx(0.4)
    ids = corrupt_sequences(batch, 0.4, 11, 8, model.config.vocab_size)
    assert not torch.equal(ids, batch["input_ids"])
    # each sequence's draws are its own: the first sample alone is corrupted exactly as inside the batch
    first = (batch["seq_index"] == 0).nonzero(as_tuple=True)[1]
    a, b = int(first.min()), int(first.max()) + 2
    alone = corrupt(batch["input_ids"][:1, a:b], batch["labels"][:1, a:b], 0.4, batch_generator(11, 8, batch["sample_ids"][:1]), model.config.vocab_size)
    assert torch.equal(ids[0, a:b], alone[0])
    want = sft_loss(*label_logits(model, {**batch, "input_ids": ids}), n)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert torch.equal(obj.loss(model, batch, n)[0], loss)
    assert loss.item() != pytest.approx(plain.item())
    loss.backward()
    # eval mode (validation): plain SFT whatever the step
    model.eval()
    torch.testing.assert_close(obj.loss(model, batch, n)[0], plain.detach())


def test_masked_thought_pad_replacement(make_model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    batch = with_ids(sft_batch)
    model = make_model().train()
    obj = make_obj("masked_thought", replace="pad", max_rate=1.0, warmup_frac=0.0)
    n = obj.num_items(batch)
    loss, _ = obj.loss(model, batch, n)
    pad = model.config.pad_token_id
    ids = torch.where(response_inputs(batch["labels"]), pad, batch["input_ids"])
    torch.testing.assert_close(loss, sft_loss(*label_logits(model, {**batch, "input_ids": ids}), n), rtol=0, atol=0)
    explicit = make_obj("masked_thought", replace="pad", max_rate=1.0, warmup_frac=0.0, mask_token_id=5)
    ids5 = torch.where(response_inputs(batch["labels"]), 5, batch["input_ids"])
    want5 = sft_loss(*label_logits(model, {**batch, "input_ids": ids5}), n)
    torch.testing.assert_close(explicit.loss(model, batch, n)[0], want5, rtol=0, atol=0)
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="mask_token_id"):
        obj.loss(model, batch, n)


def test_masked_thought_config_defaults() -> None:
    cfg = MaskedThoughtConfig()
    assert (cfg.max_rate, cfg.warmup_frac, cfg.replace, cfg.mask_token_id) == (0.2, 0.66, "random", None)


def test_mask_rate_warmup_of_at_most_one_step() -> None:
    # a warm-up shorter than one step still starts from 0 at step 0 (only a zero warm-up starts at full rate)
    assert mask_rate(0, 1, 0.2, 0.66) == 0.0
    assert mask_rate(0, 2, 0.4, 0.5) == 0.0
    assert mask_rate(1, 2, 0.4, 0.5) == 0.4


def test_corrupt_hits_strictly_below_the_rate() -> None:
    """Independent re-implementation: one uniform draw per position over the grid, then one vocabulary id per
    position; a response input is replaced iff its draw is < rate (a draw equal to the rate is not a hit)."""
    gen = torch.Generator().manual_seed(4)
    draws = torch.rand(IDS.shape, generator=gen)
    ids = torch.randint(0, 50, IDS.shape, generator=gen)
    resp = response_inputs(LABS)
    rate = float(draws[resp].sort().values[2])  # the third-lowest response draw: two hits, one draw == rate
    hit = (draws < rate) & resp
    assert int(hit.sum()) == 2
    want = torch.where(hit, ids, IDS)
    assert torch.equal(corrupt(IDS, LABS, rate, torch.Generator().manual_seed(4), 50), want)
    # the ids keep their dtype
    narrow = corrupt(IDS.int(), LABS, rate, torch.Generator().manual_seed(4), 50)
    assert narrow.dtype == torch.int32 and torch.equal(narrow.long(), want)


def test_corrupt_inputs_on_another_device_than_the_generator() -> None:
    # the generator stays on the CPU while the batch sits on the accelerator (meta stands in for it)
    for replace_id in (None, 99):
        out = corrupt(IDS.to("meta"), LABS.to("meta"), 0.5, torch.Generator().manual_seed(0), 50, replace_id)
        assert out.device.type == "meta" and out.dtype == torch.long and out.shape == IDS.shape


def test_batch_generator_seed_derivation() -> None:
    """The seed is blake2b-64 of repr((seed, step, ids)), little-endian, top bit cleared: fixed, so a resumed
    run (or another release) corrupts exactly as the original. This key's digest has its top and lowest bits set."""
    digest = int.from_bytes(hashlib.blake2b(b"(0, 2, [7])", digest_size=8).digest(), "little")
    assert digest >> 63 == 1 and digest & 1 == 1
    assert batch_generator(0, 2, torch.tensor([7])).initial_seed() == digest & (2**63 - 1) == 7952967928101352927


def test_corrupt_sequences_unlabelled_and_one_token_sequences() -> None:
    # sample 100 has no label left (skipped), 101 one label token, 102 and 103 several; rate 1: every response input
    ids = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    labels = torch.tensor([[IGNORE, 12, IGNORE, 14, 15, IGNORE], [21, 22, 23, IGNORE, IGNORE, IGNORE]])
    seq = torch.tensor([[-1, 1, -1, 2, 2, -1], [3, 3, 3, -1, -1, -1]])
    batch = {"input_ids": ids, "labels": labels, "seq_index": seq, "sample_ids": torch.tensor([100, 101, 102, 103])}
    out = corrupt_sequences(batch, 1.0, 0, 0, 50, replace_id=99)
    assert out.tolist() == [[10, 11, 99, 13, 99, 99], [20, 99, 99, 99, 24, 25]]
    assert torch.equal(batch["input_ids"], ids)  # a copy


def test_masked_thought_vocab_sources() -> None:
    def stub(rows: int, **config: Any) -> Any:
        module = torch.nn.Module()
        module.config = SimpleNamespace(**config)
        module.get_input_embeddings = lambda: torch.nn.Embedding(rows, 4)
        return module

    rnd = make_obj("masked_thought")
    assert rnd._replacement(stub(37, vocab_size=40)) == (40, None)  # the config's vocab_size first
    assert rnd._replacement(stub(37)) == (37, None)  # a config without one (multimodal): the embedding rows
    assert rnd._replacement(stub(37, vocab_size=None)) == (37, None)
    assert make_obj("masked_thought", vocab_size=7)._replacement(stub(37, vocab_size=40)) == (7, None)
    pad = make_obj("masked_thought", replace="pad")
    assert pad._replacement(stub(37, vocab_size=40, pad_token_id=3)) == (40, 3)
    assert make_obj("masked_thought", replace="pad", mask_token_id=0)._replacement(stub(37, pad_token_id=3)) == (37, 0)
    msg = "masked_thought replace=pad: set objective.mask_token_id (the model has no pad_token_id)"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        pad._replacement(stub(37))  # no pad_token_id attribute at all


def test_masked_thought_ramped_rate_vocab_and_metrics(make_model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    batch = with_ids(sft_batch)
    model = make_model().train()
    obj = make_obj("masked_thought", max_rate=0.4, warmup_frac=0.5, vocab_size=7, seed=5)
    obj.on_step(3, 10)  # 3 of the 5 warm-up steps: 0.4 * 3 / 5
    n = obj.num_items(batch)
    loss, metrics = obj.loss(model, batch, n)
    assert metrics == {"tokens": float(n), "mask_rate": pytest.approx(0.24)}
    ids = corrupt_sequences(batch, metrics["mask_rate"], 5, 3, 7)
    changed = ids != batch["input_ids"]
    assert changed.any() and (ids[changed] < 7).all()
    torch.testing.assert_close(loss, sft_loss(*label_logits(model, {**batch, "input_ids": ids}), n), rtol=0, atol=0)


# ================================================================================== device placement

_LOSSES5, _SEQ5 = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([0, 0, 0, 1, 1])
_DEVICE_CASES = {
    "kto_loss": lambda: kto_loss(POL, REF, DES, 0.5)[0],
    "rrhf_loss": lambda: rrhf_loss(SUMS, LENS, SCORES, UNIT)[0],
    "ift_weights": lambda: ift_weights(_LOSSES5, _SEQ5, 0.5),
    "corrupt_random": lambda: corrupt(IDS, LABS, 0.5, torch.Generator().manual_seed(3), 50),
    "corrupt_pad": lambda: corrupt(IDS, LABS, 0.5, torch.Generator().manual_seed(3), 50, replace_id=99),
}


@pytest.mark.parametrize("name", sorted(_DEVICE_CASES))
def test_tensors_follow_the_inputs_not_the_default_device(name: str) -> None:
    """On an accelerator the inputs' device is not the default one: every tensor a loss function makes must
    follow its inputs (or the generator). Here the default device is meta and the inputs are on the CPU."""
    want = _DEVICE_CASES[name]()
    with torch.device("meta"):
        got = _DEVICE_CASES[name]()
    assert got.device.type == "cpu" and torch.equal(got, want)


@pytest.mark.parametrize("name", ["masked_thought", "ift"])
def test_objective_runs_inside_a_data_parallel_wrapper(name: str, make_model: Any, sft_batch: dict[str, torch.Tensor]) -> None:
    """Multi-process training hands the objective the DDP wrapper, which has no config and no embeddings of its
    own (DataParallel stands in for it on CPU): the loss must equal the plain model's."""
    batch = with_ids(sft_batch)
    obj = make_obj(name)
    obj.on_step(5, 10)
    model = make_model().train()
    n = obj.num_items(batch)
    plain, _ = obj.loss(model, batch, n)
    wrapped, _ = obj.loss(torch.nn.DataParallel(model), batch, n)
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)
