"""The measuring step of CRaSh (see crash.py): linear CKA between layer representations, the merge of adjacent
layer clusters, and per-sequence pooling of hidden states in padded or packed batches. Pure functions, so each
is checked by hand in tests/unit/test_method_crash.py.

Linear CKA (Kornblith et al., 2019, arXiv 1905.00414) of two representations X [n, d1], Y [n, d2] of the same
n examples, with column means removed:  CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). It is 1 for X = Y and
invariant to orthogonal transforms and isotropic scaling of either side. Computed in float64 for determinism.
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples (x [n, d1], y [n, d2]); 0 if either is constant."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / den) if den > 0 else 0.0


def cka_matrix(feats: list[torch.Tensor]) -> torch.Tensor:
    n = len(feats)
    sim = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = linear_cka(feats[i], feats[j])
    return sim


def cluster_adjacent(sim: torch.Tensor, k: int) -> list[list[int]]:
    """Merge adjacent clusters of 0..n-1 with the highest boundary similarity until k remain (ties: leftmost)."""
    clusters = [[i] for i in range(sim.shape[0])]
    while len(clusters) > k:
        scores = [float(sim[a[-1], b[0]]) for a, b in zip(clusters[:-1], clusters[1:], strict=True)]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        clusters[best : best + 2] = [clusters[best] + clusters[best + 1]]
    return clusters


def representative(sim: torch.Tensor, members: list[int]) -> int:
    """The member with the highest mean similarity to the others (ties: the first)."""
    if len(members) == 1:
        return members[0]
    means = [sum(float(sim[m, o]) for o in members if o != m) / (len(members) - 1) for m in members]
    return members[max(range(len(members)), key=lambda i: (means[i], -i))]


def sequence_spans(batch: dict[str, torch.Tensor], pad_id: int | None) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sequence in a batch: padded rows by attention_mask, packed rows by position_ids."""
    ids = batch["input_ids"]
    mask, pos = batch.get("attention_mask"), batch.get("position_ids")
    spans = []
    for b in range(ids.shape[0]):
        real = mask[b].bool().tolist() if mask is not None else [True] * ids.shape[1]
        restart = (pos[b] == 0).tolist() if pos is not None else [False] * ids.shape[1]
        row: list[list[int]] = []
        for t, is_real in enumerate(real):
            if is_real and row and row[-1][1] == t and not restart[t]:
                row[-1][1] = t + 1
            elif is_real:
                row.append([t, t + 1])
        if mask is None and row and pad_id is not None and bool((ids[b, row[-1][0] : row[-1][1]] == pad_id).all()):
            row.pop()  # a packed row's padding tail is a segment of its own
        spans += [(b, s, e) for s, e in row]
    return spans


def pool(hidden: torch.Tensor, spans: list[tuple[int, int, int]], how: str) -> torch.Tensor:
    rows = [hidden[b, s:e].double().mean(0) if how == "mean" else hidden[b, e - 1].double() for b, s, e in spans]
    return torch.stack(rows).cpu()
