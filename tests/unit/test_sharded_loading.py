"""FSDP2 loading (train/sharded.py), two gloo processes spawned in the test: rank 0 reads the weights, rank 1 builds
a meta-device skeleton (no memory, no weights read) and receives its shards; both then compute what the unsharded
model computes."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp


def _worker(rank: int, store_file: str, out: str) -> None:
    from tunelab.config import ModelConfig
    from tunelab.methods import METHODS
    from tunelab.methods.lora import LoRAConfig
    from tunelab.models import load_model
    from tunelab.train import sharded
    from tunelab.train.dist import Dist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", store=tdist.FileStore(store_file, 2), rank=rank, world_size=2)
    dist = Dist(rank, 2)
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny-llama")
    if rank == 0:
        model, _ = load_model(cfg, "cpu")
    config = dist.from_main(lambda: model.config)
    if rank == 1:
        model = sharded.skeleton(cfg, config)
    was_meta = sharded.on_meta(model)
    torch.manual_seed(1)
    model = METHODS.get("lora")(LoRAConfig(r=4, init="gaussian")).tune(model)  # rank 1 tunes its skeleton
    state = model.state_dict() if rank == 0 else {}
    reference = None
    if rank == 0:  # what the unsharded model computes
        ids = torch.arange(3, 35).view(2, 16)
        with torch.no_grad():
            reference = model(input_ids=ids, use_cache=False).logits
    model = sharded.shard(model, dist, torch.device("cpu"))
    sharded.fill_from_main(model, state, dist, torch.device("cpu"))
    with torch.no_grad():
        got = model(input_ids=torch.arange(3, 35).view(2, 16), use_cache=False).logits
    torch.save({"was_meta": was_meta, "got": got, "reference": reference}, f"{out}/rank{rank}.pt")
    tdist.destroy_process_group()


def test_skeleton_rank_receives_the_main_weights(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not r0["was_meta"] and r1["was_meta"]  # only the main process held real weights before sharding
    assert torch.allclose(r0["got"], r0["reference"], atol=1e-5)
    assert torch.allclose(r1["got"], r0["reference"], atol=1e-5)  # the skeleton rank computes the real model
