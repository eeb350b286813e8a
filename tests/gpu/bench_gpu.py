"""GPU benchmark: checkpoints from the file to the GPU, and GPU tensors to a file.

Expected time: about 3 to 4 minutes on one H100 or H200 host with the default sizes (~2 GB
and ~6 GB bf16 state dicts, 20,000 small tensors); --budget-s stops it from starting new work
after that many seconds (run_checks.sh gives it what is left of its 8 minutes).

Loads, page cache warm (every method: one untimed warm-up call, then the timed repeats, the
same for all; each result checked against the source):
  ckptio.load(map_location="cuda")            the pinned staging ring
  ckptio load_into, open, safetensors, dcp    load_into(cuda_state_dict, path),
                                              open(path, map_location="cuda").get_tensors(),
                                              load(file.safetensors, map_location="cuda"),
                                              dcp.load(cuda_state_dict, ckptio.dcp.Reader)
  torch.load(map_location="cuda")
  torch.load(mmap=True) then .cuda()
  safetensors.torch.load_file(device="cuda")  (when safetensors is installed)
Loads, cold: the first load of a fresh process (CUDA initialised first: its context is not
part of the figure) with the file evicted from the page cache (posix_fadvise DONTNEED, as
ckptio.benchmark.limits.evict), for ckptio and torch.load alike.
Saves of GPU tensors: ckptio.save, ckptio.async_save (until its future is done) and
dcp.save(storage_writer=ckptio.dcp.Writer) vs torch.save (a throwaway file of ~1.2x the
payload is written and deleted before each timed save, see bench/README.md, "Method").
Raw limits, same run: pinned host->device bandwidth and parallel page-cache read bandwidth.
Host RSS growth during a ckptio GPU load is sampled every millisecond.

Every row is appended to --out/bench_gpu_rows.md (and .jsonl) the moment it is measured
(flushed and fsynced: a timeout loses only the row being measured); the whole table plus
the targets as PASS/FAIL go to bench_gpu.md / bench_gpu.json at the end.

Exit status: 1 when ckptio is slower than torch.load(map_location="cuda") on any workload
(warm or cold; not enforced with --tiny or --cpu-smoke), 2 without a CUDA device, else 0.
The other targets are reported, not enforced.

  python tests/gpu/bench_gpu.py                 # the full run (~2 GB, ~6 GB, 20,000 small)
  python tests/gpu/bench_gpu.py --tiny          # tiny sizes, real GPU
  python tests/gpu/bench_gpu.py --cpu-smoke     # tiny sizes on the CPU, stand-in copier (CI)
  python tests/gpu/bench_gpu.py --dry-run       # the plan and the table layout, no work
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch

import ckptio
from ckptio import _core, _staging

GB = 1e9
MIB = 1 << 20
WARM = "warm"
COLD = "cold, fresh process"
# ckptio's other GPU paths, measured beside ckptio.load / ckptio.save.
LOAD_PATHS = ("ckptio load_into", "ckptio open", "ckptio safetensors", "ckptio dcp")
SAVE_PATHS = ("ckptio async_save", "ckptio dcp")


# ---------------------------------------------------------------------------- workloads
def bf16_state_dict(total_bytes: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Transformer-like: 4096-wide matrices (32 MiB bf16 each) plus small norms/biases."""
    g = torch.Generator(device=device).manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    width = 4096 if total_bytes >= 256 * MIB else 256
    mat = width * width * 2
    n = max(1, total_bytes // (mat + 2 * width * 2))
    for i in range(n):
        sd[f"layers.{i}.w"] = torch.randn(width, width, generator=g, device=device).to(
            torch.bfloat16
        )
        sd[f"layers.{i}.norm"] = torch.ones(width, dtype=torch.bfloat16, device=device)
        sd[f"layers.{i}.bias"] = torch.zeros(width, dtype=torch.bfloat16, device=device)
    return sd


def small_state_dict(count: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """`count` tensors of 256 B - 64 KiB in mixed dtypes (the 20,000-small-tensor workload)."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8]
    sizes = torch.randint(256, 64 * 1024 + 1, (count,), generator=g).tolist()
    sd = {}
    for i, nbytes in enumerate(sizes):
        dt = dtypes[i % len(dtypes)]
        n = max(1, nbytes // dt.itemsize)
        if dt.is_floating_point:
            t = torch.randn(n, generator=g).to(dt)
        else:
            t = torch.randint(-100, 100, (n,), generator=g, dtype=dt)
        sd[f"t{i}"] = t
    return {k: v.to(device) for k, v in sd.items()} if device != "cpu" else sd


def nbytes_of(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in sd.values())


def plan(sizes: list[int], small: int) -> list[tuple[str, str, int]]:
    """(kind, name, size) in run order: the smallest bf16 first, then the small tensors, then
    the bigger ones, so that a budget that runs out costs the biggest workload's rows."""
    order = [("bf16", s) for s in sorted(sizes)]
    order.insert(1, ("small", small))
    out = []
    for kind, size in order:
        if kind == "small":
            name = f"small x{size}"
        else:
            name = f"{size / GB:.0f}GB bf16" if size >= GB else f"{size // MIB}MiB bf16"
        out.append((kind, name, size))
    return out


# ----------------------------------------------------------------------------- helpers
class Rows:
    """Appends each result to <out>/bench_gpu_rows.md and .jsonl as it is measured."""

    def __init__(self, out_dir: Path | None, header: str) -> None:
        self._md: IO[str] | None = None
        self._jsonl: IO[str] | None = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._md = open(out_dir / "bench_gpu_rows.md", "w")
            self._jsonl = open(out_dir / "bench_gpu_rows.jsonl", "w")
            self._write(self._md, "\n".join([header, "", *TABLE_HEAD]) + "\n")

    @staticmethod
    def _write(f: IO[str], text: str) -> None:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())

    def add(self, row: dict[str, Any], line: str) -> None:
        if self._md is not None and self._jsonl is not None:
            self._write(self._md, line + "\n")
            self._write(self._jsonl, json.dumps(row) + "\n")

    def close(self) -> None:
        for f in (self._md, self._jsonl):
            if f is not None:
                f.close()


TABLE_HEAD = [
    "| workload | op | method | cache | seconds | GB/s | vs torch |",
    "|---|---|---|---|---:|---:|---:|",
]


class Bench:
    def __init__(self, device: str, budget_s: float, rows: Rows | None = None) -> None:
        self.device = device
        self.cuda = device == "cuda"
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.rows: list[dict[str, Any]] = []
        self.limits: dict[str, float] = {}
        self.checks: list[tuple[str, bool, str]] = []
        self.notes: list[str] = []
        self.sink = rows

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def timed(self, fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
        """One untimed warm-up call, then the median seconds of `repeats` runs, and the last
        result. Every method goes through here: each is warmed up the same way."""
        times, result = [], None
        for i in range(repeats + 1):
            result = None
            gc.collect()
            self.free()
            self.sync()
            t0 = time.perf_counter()
            result = fn()
            self.sync()
            if i:
                times.append(time.perf_counter() - t0)
        return statistics.median(times), result

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def row(
        self, workload: str, op: str, method: str, seconds: float, nbytes: int, cache: str = WARM
    ) -> None:
        r = {
            "workload": workload,
            "op": op,
            "method": method,
            "cache": cache,
            "seconds": seconds,
            "GBps": nbytes / seconds / GB if seconds > 0 else float("inf"),
            "nbytes": nbytes,
        }
        self.rows.append(r)
        line = table_line(self, r)
        if self.sink is not None:
            self.sink.add(r, line)
        print(line, flush=True)

    def limit(self, name: str, value: float) -> None:
        self.limits[name] = value
        if self.sink is not None:
            self.sink.add({"limit": name, "value": value}, f"| limit: {name} | {value:.2f} |")
        print(f"| limit: {name} | {value:.2f} |", flush=True)

    def seconds(self, workload: str, op: str, method: str, cache: str = WARM) -> float | None:
        for r in self.rows:
            if (r["workload"], r["op"], r["method"], r["cache"]) == (workload, op, method, cache):
                return float(r["seconds"])
        return None


def table_line(b: Bench, r: dict[str, Any]) -> str:
    baseline = "torch.load" if r["op"] == "load" else "torch.save"
    base = b.seconds(r["workload"], r["op"], baseline, r["cache"])
    vs = f"{base / r['seconds']:.2f}x" if base and r["seconds"] > 0 else ""
    return (
        f"| {r['workload']} | {r['op']} | {r['method']} | {r['cache']} | {r['seconds']:.3f} | "
        f"{r['GBps']:.2f} | {vs} |"
    )


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # safetensors returns its keys sorted, not in insertion order: compare as mappings.
    assert sorted(a) == sorted(b), "keys differ"
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.device.type == y.device.type, f"{k}: {x.device} vs {y.device}"
        assert torch.equal(x, y), f"{k}: values differ"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    out = {"base": rss(), "peak": 0}
    out["peak"] = out["base"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak"] = max(out["peak"], rss())


def drop_page_cache_pressure(directory: Path, nbytes: int) -> None:
    """Writes and deletes a throwaway file of ~1.2x `nbytes` (bench/README.md, "Method")."""
    path = directory / "throwaway.bin"
    block = os.urandom(1 << 20) * 64
    with open(path, "wb") as f:
        left = int(nbytes * 1.2)
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    path.unlink()


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 * MIB):
            pass


# -------------------------------------------------------------------------- raw limits
def h2d_bandwidth(b: Bench, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=b.cuda)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=b.device)
    secs, _ = b.timed(lambda: dst.copy_(src, non_blocking=True), 5)
    return nbytes / secs / GB


def read_bandwidth(b: Bench, path: Path) -> float:
    """Parallel pread of the whole file (page cache) into a reused 256 MiB buffer."""
    import array

    opts = ckptio.get_options()
    window = min(256 * MIB, path.stat().st_size)
    buf = _core.io.HostBuffer(window, False)
    memoryview(buf)[:] = b"\0" * window  # touch it once: no page faults in the timed loop
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        size = f.size

        def read_all() -> None:
            off = 0
            while off < size:
                n = min(window, size - off)
                f.read_into(array.array("Q", [off, n, buf.address]), opts.threads, 8 * MIB)
                off += n

        secs, _ = b.timed(read_all, 3)
    return size / secs / GB


# ------------------------------------------------------------------------------- loads
def cold_child(path: str, method: str, device: str) -> dict[str, Any]:
    """In a fresh process: initialise the device, then time the process's first load."""
    if device == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the CUDA context: not part of the figure
        torch.cuda.synchronize()
    from ckptio.benchmark.limits import resident_fraction

    resident = resident_fraction(path)
    t0 = time.perf_counter()
    if method == "ckptio":
        result = ckptio.load(path, map_location=device)
    else:
        result = torch.load(path, map_location=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "resident_before": resident, "tensors": len(result)}


def run_cold(b: Bench, name: str, path: Path, smoke: bool) -> None:
    """ckptio's and torch.load's first load in a fresh process, the file evicted before each."""
    from ckptio.benchmark.limits import evict, evicted

    size = path.stat().st_size
    for method in ("ckptio", "torch.load"):
        if b.left() < 30:
            b.notes.append(f"{name}: cold {method} skipped (time budget)")
            continue
        resident = evict(str(path))
        if not evicted(resident):
            b.notes.append(
                f"{name}: the file could not be evicted (resident {resident}): cold rows of "
                "this workload are not cold"
            )
        cmd = [sys.executable, str(Path(__file__).resolve()), "--cold-child", str(path)]
        cmd += ["--method", "ckptio" if method == "ckptio" else "torch"]
        if smoke:
            cmd.append("--cpu-smoke")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, b.left()))
        if proc.returncode != 0:
            raise RuntimeError(f"cold {method} load failed:\n{proc.stdout}\n{proc.stderr}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        b.row(name, "load", method, got["seconds"], size, cache=COLD)


def run_loads(
    b: Bench, name: str, sd: Any, directory: Path, repeats: int, *, measure_read: bool, cold: bool
) -> None:
    path = directory / f"{name.replace(' ', '_')}.pt"
    ckptio.save(sd, path)
    size = path.stat().st_size
    dev = b.device
    warm_page_cache(path)
    if measure_read:
        b.limit("page-cache read GB/s", read_bandwidth(b, path))

    def ckptio_load() -> Any:
        return ckptio.load(path, map_location=dev)

    def torch_load() -> Any:
        return torch.load(path, map_location=dev)

    def torch_mmap() -> Any:
        m = torch.load(path, mmap=True, map_location="cpu")
        return {k: v.to(dev) for k, v in m.items()}

    into = {k: torch.empty_like(v) for k, v in sd.items()}  # load_into's and dcp's target

    def ckptio_load_into() -> Any:
        ckptio.load_into(into, path)
        return into

    def ckptio_open() -> Any:
        with ckptio.open(path, map_location=dev) as h:
            return h.get_tensors()

    import torch.distributed.checkpoint as dcp

    dcp_dir = directory / f"{path.stem}.dcp"
    dcp.save(sd, storage_writer=ckptio.dcp.Writer(dcp_dir))
    for f in dcp_dir.iterdir():
        warm_page_cache(f)

    def ckptio_dcp() -> Any:
        dcp.load(into, storage_reader=ckptio.dcp.Reader(dcp_dir))
        return into

    methods: list[tuple[str, Callable[[], Any]]] = [
        ("ckptio", ckptio_load),
        ("ckptio load_into", ckptio_load_into),
        ("ckptio open", ckptio_open),
        ("ckptio dcp", ckptio_dcp),
        ("torch.load", torch_load),
        ("torch.load(mmap)+.cuda()", torch_mmap),
    ]
    st_path = path.with_suffix(".safetensors")
    ckptio.save(sd, st_path, format="safetensors")  # GPU tensors through the ring
    warm_page_cache(st_path)
    methods.insert(4, ("ckptio safetensors", lambda: ckptio.load(st_path, map_location=dev)))
    try:
        import safetensors.torch as st

        def st_load() -> Any:
            return st.load_file(str(st_path), device=dev if dev == "cpu" else "cuda")

        methods.append(("safetensors", st_load))
    except ImportError:
        if "safetensors not installed: its rows are missing" not in b.notes:
            b.notes.append("safetensors not installed: its rows are missing")

    for method, fn in methods:
        if b.left() < 20:
            b.notes.append(f"{name}: {method} skipped (time budget)")
            continue
        secs, result = b.timed(fn, repeats)
        same(sd, result)
        del result
        b.row(name, "load", method, secs, size)
    # Host RSS growth of one more ckptio load, sampled.
    gc.collect()
    b.free()
    with peak_rss() as r:
        result = ckptio_load()
        b.sync()
    del result
    growth = r["peak"] - r["base"]
    opts = ckptio.get_options()
    ring = opts.staging_buffer_bytes * opts.staging_buffers
    b.limit(f"{name}: host RSS growth MiB", growth / MIB)
    b.checks.append(
        (
            f"{name}: host RSS growth <= ring + 10% ({ring / MIB:.0f} MiB)",
            growth <= 1.1 * ring,
            f"{growth / MIB:.1f} MiB",
        )
    )
    if cold:
        run_cold(b, name, path, smoke=not b.cuda)
    shutil.rmtree(dcp_dir)
    for p in directory.glob(f"{path.stem}.*"):
        p.unlink()


def _async_save(sd: Any, target: Path) -> None:
    ckptio.async_save(sd, target).result()


def _dcp_save(sd: Any, target: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(sd, storage_writer=ckptio.dcp.Writer(target))


def _dcp_check(sd: Any, target: Path, device: str) -> None:
    import torch.distributed.checkpoint as dcp

    back = {k: torch.zeros_like(v, device=device) for k, v in sd.items()}
    dcp.load(back, storage_reader=ckptio.dcp.Reader(target))
    same(sd, back)


def _remove(target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


def run_saves(b: Bench, name: str, sd: Any, directory: Path, repeats: int) -> None:
    size = nbytes_of(sd)
    savers: list[tuple[str, Callable[[Any, Path], Any]]] = [
        ("ckptio", ckptio.save),
        ("ckptio async_save", _async_save),
        ("ckptio dcp", _dcp_save),
        ("torch.save", torch.save),
    ]
    for method, save in savers:
        if b.left() < 20:
            b.notes.append(f"{name}: save {method} skipped (time budget)")
            continue
        target = directory / ("save.dcp" if method == "ckptio dcp" else "save.pt")
        save(sd, target)  # warm-up, as for the loads
        _remove(target)
        times = []
        for _ in range(repeats):
            drop_page_cache_pressure(directory, size)
            b.sync()
            t0 = time.perf_counter()
            save(sd, target)
            times.append(time.perf_counter() - t0)
            if len(times) < repeats:
                _remove(target)  # every save to a new path
        secs = statistics.median(times)
        if method == "ckptio dcp":
            _dcp_check(sd, target, b.device)
        else:  # checked against torch in tests
            same(sd, ckptio.load(target, map_location=b.device))
        _remove(target)
        b.row(name, "save", method, secs, size)


# ------------------------------------------------------------------------------ report
def evaluate(b: Bench, workloads: list[str]) -> list[str]:
    """Adds the targets to b.checks; returns the enforced failures: each workload and cache
    state where ckptio's load is slower than torch.load(map_location="cuda")."""
    failures: list[str] = []
    h2d = b.limits.get("pinned H2D GB/s", 0.0)
    rd = b.limits.get("page-cache read GB/s", 0.0)
    limit = min(h2d, rd)
    for w in workloads:
        for cache in (WARM, COLD):
            ours, theirs = (
                b.seconds(w, "load", "ckptio", cache),
                b.seconds(w, "load", "torch.load", cache),
            )
            if ours is None or theirs is None:
                continue
            ok = ours <= theirs
            b.checks.append(
                (
                    f"{w} ({cache}): ckptio not slower than torch.load [enforced]",
                    ok,
                    f"{theirs / ours:.2f}x",
                )
            )
            if not ok:
                failures.append(f"{w} ({cache}): ckptio {ours:.3f} s > torch.load {theirs:.3f} s")
        ours = b.seconds(w, "load", "ckptio")
        if ours is None:
            continue
        size = next(r["nbytes"] for r in b.rows if r["workload"] == w and r["op"] == "load")
        t = b.seconds(w, "load", "torch.load")
        for method in ("ckptio", *LOAD_PATHS):
            secs = b.seconds(w, "load", method)
            if secs is None:
                continue
            gbps = size / secs / GB
            if not w.startswith("small") and limit > 0:
                b.checks.append(
                    (
                        f"{w}: {method} GPU load >= 90% of min(H2D, read) = {0.9 * limit:.2f} GB/s",
                        gbps >= 0.9 * limit,
                        f"{gbps:.2f} GB/s",
                    )
                )
            if t is not None:
                b.checks.append(
                    (
                        f"{w}: {method} >= 3x faster than torch.load(map_location=cuda)",
                        t / secs >= 3,
                        f"{t / secs:.2f}x",
                    )
                )
        s = b.seconds(w, "load", "safetensors")
        if s is not None:
            b.checks.append((f"{w}: ahead of safetensors", ours < s, f"{s / ours:.2f}x"))
        tv = b.seconds(w, "save", "torch.save")
        for method in ("ckptio", *SAVE_PATHS):
            sv = b.seconds(w, "save", method)
            if sv is not None and tv is not None:
                b.checks.append(
                    (
                        f"{w}: {method} GPU save >= 2x faster than torch.save",
                        tv / sv >= 2,
                        f"{tv / sv:.2f}x",
                    )
                )
    return failures


def report(b: Bench, out_dir: Path | None, header: str) -> str:
    lines = [header, "", *TABLE_HEAD]
    lines += [table_line(b, r) for r in b.rows]
    lines += ["", "| raw limit / measure | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in b.limits.items()]
    lines += ["", "| target | result | measured |", "|---|---|---:|"]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} | {got} |" for name, ok, got in b.checks]
    lines += [f"- {n}" for n in b.notes]
    text = "\n".join(lines)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_gpu.md").write_text(text + "\n")
        (out_dir / "bench_gpu.json").write_text(
            json.dumps(
                {"rows": b.rows, "limits": b.limits, "checks": b.checks, "notes": b.notes}, indent=1
            )
        )
    return text


@contextlib.contextmanager
def cpu_stand_in() -> Iterator[None]:
    """--cpu-smoke: CPU storages of loads and saves go through the staging pipeline with the
    simulated device copier (tests/_simulated_copier.py), so the benchmark's ckptio rows
    exercise the same scheduling."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: test-only helpers
    from _simulated_copier import SimulatedCopier

    made: list[SimulatedCopier] = []

    def copier() -> SimulatedCopier:
        made.append(SimulatedCopier())
        return made[-1]

    real_target, real_copier_for = _staging.staging_target, _staging.copier_for
    _staging.staging_target = lambda loc: (  # type: ignore[assignment]
        _staging.DeviceTarget(torch.device("cpu"), copier) if loc == "cpu" else None
    )
    _staging.copier_for = lambda dev: copier() if dev.type == "cpu" else None  # type: ignore[assignment]
    try:
        yield
    finally:
        _staging.staging_target, _staging.copier_for = real_target, real_copier_for
        for c in made:
            c.close()
        if any(c.violations for c in made):
            raise AssertionError("the stand-in copier saw a slot reused too early")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", help="where the files go (a fresh temporary directory inside)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="write the results here")
    ap.add_argument("--sizes-gb", default="2,6", help="bf16 state dict sizes in GB")
    ap.add_argument("--small", type=int, default=20_000, help="tensors in the small workload")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting work after this")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a quick check)")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on the CPU, stand-in copier"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--cold-child", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=["ckptio", "torch"], help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.cpu_smoke else "cuda"
    if args.cold_child:
        smoke = cpu_stand_in() if args.cpu_smoke else contextlib.nullcontext()
        with smoke:
            print(json.dumps(cold_child(args.cold_child, args.method, device)))
        return 0
    if args.cpu_smoke or args.tiny:
        sizes = [2 * MIB, 6 * MIB]
        small = 100
    else:
        sizes = [int(float(s) * GB) for s in args.sizes_gb.split(",") if s]
        small = args.small
    steps = plan(sizes, small)
    if args.dry_run:
        print(f"plan (budget {args.budget_s:.0f} s):")
        for i, (kind, name, size) in enumerate(steps):
            repeats = 1 if kind == "bf16" and size > 4 * GB else 3
            what = "loads warm x" + str(repeats) + " + 1 warm-up each, cold ckptio/torch.load"
            print(f"  {name}: {what}{', saves' if i < 2 else ''}")
        print("\n".join(TABLE_HEAD))
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke for the CPU stand-in", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="ckptio-bench-gpu-", dir=args.dir))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU stand-in (no GPU)"
    opts = ckptio.get_options()
    header = (
        f"## ckptio GPU benchmark: {gpu}; torch {torch.__version__}; threads {opts.threads}; "
        f"ring {opts.staging_buffers} x {opts.staging_buffer_bytes // MIB} MiB"
    )
    out_dir = Path(args.out) if args.out else None
    sink = Rows(out_dir, header)
    b = Bench(device, args.budget_s, sink)
    print(header, flush=True)
    print("\n".join(TABLE_HEAD), flush=True)
    smoke = cpu_stand_in() if args.cpu_smoke else contextlib.nullcontext()
    failures: list[str] = []
    try:
        with smoke:
            b.limit("pinned H2D GB/s", h2d_bandwidth(b, min(1 << 30, max(sizes))))
            workloads = []
            for i, (kind, name, size) in enumerate(steps):
                if b.left() < 30:
                    b.notes.append(f"{name}: skipped (time budget)")
                    continue
                if kind == "small":
                    sd = small_state_dict(size, device, seed=7)
                    repeats = 3
                else:
                    sd = bf16_state_dict(size, device, seed=i)
                    repeats = 1 if size > 4 * GB else 3
                workloads.append(name)
                # The read limit of the biggest file measured wins.
                # Cold rows: each workload of the full run; the first only with --tiny or
                # --cpu-smoke (each costs two fresh processes).
                cold = i == 0 or not (args.tiny or args.cpu_smoke)
                run_loads(b, name, sd, root, repeats, measure_read=kind == "bf16", cold=cold)
                if i < 2:  # saves: the first bf16 workload and the small tensors
                    run_saves(b, name, sd, root, repeats)
                del sd
                gc.collect()
                b.free()
            failures = evaluate(b, workloads)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        sink.close()
    text = report(b, out_dir, header)
    print()
    print(text)
    if args.cpu_smoke:
        print("\n(CPU stand-in: no GPU figures; the targets are not GPU results, none enforced)")
        return 0
    if args.tiny:
        print("\n(--tiny: sizes too small to judge speed; nothing enforced)")
        return 0
    if failures:
        print("\nFAIL: ckptio slower than torch.load(map_location='cuda'):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
