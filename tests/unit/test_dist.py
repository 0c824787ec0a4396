"""The single-process side of train/dist.py, the engine check and the shipped accelerate configs.
The two-process behaviour is tested end to end in tests/e2e/test_multiprocess.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

from tunelab.train import dist as d
from tunelab.train.loop import _check_engine, _collate, _next_position


def test_shard_partitions_a_step_across_ranks() -> None:
    items = list(range(6))
    shares = [d.Dist(r, 3).shard(items) for r in range(3)]
    assert shares == [[0, 3], [1, 4], [2, 5]]
    assert sorted(x for s in shares for x in s) == items  # every micro-batch once, none twice


def test_single_process_collectives_are_identities() -> None:
    one = d.SINGLE
    assert one.is_main and one.sum([1.0, 2.5]) == [1.0, 2.5] and one.gather("x") == ["x"]
    assert one.from_main(lambda: 7) == 7
    with pytest.raises(ValueError, match="boom"):
        one.from_main(lambda: (_ for _ in ()).throw(ValueError("boom")))
    with one.main_first():
        pass


@pytest.mark.parametrize(("env", "world", "rank", "cpu"), [
    ({}, 1, 0, False),
    ({"WORLD_SIZE": "2", "RANK": "1"}, 2, 1, True),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, 4, 3, True),
])
def test_launcher_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], world: int, rank: int, cpu: bool) -> None:
    for k in ("WORLD_SIZE", "RANK", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(d.torch.cuda, "is_available", lambda: False)
    assert d.launched_world_size() == world and d.launched_rank() == rank
    # without cpu=True accelerate would run N independent copies on a CPU machine (measured: world size 1 each)
    assert d.accelerator_kwargs() == ({"cpu": True} if cpu else {})


def test_orphan_detection() -> None:
    import os

    assert not d.orphaned(None) and not d.orphaned(os.getppid()) and d.orphaned(os.getppid() + 1_000_000)


def test_positions_cross_epochs_like_one_process() -> None:
    """Positions advance through the global order; a step of 4 micro-batches over an epoch of 3 spans two epochs."""
    data = type("D", (), {"__len__": lambda self: 3, "order": lambda self, e: [e * 10 + i for i in range(3)],
                          "batch": lambda self, e, i, order: order[i]})()
    state = SimpleNamespace(epoch=0, micro=0)
    pos = [_next_position(data, state) for _ in range(4)]  # type: ignore[arg-type]
    assert pos == [(0, 0), (0, 1), (0, 2), (1, 0)]
    cache: dict[int, list[int]] = {}
    assert [_collate(data, p, cache) for p in pos] == [0, 1, 2, 10]  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_engines_are_refused(kind: str) -> None:
    acc = SimpleNamespace(distributed_type=SimpleNamespace(value=kind))
    with pytest.raises(NotImplementedError, match=f"{kind}.*train.fsdp=true"):
        _check_engine(acc)
    _check_engine(SimpleNamespace(distributed_type=SimpleNamespace(value="MULTI_GPU")))


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: Path(p).stem)
def test_shipped_accelerate_configs_parse(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.value == "MULTI_GPU" and cfg.num_processes >= 2
    assert cfg.mixed_precision == "no"  # tunelab sets precision from train.mixed_precision
    assert f"--config_file configs/accelerate/{path.name}" in path.read_text()  # the file says how to launch it
