"""Fixtures of the pytest-benchmark groups (``make bench-pytest``; not part of ``make test``).

``--bench-quick`` uses the tiny workloads (seconds); the default is the full sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import ckptio
from ckptio.benchmark.workloads import Workload, build


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-quick", action="store_true", help="tiny workloads")


@pytest.fixture(scope="session", params=["llm", "small", "ckpt"])
def workload(request: pytest.FixtureRequest) -> Iterator[Workload]:
    yield build(request.param, quick=request.config.getoption("--bench-quick"))


@pytest.fixture(scope="session")
def files(workload: Workload, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The workload saved by torch.save and by ckptio.save."""
    d = tmp_path_factory.mktemp(workload.name)
    paths = {"torch": d / "torch.pt", "ckptio": d / "ckptio.pt"}
    torch.save(workload.obj, paths["torch"])
    ckptio.save(workload.obj, paths["ckptio"])
    return {k: str(v) for k, v in paths.items()} | {"dir": Path(d)}
