"""The one read engine (_reads.ReadBatch): host reads, pre-laid-out host triples, a load's
device target and existing device tensors, gathered and read by one run()."""

from __future__ import annotations

import array
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptio import _core, _reads, _staging


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, bytes]:
    payload = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
    path = tmp_path / "data.bin"
    path.write_bytes(payload)
    return path, payload


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.view(torch.uint8).reshape(-1).tolist())


def test_every_destination_in_one_run(data: tuple[Path, bytes], cpu_ring: list[Any]) -> None:
    path, payload = data
    target = _staging.DeviceTarget(torch.device("cpu"), lambda: _staging.TorchCopier("cpu"))
    host = torch.zeros(1000, dtype=torch.uint8)
    laid_out = torch.zeros(64, dtype=torch.uint8)
    on_target = target.allocate(300_000)
    on_device = torch.zeros(5000, dtype=torch.uint8)
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        batch = _reads.ReadBatch(f)
        assert not batch
        batch.to_host(10, 1000, host.data_ptr())
        batch.to_host_many(array.array("Q", (5000, 64, laid_out.data_ptr())).tobytes())
        batch.to_target(target, 4096, 200_000, on_target)
        batch.to_target(target, 700_000, 100_000, on_target[200_000:])
        batch.to_device(123_457, 5000, on_device)
        assert batch
        batch.run()
        assert not batch  # emptied: a second run reads nothing
        batch.run()
    assert _bytes(host) == payload[10:1010]
    assert _bytes(laid_out) == payload[5000:5064]
    assert _bytes(on_target[:200_000]) == payload[4096:204_096]
    assert _bytes(on_target[200_000:]) == payload[700_000:800_000]
    assert _bytes(on_device) == payload[123_457:128_457]
    assert target.ring is not None  # the target's own ring, kept for the load's next flush
    assert cpu_ring  # the existing tensor went through its device's copier


def test_a_range_past_the_end_is_the_files_error(data: tuple[Path, bytes]) -> None:
    path, payload = data
    out = torch.zeros(16, dtype=torch.uint8)
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        batch = _reads.ReadBatch(f)
        batch.to_host(len(payload) - 8, 16, out.data_ptr())
        with pytest.raises(_core.CheckpointError, match="past the end"):
            batch.run()
