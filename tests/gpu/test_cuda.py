"""GPU loads and saves through the pinned staging ring, against torch as the oracle.

Every test is marked ``cuda`` and skips cleanly without a GPU. Run them on a GPU host with
``pytest -m cuda tests/gpu`` (tests/gpu/run_checks.sh does, then runs the benchmark).
"""

from __future__ import annotations

import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import ckptio
from ckptio import _core, _staging

from conftest import assert_same, assert_same_sharing, make_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MIB = 1 << 20
RING = {"staging_buffer_bytes": 1 * MIB, "staging_buffers": 2}  # small: big storages span it

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
]


def _state(device: str = "cpu") -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3 * MIB, generator=g)  # 12 MiB: spans the 2 x 1 MiB ring many times
    out: dict[str, Any] = {
        "model": make_model().state_dict(),
        "big": big,
        "big_view": big[1000:9000].view(80, 100),  # shares big's storage
        "t": torch.randn(64, 48, generator=g).t(),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0),
        "small": [torch.randn(i % 97 + 1, generator=g) for i in range(500)],  # batched fills
    }
    for dt in DTYPES:
        raw = torch.randint(0, 256, (1000 * dt.itemsize,), dtype=torch.uint8, generator=g)
        if dt == torch.bool:
            raw = raw & 1
        out[f"dt_{dt}"] = raw.view(dt)
    if device != "cpu":
        out = _to(out, device)
    return out


