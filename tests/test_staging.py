"""The staging pipeline (GPU loads and saves) on the CPU.

The scheduling core runs against SimulatedCopier, whose "device" copies run late on a thread
of their own: the tests check the bytes delivered against the file, that the ring bound holds,
that a slot is reused only after its copies completed, that errors surface as the right
exception with no thread left behind, and that saving through the ring writes the same bytes
as saving the CPU copy. TorchCopier's tensor plumbing (views, batched _foreach_copy_) runs
here on a CPU device; its CUDA side (pinned memory, streams, events) is in tests/gpu/.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fractions
import io
import json
import os
import random
import sys
import threading
import weakref
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import ckptio
from _simulated_copier import SimulatedCopier
from ckptio import _core, _staging
from ckptio._staging import (
    DeviceTarget,
    TorchCopier,
    plan_fills,
    stream_in,
    stream_out,
    stream_to_device,
)

from conftest import assert_releases_gil, assert_same, assert_same_sharing, make_model

BUF = 64 << 10  # small buffers so that a few hundred KiB make many fills


def _raw(t: torch.Tensor | torch.UntypedStorage) -> bytes:
    """The bytes of a CPU tensor's or storage's memory (fast: no per-element iteration)."""
    s = t if isinstance(t, torch.UntypedStorage) else t.untyped_storage()
    return ctypes.string_at(s.data_ptr(), s.nbytes()) if s.nbytes() else b""


def _stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ckptio-stage")]


@pytest.fixture
def sim() -> Iterator[SimulatedCopier]:
    copier = SimulatedCopier(delay=0.002)
    yield copier
    copier.close()
    assert not copier.alive
    assert _stage_threads() == []


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    payload = random.Random(0).randbytes(1 << 20)
    path = tmp_path / "data.bin"
    path.write_bytes(payload)
    return path, payload


def _requests(rng: random.Random, size: int, count: int) -> list[tuple[int, int]]:
    """(offset, nbytes) ranges: mostly small, some bigger than a buffer, a few empty."""
    out = []
    for i in range(count):
        n = rng.choice([0, 1, 7, 100, 4096, 5000, BUF - 1, BUF, BUF + 1, 3 * BUF + 17])
        n = min(n, size)
        out.append((rng.randrange(0, size - n + 1), n))
        if i % 5 == 0:
            out.append((rng.randrange(0, size - 64), 64))
    return out


# --------------------------------------------------------------------------------- planning
def test_plan_fills_covers_every_byte_once() -> None:
    rng = random.Random(1)
    reqs = [(off, n, k) for k, (off, n) in enumerate(_requests(rng, 1 << 20, 60))]
    fills = plan_fills(reqs, BUF)
    seen: dict[int, list[tuple[int, int]]] = {}
    for fill in fills:
        assert 0 < fill.used <= BUF
        assert len(fill.reads) == len(fill.segments)
        end = 0
        for (file_off, n, host), (host2, n2, key, target_off) in zip(
            fill.reads, fill.segments, strict=True
        ):
            assert (host, n) == (host2, n2)
            assert host % _staging.HOST_ALIGNMENT == 0 and host >= end  # no overlap
            end = host + n
            req_off = reqs[key][0]
            assert file_off == req_off + target_off
            seen.setdefault(key, []).append((target_off, n))
    for key, (_, n, _) in enumerate(reqs):
        pieces = sorted(seen.get(key, []))
        assert sum(p[1] for p in pieces) == n
        pos = 0
        for off, m in pieces:
            assert off == pos
            pos += m


def test_plan_fills_batches_small_and_splits_large() -> None:
    small = [(i * 100, 10, i) for i in range(100)]
    fills = plan_fills(small, BUF)
    assert len(fills) == 1 and len(fills[0].segments) == 100  # one fill for all of them
    big = plan_fills([(0, 10 * BUF + 5, "big")], BUF)
    assert len(big) == 11
    assert [f.segments[0][3] for f in big] == [i * BUF for i in range(11)]
    assert big[-1].used == 5


# ----------------------------------------------------------------------------- stream_in
def _targets(reqs: list[tuple[int, int]]) -> list[torch.Tensor]:
    return [torch.full((n,), 0xA5, dtype=torch.uint8) for _, n in reqs]


def _check_delivered(reqs: Any, targets: Any, payload: bytes) -> None:
    for (off, n), t in zip(reqs, targets, strict=True):
        assert _raw(t) == payload[off : off + n]


@pytest.mark.parametrize("buffers", [1, 2, 4])
def test_stream_in_delivers_exact_bytes_with_a_bounded_ring(
    sim: SimulatedCopier, data_file: tuple[Path, bytes], buffers: int
) -> None:
    path, payload = data_file
    reqs = _requests(random.Random(buffers), len(payload), 80)
    targets = _targets(reqs)
    fills = plan_fills(
        [(o, n, sim.bind(t)) for (o, n), t in zip(reqs, targets, strict=True) if n], BUF
    )
    assert len(fills) > 2 * buffers
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        stream_in(f, fills, sim, buffers=buffers, threads=2, chunk_bytes=1 << 14)
    _check_delivered(reqs, targets, payload)
    assert sim.allocated == buffers  # the ring, never more
    assert sim.max_in_flight <= buffers
    assert sim.violations == []  # a slot was never refilled before its copies ran
    assert sim.finished_after == sim.issued == len(fills)  # the caller waits on everything


def test_simulated_copier_detects_a_slot_reused_too_early(sim: SimulatedCopier) -> None:
    """The reuse check has teeth: overwriting a slot whose copy has not run is reported."""
    slow = SimulatedCopier(delay=0.05)
    try:
        slot = slow.allocate(4096)
        target = torch.zeros(4096, dtype=torch.uint8)
        event = slow.to_device(slot, [(0, 4096, slow.bind(target), 0)])
        ctypes.memset(slot.address, 1, 4096)  # the bug the pipeline must never have
        event.synchronize()
        assert slow.violations
    finally:
        slow.close()


class _FailingSource:
    """A File whose n-th batch of reads fails with EIO."""

    def __init__(self, file: _core.io.File, fail_at: int) -> None:
        self.file, self.fail_at, self.calls = file, fail_at, 0
        self.lock = threading.Lock()  # two reader threads call in

    def read_into(self, requests: Any, threads: int, chunk_bytes: int) -> None:
        with self.lock:
            self.calls += 1
            call = self.calls
        if call == self.fail_at:
            raise OSError(errno.EIO, "injected read error")
        self.file.read_into(requests, threads, chunk_bytes)


def _plan(sim: SimulatedCopier, n_fills: int) -> tuple[list[Any], list[torch.Tensor]]:
    targets = [torch.zeros(BUF, dtype=torch.uint8) for _ in range(n_fills)]
    return plan_fills([(i * BUF, BUF, sim.bind(t)) for i, t in enumerate(targets)], BUF), targets


@pytest.mark.parametrize("fail_at", [1, 3, 8])
def test_stream_in_read_error_surfaces(
    sim: SimulatedCopier, data_file: tuple[Path, bytes], fail_at: int
) -> None:
    fills, _ = _plan(sim, 8)
    with _core.io.File.open(str(data_file[0]), _core.io.FileMode.READ) as f:
        with pytest.raises(OSError) as info:
            stream_in(_FailingSource(f, fail_at), fills, sim, buffers=2, threads=2, chunk_bytes=BUF)
    assert info.value.errno == errno.EIO
    assert _stage_threads() == []


def test_stream_in_reports_a_truncated_file(sim: SimulatedCopier, tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * (3 * BUF))
    fills, _ = _plan(sim, 8)
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        with pytest.raises(ckptio.CheckpointError, match="truncated|past the end"):
            stream_in(f, fills, sim, buffers=2, threads=2, chunk_bytes=BUF)
    assert _stage_threads() == []


@pytest.mark.parametrize("kind", ["issue", "copy"])
@pytest.mark.parametrize("at", [0, 3, 7])
def test_stream_in_copy_error_surfaces(data_file: tuple[Path, bytes], kind: str, at: int) -> None:
    copier = SimulatedCopier(
        delay=0.002,
        fail_issue=at if kind == "issue" else None,
        fail_copy=at if kind == "copy" else None,
    )
    try:
        fills, _ = _plan(copier, 8)
        with _core.io.File.open(str(data_file[0]), _core.io.FileMode.READ) as f:
            with pytest.raises(RuntimeError, match=f"simulated copy .*failure at batch {at}"):
                stream_in(f, fills, copier, buffers=2, threads=2, chunk_bytes=BUF)
        assert _stage_threads() == []
        # Nothing is left in flight on the ring: every issued copy has run.
        assert copier._in_flight == 0
    finally:
        copier.close()


def test_stream_in_with_torch_copier_on_cpu(data_file: tuple[Path, bytes]) -> None:
    path, payload = data_file
    reqs = _requests(random.Random(7), len(payload), 200)
    targets = _targets(reqs)
    copier = TorchCopier("cpu")
    fills = plan_fills(
        [(o, n, copier.bind(t)) for (o, n), t in zip(reqs, targets, strict=True) if n], BUF
    )
    assert max(len(f.segments) for f in fills) >= _staging.BATCH_PIECES  # the batched path
    assert min(len(f.segments) for f in fills) < _staging.BATCH_PIECES  # the direct path
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        stream_in(f, fills, copier, buffers=3, threads=2, chunk_bytes=1 << 14)
    _check_delivered(reqs, targets, payload)
    assert copier.allocated == 3


@pytest.mark.parametrize("n_fills", [1, 8], ids=["caller-thread", "reader-threads"])
@pytest.mark.parametrize("at", [0, 2])
def test_stream_in_failure_after_queued_copies_waits_for_them(
    data_file: tuple[Path, bytes], n_fills: int, at: int
) -> None:
    """An issue that raises after queueing its copies (as a CUDA batch that fails part way):
    when the error reaches the caller, every queued copy has run, so the destinations (which
    the caller then frees) and the slots are no longer written or read by any of them."""
    at = min(at, n_fills - 1)
    copier = SimulatedCopier(delay=0.05, fail_after_queue=at)
    try:
        fills, targets = _plan(copier, n_fills)
        with _core.io.File.open(str(data_file[0]), _core.io.FileMode.READ) as f:
            with pytest.raises(RuntimeError, match=f"failure at batch {at} after queueing"):
                stream_in(f, fills, copier, buffers=2, threads=2, chunk_bytes=BUF)
        assert copier.queued == at + 1
        assert copier.completed == copier.queued  # nothing left to write into `targets`
        assert copier.in_flight == 0 and copier.fences >= 1
        assert copier.violations == []  # no slot was refilled under a pending copy
        assert _stage_threads() == []
        # The failed batch's copies did land (late): they were waited for, not abandoned.
        # Reader threads may hand fills over out of file order, so the batches issued are
        # not always the first ones: count the targets that hold their bytes.
        payload = data_file[1]
        landed = [_raw(t) == payload[i * BUF : (i + 1) * BUF] for i, t in enumerate(targets)]
        assert sum(landed) == copier.queued
    finally:
        copier.close()


# ---------------------------------------------------------------------------- stream_out
@pytest.mark.parametrize("make", ["sim", "torch"])
def test_stream_out_writes_exact_bytes_and_crcs(tmp_path: Path, make: str) -> None:
    copier: Any = SimulatedCopier(delay=0.002) if make == "sim" else TorchCopier("cpu")
    try:
        rng = random.Random(3)
        sizes = [rng.choice([1, 33, 4096, BUF - 3, 2 * BUF + 9, 5 * BUF]) for _ in range(40)]
        sources = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
        offsets, pos = [], 0
        for n in sizes:
            offsets.append(pos)
            pos += n + 13  # gaps, as between records
        fills = plan_fills(
            [
                (o, t.numel(), (k, copier.bind(t)))
                for k, (o, t) in enumerate(zip(offsets, sources, strict=True))
            ],
            BUF,
        )
        for fill in fills:
            fill.keys = [t[0] for _, _, t, _ in fill.segments]
            fill.segments = [(h, n, t[1], o) for h, n, t, o in fill.segments]
        path = tmp_path / "out.bin"
        with _core.io.File.open(str(path), _core.io.FileMode.CREATE) as f:
            crcs = stream_out(
                f, fills, copier, buffers=2, threads=2, chunk_bytes=1 << 14, crc32=True
            )
        data = path.read_bytes()
        for k, (o, t) in enumerate(zip(offsets, sources, strict=True)):
            expected = _raw(t)
            assert data[o : o + t.numel()] == expected
            assert crcs[k] == zlib.crc32(expected)
        assert copier.allocated == 2
        assert _stage_threads() == []
    finally:
        if make == "sim":
            copier.close()


def test_stream_out_write_error_surfaces(sim: SimulatedCopier, tmp_path: Path) -> None:
    path = tmp_path / "ro.bin"
    path.write_bytes(b"")
    fills, _ = _plan(sim, 6)
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:  # not writable: EBADF
        with pytest.raises(OSError) as info:
            stream_out(f, fills, sim, buffers=2, threads=2, chunk_bytes=BUF)
    assert info.value.errno == errno.EBADF
    assert _stage_threads() == []


@pytest.mark.parametrize("at", [0, 5])
def test_stream_out_copy_error_surfaces(tmp_path: Path, at: int) -> None:
    copier = SimulatedCopier(delay=0.002, fail_copy=at)
    try:
        fills, _ = _plan(copier, 6)
        with _core.io.File.open(str(tmp_path / "x.bin"), _core.io.FileMode.CREATE) as f:
            with pytest.raises(RuntimeError, match=f"failure at batch {at}"):
                stream_out(f, fills, copier, buffers=2, threads=2, chunk_bytes=BUF)
        assert _stage_threads() == []
    finally:
        copier.close()


def test_stream_out_failure_after_queued_copies_waits_for_them(tmp_path: Path) -> None:
    copier = SimulatedCopier(delay=0.05, fail_after_queue=3)
    try:
        fills, _ = _plan(copier, 6)
        with _core.io.File.open(str(tmp_path / "x.bin"), _core.io.FileMode.CREATE) as f:
            with pytest.raises(RuntimeError, match="failure at batch 3 after queueing"):
                stream_out(f, fills, copier, buffers=2, threads=2, chunk_bytes=BUF)
        assert copier.queued == 4 and copier.completed == 4 and copier.in_flight == 0
        assert _stage_threads() == []
    finally:
        copier.close()


# --------------------------------------------------------------------------------- the ring
def test_ring_reuses_and_grows_its_slots() -> None:
    copier = SimulatedCopier()
    try:
        ring = _staging.Ring(copier, slot_bytes=4 << 20)
        first = ring.take(1, 100)
        assert first[0].nbytes == 1 << 20  # small needs share a slot of _MIN_SLOT_BYTES
        assert ring.take(1, 5000) == first and ring.allocations == 1
        two = ring.take(2, 1 << 20)
        assert two[0] is first[0] and ring.allocations == 2
        grown = ring.take(1, (1 << 20) + 1)  # doubles, within the bound
        assert grown[0].nbytes == 2 << 20 and ring.allocations == 3
        assert ring.take(1, 5 << 20)[0].nbytes == 5 << 20  # a need above the bound is met
        assert copier.allocated == ring.allocations == 4
        with ring, pytest.raises(RuntimeError, match="one pipeline at a time"):
            with ring:
                pass
        with pytest.raises(ValueError, match="another copier"):
            stream_in(
                None,
                [_staging.Fill(used=1)],
                TorchCopier("cpu"),
                buffers=1,
                threads=1,
                chunk_bytes=BUF,
                ring=ring,
            )
    finally:
        copier.close()


def test_stream_in_reuses_a_given_ring(sim: SimulatedCopier, data_file: tuple[Path, bytes]) -> None:
    path, payload = data_file
    ring = _staging.Ring(sim, slot_bytes=BUF)
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        for i in range(6):  # one fill each (the caller's thread), then many (reader threads)
            fills, targets = _plan(sim, 1 if i % 2 else 5)
            stream_in(f, fills, sim, buffers=3, threads=2, chunk_bytes=BUF, ring=ring)
            for k, t in enumerate(targets):
                assert _raw(t) == payload[k * BUF : (k + 1) * BUF]
    assert sim.allocated == ring.allocations == 3 and sim.violations == []


# ------------------------------------------------------------- load and save end to end
def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300_000, generator=g)  # 1.2 MB: many buffers of 64 KiB
    return {
        "model": make_model().state_dict(),
        "big": base,
        "view": base[1000:5000].view(100, 40),  # shares big's storage
        "t": torch.randn(30, 40, generator=g).t(),  # non-contiguous
        "bf16": torch.randn(777, generator=g).to(torch.bfloat16),
        "i8": torch.randint(-128, 127, (4097,), dtype=torch.int8, generator=g),
        "bool": torch.rand(33, generator=g) > 0.5,
        "c64": torch.randn(17, dtype=torch.complex64, generator=g),
        "small": [torch.randn(i + 1, generator=g) for i in range(50)],
        "empty": torch.empty(0),
        "scalar": torch.tensor(3.5),
    }


@pytest.fixture
def staged_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SimulatedCopier]]:
    """Routes every CPU storage of loads and saves through the pipeline with stand-ins."""
    made: list[SimulatedCopier] = []

    def copier() -> SimulatedCopier:
        c = SimulatedCopier(delay=0.001)
        made.append(c)
        return c

    def target(location: str) -> DeviceTarget | None:
        if location != "cpu":
            return None
        return DeviceTarget(torch.device("cpu"), copier)

    def copier_for(device: torch.device) -> Any:
        return copier() if device.type == "cpu" else None

    monkeypatch.setattr(_staging, "staging_target", target)
    monkeypatch.setattr(_staging, "copier_for", copier_for)
    with ckptio.options(staging_buffer_bytes=BUF, staging_buffers=3):
        yield made
    for c in made:
        assert c.violations == []
        assert c.allocated <= 3
        c.close()
    assert _stage_threads() == []


@pytest.mark.parametrize(
    "map_location",
    [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}],
    ids=["none", "str", "device", "dict"],
)
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_load_through_the_pipeline_matches_torch(
    tmp_path: Path, staged_cpu: list[SimulatedCopier], map_location: Any, mmap: bool
) -> None:
    obj = _state()
    path = tmp_path / "m.pt"
    torch.save(obj, path)
    got = ckptio.load(path, map_location=map_location, mmap=mmap)
    expected = torch.load(path, map_location=map_location, mmap=mmap)
    assert_same(got, expected)
    assert_same_sharing(got, expected)
    assert staged_cpu and sum(c.issued for c in staged_cpu) > 10  # the pipeline did the work
    assert all(c.finished_after == c.issued for c in staged_cpu)


def test_callable_map_location_keeps_torchs_path(
    tmp_path: Path, staged_cpu: list[SimulatedCopier]
) -> None:
    """Only calling a callable tells where a storage goes: it gets the loaded CPU storage."""
    obj = _state()
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    seen: list[str] = []

    def ml(storage: Any, location: str) -> Any:
        seen.append(location)
        return storage

    got = ckptio.load(path, map_location=ml)
    assert_same(got, torch.load(path, map_location=lambda s, loc: s))
    assert seen and staged_cpu == []  # no pipeline was set up


def test_load_from_a_file_object_through_the_pipeline(
    tmp_path: Path, staged_cpu: list[SimulatedCopier]
) -> None:
    obj = _state()
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    got = ckptio.load(buf)
    buf.seek(0)
    expected = torch.load(buf)
    assert_same(got, expected)
    assert_same_sharing(got, expected)
    assert sum(c.issued for c in staged_cpu) > 10


def test_load_with_user_globals_reads_each_storage_at_once(
    tmp_path: Path, staged_cpu: list[SimulatedCopier]
) -> None:
    obj = {"w": torch.arange(10.0), "c": fractions.Fraction(1, 3), "v": torch.ones(3)}
    path = tmp_path / "g.pt"
    torch.save(obj, path)
    got = ckptio.load(path, weights_only=False)
    assert_same(got, torch.load(path, weights_only=False))


def test_a_load_that_flushes_each_storage_uses_one_ring(
    tmp_path: Path, staged_cpu: list[SimulatedCopier], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user global before the tensors ends the deferral of reads: each storage is flushed
    on its own. They all go through one ring (one copier, at most `staging_buffers` slots),
    which is gone once the load has returned."""
    g = torch.Generator().manual_seed(4)
    obj: dict[str, Any] = {"c": fractions.Fraction(1, 3)}  # pickled first
    obj.update({f"w{i}": torch.randn(i * 37 + 1, generator=g) for i in range(60)})
    obj["big"] = torch.randn(200_000, generator=g)  # 800 kB: 13 fills of 64 KiB
    path = tmp_path / "u.pt"
    torch.save(obj, path)
    calls: list[tuple[int, Any]] = []
    real = _staging.stream_in

    def spy(source: Any, fills: Any, copier: Any, **kw: Any) -> None:
        ring = kw.get("ring")
        calls.append((len(fills), ring and weakref.ref(ring)))
        real(source, fills, copier, **kw)

    monkeypatch.setattr(_staging, "stream_in", spy)
    got = ckptio.load(path, weights_only=False)
    assert_same(got, torch.load(path, weights_only=False))
    assert len(calls) == 61  # one flush per storage
    assert len(staged_cpu) == 1 and staged_cpu[0].allocated <= 3  # one copier, one ring
    assert all(ref is not None for _, ref in calls)
    assert len({id(ref()) for _, ref in calls}) == 1  # ... the same ring every time
    assert sorted({n for n, _ in calls}) == [1, 13]
    assert calls[0][1]() is None  # released with the load


