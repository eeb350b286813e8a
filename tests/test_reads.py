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


def test_several_sources_one_plan(tmp_path: Path, cpu_ring: list[Any], monkeypatch: Any) -> None:
    # The shards of a directory: each loader gathers its own reads, one batch absorbs them
    # and run() reads every host range of every file in one C++ call.
    payloads = [bytes((i * (s + 3) + s) % 253 for i in range(50_000 + 999 * s)) for s in range(5)]
    paths = []
    for s, payload in enumerate(payloads):
        paths.append(tmp_path / f"shard{s}.bin")
        paths[-1].write_bytes(payload)
    calls: list[int] = []
    real = _core.io.read_many
    monkeypatch.setattr(
        _core.io, "read_many", lambda batches, *a: (calls.append(len(batches)), real(batches, *a))
    )
    target = _staging.DeviceTarget(torch.device("cpu"), lambda: _staging.TorchCopier("cpu"))
    files = [_core.io.File.open(str(p), _core.io.FileMode.READ) for p in paths]
    try:
        combined = _reads.ReadBatch(files[0])
        host = [torch.zeros(4000, dtype=torch.uint8) for _ in files]
        staged = [target.allocate(3000) for _ in files]
        for f, h, d in zip(files, host, staged, strict=True):
            own = _reads.ReadBatch(f)
            own.to_host(100, 2000, h.data_ptr())
            own.to_host(40_000, 2000, h.data_ptr() + 2000)
            own.to_target(target, 7, 3000, d)
            combined.absorb(own)
            assert not own  # taken over
        combined.run()
    finally:
        for f in files:
            f.close()
    assert calls == [5]  # every file's host ranges, one plan
    for payload, h, d in zip(payloads, host, staged, strict=True):
        assert _bytes(h) == payload[100:2100] + payload[40_000:42_000]
        assert _bytes(d) == payload[7:3007]


def test_several_sources_are_all_checked_before_any_read(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a" * 100)
    (tmp_path / "b").write_bytes(b"b" * 50)
    out = torch.full((100,), 7, dtype=torch.uint8)
    with (
        _core.io.File.open(str(tmp_path / "a"), _core.io.FileMode.READ) as a,
        _core.io.File.open(str(tmp_path / "b"), _core.io.FileMode.READ) as b,
    ):
        batch = _reads.ReadBatch(a)
        batch.to_host(0, 100, out.data_ptr())
        batch.to_host(40, 20, out.data_ptr(), source=b)
        with pytest.raises(_core.CheckpointError, match=r"b: range of 20 bytes at offset 40"):
            batch.run()
    assert _bytes(out) == bytes([7]) * 100  # the good file was not read either