def _to(obj: Any, device: str) -> Any:
    """Moves tensors keeping storage sharing (torch.save of the result keeps views views)."""
    memo: dict[int, torch.UntypedStorage] = {}

    def move(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        key = s.data_ptr() if s.nbytes() else id(t)
        if key not in memo:
            memo[key] = (
                s.to(device=device) if s.nbytes() else torch.UntypedStorage(0, device=device)
            )
        out = torch.empty((0,), dtype=t.dtype, device=device)
        return out.set_(memo[key], t.storage_offset(), t.shape, t.stride())

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return move(o)
        if isinstance(o, dict):
            res = type(o)((k, walk(v)) for k, v in o.items())
            if hasattr(o, "_metadata"):
                res._metadata = o._metadata  # type: ignore[attr-defined]
            return res
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    return walk(obj)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts fills that went through the staging pipeline."""
    calls: list[int] = []
    real = _staging.stream_in

    def spy(source: Any, fills: Any, copier: Any, **kw: Any) -> None:
        calls.append(len(fills))
        assert isinstance(copier, _staging.TorchCopier) and copier.cuda
        real(source, fills, copier, **kw)

    monkeypatch.setattr(_staging, "stream_in", spy)
    yield calls


MAP_LOCATIONS: list[tuple[str, Any]] = [
    ("cuda", "cuda"),
    ("cuda:0", "cuda:0"),
    ("device", torch.device("cuda", 0)),
    ("dict", {"cpu": "cuda:0"}),
    ("callable", lambda s, loc: s.cuda(0)),
]


@pytest.mark.parametrize(
    "map_location", [m for _, m in MAP_LOCATIONS], ids=[i for i, _ in MAP_LOCATIONS]
)
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_load_matches_torch(
    tmp_path: Path, counted: list[int], map_location: Any, mmap: bool
) -> None:
    path = tmp_path / "m.pt"
    torch.save(_state(), path)
    with ckptio.options(**RING):
        ours = ckptio.load(path, map_location=map_location, mmap=mmap)
    theirs = torch.load(path, map_location=map_location, mmap=mmap)
    assert ours["big"].device.type == "cuda"
    assert_same(theirs, ours)
    assert_same_sharing(theirs, ours)
    if callable(map_location):
        assert counted == []  # callables keep torch's path (only calling them tells)
    else:
        assert sum(counted) > 12  # the 12 MiB storage alone needs 12 fills of 1 MiB


@pytest.mark.parametrize("writer", ["torch", "ckptio"])
def test_gpu_saved_file_loads_back_on_the_gpu(
    tmp_path: Path, counted: list[int], writer: str
) -> None:
    obj = _state("cuda")
    path = tmp_path / "g.pt"
    (torch.save if writer == "torch" else ckptio.save)(obj, path)
    with ckptio.options(**RING):
        ours = ckptio.load(path)  # saved at cuda:0: restored there
    theirs = torch.load(path)
    assert_same(theirs, ours)
    assert_same_sharing(theirs, ours)
    assert_same(obj, ours)
    assert counted


def test_partial_dict_keeps_other_storages_on_the_cpu(tmp_path: Path) -> None:
    obj = {"g": torch.arange(10.0).cuda(), "c": torch.arange(5)}
    path = tmp_path / "mixed.pt"
    torch.save(obj, path)
    for ml in ({"cuda:0": "cuda:0"}, {"cuda:0": "cpu"}, {"cpu": "cuda:0"}):
        assert_same(torch.load(path, map_location=ml), ckptio.load(path, map_location=ml))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(_state(), path)
    for ml in ("cuda:1", {"cpu": "cuda:1"}, torch.device("cuda:1")):
        ours = ckptio.load(path, map_location=ml)
        assert ours["big"].device == torch.device("cuda:1")
        assert_same(torch.load(path, map_location=ml), ours)


def test_bad_device_index_fails_like_torch(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"a": torch.ones(3)}, path)
    bad = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(RuntimeError) as theirs:
        torch.load(path, map_location=bad)
    with pytest.raises(RuntimeError) as ours:
        ckptio.load(path, map_location=bad)
    assert str(theirs.value)[:40] in str(ours.value)


# ----------------------------------------------------------------------------------- save
def _save_bytes(obj: Any, path: Path, *, staged: bool, monkeypatch: pytest.MonkeyPatch) -> bytes:
    with monkeypatch.context() as m:
        if not staged:  # the path that copies every storage to the CPU first
            m.setattr(_staging, "copier_for", lambda device: None)
        ckptio.save(obj, path)
    return path.read_bytes()


@pytest.mark.parametrize("crc32", [False, True], ids=["nocrc", "crc32"])
def test_gpu_save_is_byte_identical_to_saving_the_cpu_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crc32: bool
) -> None:
    obj = _state("cuda")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with ckptio.options(crc32=crc32, **RING):
        staged = _save_bytes(obj, tmp_path / "a" / "m.pt", staged=True, monkeypatch=monkeypatch)
        plain = _save_bytes(obj, tmp_path / "b" / "m.pt", staged=False, monkeypatch=monkeypatch)
    assert staged == plain
    if crc32:
        with zipfile.ZipFile(tmp_path / "a" / "m.pt") as z:
            assert z.testzip() is None
    loaded = torch.load(tmp_path / "a" / "m.pt")
    assert_same(obj, loaded)
    assert_same_sharing(obj, loaded)


def test_gpu_save_sees_pending_kernels(tmp_path: Path) -> None:
    """Values written by kernels still queued on the current stream are what gets saved."""
    x = torch.zeros(8 * MIB, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # keep the stream busy
        x.add_(3.0)
        with ckptio.options(**RING):
            ckptio.save({"x": x}, tmp_path / "x.pt")
    loaded = torch.load(tmp_path / "x.pt", map_location="cpu")
    assert torch.equal(loaded["x"], torch.full((8 * MIB,), 3.0))


# -------------------------------------------------------------------------- stream safety
def test_loaded_tensors_are_ready_on_the_current_stream(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    big = torch.randn(16 * MIB, generator=g)
    path = tmp_path / "big.pt"
    torch.save({"x": big}, path)
    expected = (big * 2).sum().item()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s), ckptio.options(**RING):
        for _ in range(3):
            x = ckptio.load(path, map_location="cuda")["x"]
            y = (x * 2).sum()  # first kernel, on the (non-default) current stream, no sync
            assert y.item() == pytest.approx(expected, rel=1e-4)
            assert torch.equal(x.cpu(), big)
    x = ckptio.load(path, map_location="cuda")["x"]  # default stream too
    assert (x * 2).sum().item() == pytest.approx(expected, rel=1e-4)


def test_destination_memory_reused_from_busy_kernels(tmp_path: Path) -> None:
    """Memory freed while a kernel still reads it, then reallocated to a loaded storage, is not
    overwritten before that kernel ends (the side stream waits for the current stream)."""
    n = 4 * MIB
    path = tmp_path / "v.pt"
    torch.save({"v": torch.full((n,), 7.0)}, path)
    a = torch.ones(n, device="cuda")
    torch.cuda._sleep(50_000_000)
    total = a.sum()  # queued after the sleep
    del a  # its block goes back to the caching allocator at once
    with ckptio.options(**RING):
        v = ckptio.load(path, map_location="cuda")["v"]
    assert total.item() == n
    assert torch.equal(v.cpu(), torch.full((n,), 7.0))


# ------------------------------------------------------------------ ring, events, fences
def test_copier_binds_its_own_device_only() -> None:
    copier = _staging.TorchCopier("cuda")
    assert copier.device == torch.device("cuda", torch.cuda.current_device())
    copier.bind(torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="was given to the copier of cuda"):
        copier.bind(torch.zeros(4))
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="on cuda:1 was given to the copier of cuda:0"):
            _staging.TorchCopier("cuda:0").bind(torch.zeros(4, device="cuda:1"))


def test_ring_events_are_blocking_and_one_per_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting threads sleep in the driver (blocking events), and a slot's event is recorded
    again at each issue rather than a new event made per batch."""
    made: list[dict[str, Any]] = []
    real = torch.cuda.Event

    def spy(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "Event", spy)
    path = tmp_path / "m.pt"
    torch.save(_state(), path)
    with ckptio.options(**RING):
        got = ckptio.load(path, map_location="cuda")
    assert_same(torch.load(path, map_location="cuda"), got)
    assert made and all(k.get("blocking") is True for k in made)
    assert len(made) <= RING["staging_buffers"]  # 12+ fills, one event per slot


def test_a_load_that_flushes_each_storage_uses_one_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user global ends the deferral of reads: every storage is flushed on its own, and all
    share the load's one ring of pinned slots."""
    import fractions

    allocations: list[int] = []
    real = _staging.TorchCopier.allocate

    def spy(self: Any, nbytes: int) -> Any:
        allocations.append(nbytes)
        return real(self, nbytes)

    monkeypatch.setattr(_staging.TorchCopier, "allocate", spy)
    obj: dict[str, Any] = {"c": fractions.Fraction(1, 3)}
    obj.update({f"w{i}": torch.randn(1000 + i) for i in range(200)})
    path = tmp_path / "u.pt"
    torch.save(obj, path)
    with ckptio.options(**RING):
        got = ckptio.load(path, map_location="cuda", weights_only=False)
    assert_same(torch.load(path, map_location="cuda", weights_only=False), got)
    assert 1 <= len(allocations) <= RING["staging_buffers"]


def test_a_copy_issue_failing_part_way_is_fenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose issue raises after queueing work on the side stream: when the error
    reaches the caller, nothing is pending there (the destinations may be freed)."""
    real = _staging.TorchCopier.to_device
    calls: list[int] = []

    def failing(self: Any, slot: Any, segments: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            with torch.cuda.stream(self._stream):
                torch.cuda._sleep(200_000_000)  # queued, runs late
            raise RuntimeError("copy issue failed part way")
        return real(self, slot, segments)

    monkeypatch.setattr(_staging.TorchCopier, "to_device", failing)
    path = tmp_path / "big.pt"
    torch.save({"x": torch.randn(4 * MIB)}, path)
    with ckptio.options(**RING), pytest.raises(RuntimeError, match="part way"):
        ckptio.load(path, map_location="cuda")
    side = _staging._side_stream(torch.device("cuda", torch.cuda.current_device()))
    assert side.query()


# ----------------------------------------------------------------------- load_into hook
def test_stream_to_device_fills_existing_gpu_tensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    src = {"a": torch.randn(3 * MIB, generator=g), "b": torch.randn(10, 10, generator=g)}
    path = tmp_path / "s.pt"
    ckptio.save(src, path)
    dests = {k: torch.empty_like(v, device="cuda") for k, v in src.items()}
    records = {name: (off, size) for name, off, size in _data_records(path)}
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f, ckptio.options(**RING):
        _staging.stream_to_device(
            f,
            [(records[f"data/{i}"][0], v.nbytes, dests[k]) for i, (k, v) in enumerate(src.items())],
        )
    for k, v in src.items():
        assert torch.equal(dests[k].cpu(), v)


def test_load_into_gpu_module_and_state_dict(tmp_path: Path) -> None:
    """load_into streams into existing GPU tensors (contiguous and not) in place, equal to
    load_state_dict(torch.load(...)), and the result is ready on the current stream."""
    src = make_model(seed=3).state_dict()
    src["t"] = torch.randn(64, 48).t().contiguous()
    path = tmp_path / "m.pt"
    ckptio.save(src, path)
    dest = {k: torch.zeros_like(v, device="cuda") for k, v in src.items()}
    dest["t"] = torch.zeros(48, 64, device="cuda").t()  # non-contiguous destination
    ptrs = {k: v.data_ptr() for k, v in dest.items()}
    with ckptio.options(**RING):
        missing, unexpected = ckptio.load_into(dest, path)
    assert (missing, unexpected) == ([], [])
    for k, v in src.items():
        assert dest[k].data_ptr() == ptrs[k], f"{k}: memory was replaced"
        assert torch.equal(dest[k].cpu(), v), k

    model = make_model().cuda()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    oracle = make_model(seed=5)
    oracle.load_state_dict(torch.load(path))
    del src["t"]
    ckptio.save(src, path)
    ckptio.load_into(model, path)
    for (k, a), b in zip(model.state_dict().items(), oracle.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b), k


def _data_records(path: Path) -> list[tuple[str, int, int]]:
    from ckptio._archive import ArchiveReader

    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        reader = ArchiveReader(f)
        return [(n, offset, size) for n, (offset, size, _) in reader.records.items()]


# ------------------------------------------------------------------------------ host RSS
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class _PeakRss:
    def __init__(self) -> None:
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def test_host_memory_stays_within_the_ring(tmp_path: Path) -> None:
    ring = {"staging_buffer_bytes": 8 * MIB, "staging_buffers": 4}
    path = tmp_path / "big.pt"
    ckptio.save({f"w{i}": torch.randn(16 * MIB // 4) for i in range(24)}, path)  # 384 MiB
    load: Callable[[], Any] = lambda: ckptio.load(path, map_location="cuda")  # noqa: E731
    with ckptio.options(**ring):
        warm = load()  # CUDA context, pinned pool, allocator: not part of the load's cost
        del warm
        with _PeakRss() as rss:
            sd = load()
            torch.cuda.synchronize()
    growth = rss.peak - rss.base
    bound = 1.1 * ring["staging_buffer_bytes"] * ring["staging_buffers"] + 16 * MIB
    assert growth <= bound, f"host RSS grew {growth / MIB:.0f} MiB (bound {bound / MIB:.0f})"
    assert len(sd) == 24


# --------------------------------------------------------------------------- benchmark
def test_benchmark_smoke_on_the_gpu(tmp_path: Path) -> None:
    """The benchmark runs end to end at tiny sizes on the GPU (the full run is run_checks.sh)."""
    import subprocess
    import sys

    bench = Path(__file__).with_name("bench_gpu.py")
    proc = subprocess.run(
        [sys.executable, str(bench), "--tiny", "--dir", str(tmp_path), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| workload |" in proc.stdout
    assert (tmp_path / "bench_gpu.md").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_model_directory_on_the_gpu(tmp_path: Path, counted: list[int], fmt: str) -> None:
    """A sharded directory loads onto the GPU through one ring (load, load_into, open and
    per-rank slices), equal to the shards loaded one by one with torch/safetensors."""
    g = torch.Generator().manual_seed(2)
    sd = {f"layers.{i}.weight": torch.randn(512, 256 + i, generator=g) for i in range(8)}
    sd["norm"] = torch.randn(256, generator=g)
    d = tmp_path / "dir"
    ckptio.save(sd, d, max_shard_size=1_200_000, format=fmt)
    assert len([n for n in d.iterdir() if not n.name.endswith(".json")]) > 3
    with ckptio.options(**RING):
        ours = ckptio.load(d, map_location="cuda")
        for k, v in sd.items():
            assert ours[k].device.type == "cuda" and torch.equal(ours[k].cpu(), v), k
        assert sum(counted) > 0
        dest = {k: torch.zeros_like(v, device="cuda") for k, v in sd.items()}
        ckptio.load_into(dest, d)
        for k, v in sd.items():
            assert torch.equal(dest[k].cpu(), v), k
        with ckptio.open(d, map_location="cuda") as h:
            part = h.get_slices(lambda n, s: ckptio.rank_slice(s, 1, 2, dim=-1))
        for k, v in sd.items():
            index = ckptio.rank_slice(tuple(v.shape), 1, 2, dim=-1)
            assert part[k].device.type == "cuda" and torch.equal(part[k].cpu(), v[index]), k