@pytest.mark.parametrize("crc32", [False, True], ids=["nocrc", "crc32"])
def test_save_through_the_pipeline_is_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crc32: bool
) -> None:
    obj = _state()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = tmp_path / "a" / "m.pt"  # same stem: the archive name is part of the bytes
    with ckptio.options(crc32=crc32):
        ckptio.save(obj, plain)
    made: list[SimulatedCopier] = []

    def copier_for(device: torch.device) -> Any:
        made.append(SimulatedCopier(delay=0.001))
        return made[-1]

    monkeypatch.setattr(_staging, "copier_for", copier_for)
    staged = tmp_path / "b" / "m.pt"
    try:
        with ckptio.options(crc32=crc32, staging_buffer_bytes=BUF, staging_buffers=2):
            ckptio.save(obj, staged)
            buf = io.BytesIO()
            ckptio.save(obj, buf)  # file objects: one storage copied at a time
    finally:
        for c in made:
            c.close()
    assert len(made) == 2 and made[0].issued > 10 and made[0].allocated == 2
    assert staged.read_bytes() == plain.read_bytes()
    with ckptio.options(crc32=crc32):
        plain_buf = io.BytesIO()
        ckptio.save(obj, plain_buf)
    assert buf.getvalue() == plain_buf.getvalue()
    if crc32:
        with zipfile.ZipFile(staged) as z:
            assert z.testzip() is None
    assert_same(torch.load(staged), obj)


