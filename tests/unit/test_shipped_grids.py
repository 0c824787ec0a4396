"""Every grid and search space shipped in configs/compare/ validates: each cell is a valid run config."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from tunelab.compare import cell_config, load_grid
from tunelab.search import load_space

GRIDS = sorted(p for p in (REPO / "configs" / "compare").glob("*.yaml") if not p.stem.startswith("search"))
SPACES = sorted((REPO / "configs" / "compare").glob("search*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_grid_cells_validate(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # grids name ../shared/data relative to the repository root
    grid, out = load_grid(path)
    assert grid.cells and out.parts[:2] == ("runs", "compare")
    for cell in grid.cells:
        cfg = cell_config(grid, cell, out)
        assert cfg["out"].endswith(f"cells/{cell.label}") and cfg["eval"]["before"] is False


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_search_spaces_validate(path: Path) -> None:
    space, out = load_space(path)
    assert space.space and space.trials > 0
