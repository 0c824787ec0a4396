"""Packing and collation.

Packed rows carry `position_ids` that restart at 0 for every sample and no attention mask; transformers
then builds a block-diagonal causal mask, so no sample attends to another. Labels are shifted *per sample*
here (target at t = token t+1 of the same sample, IGNORE at each sample's last position), so the loss never
asks a sample to predict the first token of its neighbour.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data.templating import IGNORE, Encoded


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sample indices into rows of at most `capacity` tokens.

    Deterministic: ties keep the original order. Rows come out in first-fit order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def shifted(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE]


def collate(samples: list[list[Encoded]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Batch of rows (each a list of samples) -> tensors.

    Packed: input_ids, position_ids, labels (shifted). Unpacked (one sample per row): input_ids,
    attention_mask, labels (shifted), right padding. Both carry `real_tokens`, the non-padding count,
    `seq_index` (the sequence, numbered row by row, of every labelled position; -1 elsewhere) and `num_seqs`.
    """
    width = max(sum(len(s.input_ids) for s in row) for row in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(samples), width), dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    seq = torch.full((len(samples), width), -1, dtype=torch.long)
    k = 0
    for b, row in enumerate(samples):
        t = 0
        for s in row:
            n = len(s.input_ids)
            ids[b, t : t + n] = torch.tensor(s.input_ids)
            labels[b, t : t + n] = torch.tensor(shifted(s.labels))
            pos[b, t : t + n] = torch.arange(n)
            mask[b, t : t + n] = 1
            seq[b, t : t + n] = k
            t += n
            k += 1
        # the padding tail is its own segment (positions from 0), so real tokens never attend to it
        pos[b, t:] = torch.arange(width - t)
    seq[labels == IGNORE] = -1
    batch: dict[str, Any] = {
        "input_ids": ids, "labels": labels, "real_tokens": mask.sum(), "seq_index": seq, "num_seqs": torch.tensor(k),
    }
    if packed:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = mask
    return batch