def test_save_copy_error_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing device copy during save leaves no temporary file and no thread."""
    made: list[SimulatedCopier] = []

    def copier_for(device: torch.device) -> Any:
        made.append(SimulatedCopier(fail_copy=1))
        return made[-1]

    monkeypatch.setattr(_staging, "copier_for", copier_for)
    target = tmp_path / "x.pt"
    target.write_bytes(b"old")
    try:
        with ckptio.options(staging_buffer_bytes=BUF), pytest.raises(RuntimeError):
            ckptio.save(_state(), target)
    finally:
        for c in made:
            c.close()
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["x.pt"]
    assert _stage_threads() == []


# ------------------------------------------------------------------------ stream_to_device
def test_stream_to_device_fills_existing_tensors(
    sim: SimulatedCopier, data_file: tuple[Path, bytes]
) -> None:
    path, payload = data_file
    dests = [
        torch.zeros(1000, dtype=torch.float32),
        torch.zeros(3 * BUF, dtype=torch.uint8),
        torch.zeros(7, 9, dtype=torch.bfloat16),
        torch.zeros(5, dtype=torch.int64).untyped_storage(),
    ]
    requests = [(100, 4000, dests[0]), (5000, 3 * BUF, dests[1]), (9, 126, dests[2])]
    requests.append((77, 40, dests[3]))
    with (
        ckptio.options(staging_buffer_bytes=BUF, staging_buffers=2),
        _core.io.File.open(str(path), _core.io.FileMode.READ) as f,
    ):
        stream_to_device(f, requests, copier=sim)
    for off, n, d in requests:
        raw = _raw(d)
        assert raw[:n] == payload[off : off + n]
    assert sim.allocated == 2 and sim.violations == []


def test_stream_to_device_rejects_bad_requests(data_file: tuple[Path, bytes]) -> None:
    with _core.io.File.open(str(data_file[0]), _core.io.FileMode.READ) as f:
        with pytest.raises(ValueError, match="does not fit"):
            stream_to_device(f, [(0, 41, torch.zeros(10))])
        with pytest.raises(ValueError, match="contiguous"):
            stream_to_device(f, [(0, 4, torch.zeros(4, 4).t())])
        with pytest.raises(ValueError, match="no staging copier"):
            stream_to_device(f, [(0, 4, torch.zeros(4))])  # CPU memory is not staged


def test_bind_checks_the_device_index() -> None:
    """A copier binds destinations of its own device only: the index counts, not only the
    type (a cuda:1 tensor given to the copier of cuda:0 is refused, not copied across)."""
    check = _staging._check_device
    check(torch.device("cuda", 0), torch.device("cuda", 0))
    check(torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"on cuda:1 was given to the copier of cuda:0"):
        check(torch.device("cuda", 1), torch.device("cuda", 0))
    with pytest.raises(ValueError, match=r"on cpu was given to the copier of cuda:0"):
        check(torch.device("cpu"), torch.device("cuda", 0))
    with pytest.raises(ValueError, match=r"on meta was given to the copier of cpu"):
        TorchCopier("cpu").bind(torch.empty(4, device="meta"))
    with pytest.raises(ValueError, match=r"on meta was given to the copier of cpu"):
        load = [(0, 4, torch.empty(4, dtype=torch.uint8, device="meta"))]
        stream_to_device(None, load, copier=TorchCopier("cpu"))


def test_device_payload_reports_its_size() -> None:
    from ckptio._writer import DevicePayload

    s = torch.zeros(10, dtype=torch.float64).untyped_storage()
    assert DevicePayload(s, TorchCopier("cpu")).nbytes == 80


def test_settings_bound_the_ring(sim: SimulatedCopier, data_file: tuple[Path, bytes]) -> None:
    """load_into_storages takes its ring from the options."""
    path, payload = data_file
    targets = [torch.zeros(BUF, dtype=torch.uint8) for _ in range(10)]
    with (
        ckptio.options(staging_buffer_bytes=BUF, staging_buffers=3),
        _core.io.File.open(str(path), _core.io.FileMode.READ) as f,
    ):
        _staging.load_into_storages(f, [(i * BUF, BUF, t) for i, t in enumerate(targets)], sim)
    assert sim.allocated == 3
    for i, t in enumerate(targets):
        assert _raw(t) == payload[i * BUF : (i + 1) * BUF]


def test_gpu_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    """tests/gpu/bench_gpu.py --cpu-smoke: tiny sizes, the stand-in copier, every step run."""
    import subprocess

    bench = Path(__file__).parent / "gpu" / "bench_gpu.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTIO_")}
    proc = subprocess.run(
        [sys.executable, str(bench), "--cpu-smoke", "--dir", str(tmp_path), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "bench_gpu.md").read_text()
    for method in ("ckptio", "torch.load", "torch.load(mmap)+.cuda()", "torch.save"):
        assert f"| {method} | warm |" in table
    for path in ("load_into", "open", "safetensors", "dcp"):  # every GPU read path
        assert f"| 2MiB bf16 | load | ckptio {path} | warm |" in table
    for path in ("async_save", "dcp"):  # and every save path
        assert f"| 2MiB bf16 | save | ckptio {path} | warm |" in table
    for method in ("ckptio", "torch.load"):  # the first load of a fresh process, file evicted
        assert f"| 2MiB bf16 | load | {method} | cold, fresh process |" in table
    assert "pinned H2D GB/s" in table and "page-cache read GB/s" in table
    assert "host RSS growth" in table
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ckptio-bench")] == []
    # Every row was also appended as it was measured (what a timeout leaves behind).
    rows = json.loads((tmp_path / "bench_gpu.json").read_text())["rows"]
    streamed = (tmp_path / "bench_gpu_rows.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in streamed if '"workload"' in line] == rows
    assert len((tmp_path / "bench_gpu_rows.md").read_text().splitlines()) > len(rows)


def _bench_module() -> Any:
    sys.path.insert(0, str(Path(__file__).parent / "gpu"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    return bench_gpu


def test_gpu_benchmark_fails_when_ckptio_is_slower_than_torch_load(tmp_path: Path) -> None:
    """The run's verdict (bench_gpu.evaluate): any workload, warm or cold, where ckptio's load
    takes longer than torch.load(map_location="cuda") is a failure; the table says it too."""
    bench = _bench_module()
    b = bench.Bench("cpu", 100.0)
    b.row("2GB bf16", "load", "ckptio", 0.5, 2 * 10**9)
    b.row("2GB bf16", "load", "torch.load", 2.0, 2 * 10**9)
    b.row("2GB bf16", "load", "ckptio", 3.0, 2 * 10**9, cache=bench.COLD)
    b.row("2GB bf16", "load", "torch.load", 2.5, 2 * 10**9, cache=bench.COLD)
    b.row("small x20000", "load", "ckptio", 1.0, 10**9)
    failures = bench.evaluate(b, ["2GB bf16", "small x20000"])
    assert failures == ["2GB bf16 (cold, fresh process): ckptio 3.000 s > torch.load 2.500 s"]
    text = bench.report(b, tmp_path, "## header")
    assert "| 2GB bf16 | load | ckptio | warm | 0.500 | 4.00 | 4.00x |" in text
    assert "| 2GB bf16 (cold, fresh process): ckptio not slower than torch.load" in text
    assert "[enforced] | FAIL | 0.83x |" in text
    assert bench.main(["--dry-run"]) == 0


def test_write_from_writes_ranges_and_releases_the_gil(tmp_path: Path) -> None:
    """File.write_from (the save pipeline's pwrite) writes every range, and Python threads
    run while it does."""
    nbytes = 128 << 20
    src = torch.arange(nbytes, dtype=torch.int64).to(torch.uint8)
    requests = array.array("Q", [4096, nbytes, src.data_ptr(), 0, 100, src.data_ptr() + 7])
    path = tmp_path / "w.bin"
    with _core.io.File.open(str(path), _core.io.FileMode.CREATE) as f:
        f.preallocate(4096 + nbytes)
        assert_releases_gil(lambda: f.write_from(requests, 1, 1 << 20))
    data = path.read_bytes()
    raw = _raw(src)
    assert len(data) == 4096 + nbytes
    assert data[:100] == raw[7:107] and data[4096:] == raw
