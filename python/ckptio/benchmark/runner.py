"""The measurement loop.

Per workload: every format is written by its own writer to a path that does not exist yet
(the previous round's file is unlinked, untimed), and the page-cache write limit timed among
them (save rounds); every loader is checked once against the original (a wrong result stops
the run); then the loads are timed three ways:

* **first loads** (the headline): each sample is a fresh process whose first work is one
  load+touch (imports done, untimed), what an inference server pays; page cache warm; the
  machine's "read into fresh memory" limits are timed the same way beside them.
* **cold first loads**: the same with the file evicted from the page cache before each sample
  (``posix_fadvise`` DONTNEED, checked with ``mincore``), beside the cold parallel read limits.
* **repeated loads**: the load rounds of one process (_child.py says why a separate one),
  where later loads reuse memory earlier ones freed; a labelled row, never the headline.

Round 0 of each is a warm-up and is not counted; each later round runs all candidates,
rotating who goes first, so that all of them meet the same machine state (on shared VMs the
cost of fresh memory and of page-cache writes drifts within a minute). Results are medians;
ratios are computed within the run.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

import ckptio

from .._util import gc_paused
from ._measure import touch
from .candidates import CANDIDATES, FORMATS, BenchmarkError, Candidate, verify, zeros_like_tree
from .limits import COLD_LIMITS, FIRST_LIMITS, Limits, evicted
from .workloads import Workload, build

_WRITE_LIMIT = "limit:write"  # the write limit's entry in the save rounds' rotation

__all__ = ["Settings", "run", "run_files"]


@dataclass
class Settings:
    rounds: int = 5  # timed rounds of the saves and of the repeated loads
    first_rounds: int = 5  # fresh processes per candidate for the first loads (and cold ones)
    cold: bool = True  # also time cold first loads (the file evicted before each)
    quick: bool = False
    directory: Optional[str] = None
    candidates: Optional[Sequence[str]] = None  # None: every available one
    rss: bool = True  # peak RSS of each save (a load's comes with its first loads)
    limits: bool = True
    log: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr, flush=True))


def _median(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _rotating(names: list[str], r: int) -> list[str]:
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def _scratch_directory(settings: Settings) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory for the run's files, inside ``settings.directory`` (created if
    missing) when one is given."""
    if settings.directory is not None:
        os.makedirs(settings.directory, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="ckptio-bench-", dir=settings.directory)


def prime_writes(directory: str, nbytes: int) -> None:
    """Writes and deletes a throwaway file of ~1.2x the payload: on these VMs the first writes
    after idle run several times slower, which would penalise whichever save runs first."""
    scratch = os.path.join(directory, "prime.bin")
    block = b"\0" * (16 << 20)
    with open(scratch, "wb") as f:
        for _ in range(max(1, int(nbytes * 1.2) // len(block))):
            f.write(block)
    os.unlink(scratch)


def select(settings: Settings, log: Callable[[str], None]) -> tuple[list[Candidate], dict]:
    names = list(settings.candidates) if settings.candidates else list(CANDIDATES)
    chosen, skipped = [], {}
    for n in names:
        if n not in CANDIDATES:
            raise BenchmarkError(f"unknown candidate {n!r}; choose from {', '.join(CANDIDATES)}")
        why = CANDIDATES[n].unavailable()
        if why is None:
            chosen.append(CANDIDATES[n])
        else:
            skipped[n] = why
            log(f"  skipping {n}: {why}")
    return chosen, skipped


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _child(spec: dict, timeout: float) -> dict:
    """Runs one _child.py measurement in a fresh process; its result, or BenchmarkError."""
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"
    out = subprocess.run(
        [sys.executable, "-m", "ckptio.benchmark._child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1:] or ["failed"]
        raise BenchmarkError(f"the {spec['op']} process failed: {last[0]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _read_through(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def _child_rss(spec: dict) -> dict:
    try:
        return _child(spec, timeout=600)
    except BenchmarkError as e:
        return {"error": [str(e)]}


def load_rounds(
    loaders: dict[str, tuple[Candidate, str]],
    targets: dict[str, Any],
    limits: Optional[Limits],
    rounds: int,
    skip: Sequence[str] = (),
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {
        n: {"load": [], "touch": [], "load_touch": []} for n in loaders
    }
    ltimes: dict[str, list[float]] = {}
    timers = limits.timers() if limits is not None else {}
    for k in skip:
        timers.pop(k, None)
    entries = list(loaders) + [f"limit:{k}" for k in timers]
    for r in range(rounds + 1):
        for name in _rotating(entries, r):
            if name.startswith("limit:"):
                dt = timers[name[6:]]()
                if r and dt is not None:
                    ltimes.setdefault(name[6:], []).append(dt)
                continue
            cand, path = loaders[name]
            gc.collect()  # each load starts from the same collector state, not the last one's
            t0 = time.perf_counter()
            out = cand.load(path, targets.get(name))
            t1 = time.perf_counter()
            # The touch harness allocates (a set of ranges, a list) and would trigger full
            # collections over the loaded objects: 0.05-0.2 s of noise on 20,000 tensors,
            # charged to whichever candidate the collector's phase falls on.
            with gc_paused():
                touch(out)
            t2 = time.perf_counter()
            del out
            if r:
                times[name]["load"].append(t1 - t0)
                times[name]["touch"].append(t2 - t1)
                times[name]["load_touch"].append(t2 - t0)
    return times, ltimes


def _summarise(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, t in times.items():
        out[name] = {
            "load_s": _median(t["load"]),
            "touch_s": _median(t["touch"]),
            "load_touch_s": _median(t["load_touch"]),
            "load_runs": t["load"],
            "load_touch_runs": t["load_touch"],
        }
    return out


def _ratios(result: dict[str, Any]) -> None:
    """Speed-ups within the run: each load row vs torch.load's same row (first, cold,
    repeated), mmap loaders also vs torch.load(mmap=True)'s; the first load's time over the
    machine limit that bounds it (a ratio <= 1 reaches it); saves vs torch.save."""
    cands = result["candidates"]

    def speedup(base: Optional[float], v: Optional[float]) -> Optional[float]:
        return base / v if base and v else None

    def row(name: str, key: str) -> Optional[float]:
        c = cands.get(name, {})
        return c.get(key, {}).get("s") if key in ("first", "cold") else c.get(key)

    flimits = result.get("first_limits", {})
    fresh = [flimits[k]["s"] for k in ("read fresh 4K", "read fresh huge") if k in flimits]
    mapped = flimits.get("map + touch", {}).get("s")
    for c in cands.values():
        for key, label in (("load_touch_s", "load_touch"), ("first", "first"), ("cold", "cold")):
            v = c.get(key, {}).get("s") if key in ("first", "cold") else c.get(key)
            c[f"{label}_vs_torch"] = speedup(row("torch", key), v)
            c[f"{label}_vs_torch_mmap"] = speedup(row("torch mmap", key), v)
        # The bound of a first load: reading into fresh memory, or for mmap loaders mapping
        # the file and touching its pages; a ratio of 1.0 reaches it.
        first = c.get("first", {}).get("s")
        bound = mapped if c.get("kind") == "mmap" else min(filter(None, fresh), default=None)
        c["first_vs_limit"] = first / bound if first and bound else None
    saves = result["saves"]
    sbase = saves.get("torch", {}).get("save_s")
    for s in saves.values():
        s["save_vs_torch"] = sbase / s["save_s"] if sbase and s.get("save_s") else None


def _limits_result(ltimes: dict[str, list[float]], limits: Optional[Limits]) -> dict[str, Any]:
    if limits is None:
        return {}
    out: dict[str, Any] = {k: {"s": _median(v), "runs": v} for k, v in ltimes.items()}
    out["bytes"] = limits.nbytes
    return out


def first_loads(
    loaders: dict[str, tuple[Candidate, str]],
    limits: Optional[Limits],
    rounds: int,
    cold: bool,
    warmup: bool = True,
) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Times each loader's first load+touch in a fresh process, `rounds` samples each after a
    warm-up round (none when not `warmup`: quick runs), candidates rotating who goes first;
    with the machine limits that bound it (the fresh-memory reads, or with `cold` the cold
    reads) timed the same way. `cold` evicts the file before each sample. Returns each
    loader's and each limit's samples (the child's result dicts: seconds, peak RSS, the
    file's resident fraction after an eviction)."""
    names = (COLD_LIMITS if cold else FIRST_LIMITS) if limits is not None else ()
    entries = list(loaders) + [f"limit:{k}" for k in names]
    samples: dict[str, list[dict]] = {n: [] for n in loaders}
    lsamples: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(0 if warmup else 1, rounds + 1):
        for name in _rotating(entries, r):
            if name.startswith("limit:"):
                assert limits is not None
                spec = {"op": "limit", "limit": name[6:], "cold": cold}
                spec.update(source=limits.source, scratch=limits.scratch)
                out = _child(spec, timeout=600)
                if r:
                    lsamples[name[6:]].append(out)
                continue
            spec = {"op": "load", "candidate": name, "path": loaders[name][1], "cold": cold}
            out = _child(spec, timeout=600)
            if r:
                samples[name].append(out)
    return samples, lsamples


def _first_summary(runs: list[dict], cold: bool) -> dict[str, Any]:
    secs = [x["seconds"] for x in runs if x.get("seconds") is not None]
    out: dict[str, Any] = {"s": _median(secs), "runs": secs}
    notes = {x["note"] for x in runs if x.get("note")}
    if notes:
        out["note"] = "; ".join(sorted(notes))
    elif cold:
        resident = [x.get("resident") for x in runs]
        out["resident_max"] = max((x for x in resident if x is not None), default=None)
        if runs and not all(evicted(x) for x in resident):
            out["note"] = (
                "the kernel kept part of the file in the page cache"
                if any(x is not None for x in resident)
                else "the page cache could not be dropped for the file (fadvise)"
            )
    return out


def run_workload(wl: Workload, settings: Settings, cands: list[Candidate], d: str) -> dict:
    log = settings.log
    fmts = sorted({c.fmt for c in cands}, key=list(FORMATS).index)
    if wl.flat is None:
        dropped = [c.name for c in cands if FORMATS[c.fmt].flat]
        if dropped:
            log(f"  {wl.name}: not a flat dict of tensors; skipping {', '.join(dropped)}")
        cands = [c for c in cands if not FORMATS[c.fmt].flat]
        fmts = [f for f in fmts if not FORMATS[f].flat]
    paths = {f: os.path.join(d, f"{wl.name}-{f}{FORMATS[f].ext}") for f in fmts}
    payload = {f: (wl.flat if FORMATS[f].flat else wl.obj) for f in fmts}
    nbytes = wl.nbytes

    # -- saves
    log(f"  {wl.name}: saving ({', '.join(FORMATS[f].name for f in fmts)})")
    save_times: dict[str, list[float]] = {f: [] for f in fmts}
    failed: dict[str, str] = {}  # peers that cannot handle this workload, and why
    # The page-cache write limit is timed among the writers, after the same throwaway write,
    # so it meets the machine state the saves meet (on these VMs fresh page-cache memory is
    # fast or several times slower from one write to the next). It needs ckptio's file for
    # its size: it joins from the first timed round.
    limits: Optional[Limits] = None
    write_times: list[float] = []
    for r in range(settings.rounds + 1):
        entries = fmts + ([_WRITE_LIMIT] if limits is not None else [])
        for f in _rotating(entries, r):
            if f in failed:
                continue
            if not settings.quick:
                prime_writes(d, nbytes)
            gc.collect()
            if f == _WRITE_LIMIT:
                assert limits is not None
                write_times.append(limits.write())
                continue
            _unlink(paths[f])  # every writer saves to a new path, untimed
            t0 = time.perf_counter()
            try:
                FORMATS[f].save(payload[f], paths[f])
            except Exception as e:
                if FORMATS[f].requires is None:
                    raise
                failed[f] = f"{FORMATS[f].name} failed: {type(e).__name__}: {e}"
                log(f"  {wl.name}: {failed[f]}; its loaders sit this workload out")
                continue
            dt = time.perf_counter() - t0
            if r:
                save_times[f].append(dt)
        if r == 0 and settings.limits and "ckptio" in paths and "ckptio" not in failed:
            limits = Limits(paths["ckptio"], os.path.join(d, f"{wl.name}-limit.bin"))
    for c in cands:
        if c.fmt in failed:
            failed[c.name] = failed[c.fmt]
    fmts = [f for f in fmts if f not in failed]
    cands = [c for c in cands if c.fmt not in failed]
    saves = {
        f: {
            "name": FORMATS[f].name,
            "save_s": _median(save_times[f]),
            "save_runs": save_times[f],
            "file_bytes": os.path.getsize(paths[f]),
        }
        for f in fmts
    }

    # -- correctness, once per loader, before any timing
    targets: dict[str, Any] = {}
    loaders: dict[str, tuple[Candidate, str]] = {}
    for c in cands:
        if c.kind == "reuse":
            targets[c.name] = zeros_like_tree(wl.obj)
        original = payload[c.fmt]
        try:
            loaded = c.load(paths[c.fmt], targets.get(c.name))
        except Exception as e:
            if c.requires is None and FORMATS[c.fmt].requires is None:
                raise
            failed[c.name] = f"{c.name} failed: {type(e).__name__}: {e}"
            log(f"  {wl.name}: {failed[c.name]}")
            targets.pop(c.name, None)
            continue
        verify(
            f"{c.name} ({wl.name})",
            loaded,
            original,
            wl.tied if c.keeps_sharing else None,
            ordered=c.keeps_sharing,
        )
        del loaded
        loaders[c.name] = (c, paths[c.fmt])
    log(f"  {wl.name}: {len(loaders)} loaders verified against the original")
    del targets  # the load rounds' process builds its own
    result = _measure_loads(
        wl.name,
        wl.description,
        nbytes,
        loaders,
        saves,
        settings,
        d,
        paths.get("ckptio"),
        payload,
        paths,
        limits,
        write_times,
    )
    result["failed"] = {k: v for k, v in failed.items() if k in CANDIDATES}
    return result


def _measure_loads(
    name: str,
    description: str,
    nbytes: int,
    loaders: dict[str, tuple[Candidate, str]],
    saves: dict[str, Any],
    settings: Settings,
    d: str,
    limit_source: Optional[str],
    payload: Optional[dict[str, Any]] = None,
    paths: Optional[dict[str, str]] = None,
    limits: Optional[Limits] = None,
    write_times: Optional[list[float]] = None,
) -> dict:
    """Times the loads, and the machine limits not timed yet: `write_times`, when given, are
    the `write` limit's runs from the save rounds (`limits` then comes from there too)."""
    log = settings.log
    if limits is None and settings.limits and limit_source is not None:
        limits = Limits(limit_source, os.path.join(d, f"{name}-limit.bin"))
    log(f"  {name}: {settings.rounds} load rounds after a warm-up, in a fresh process")
    try:
        spec = {
            "op": "rounds",
            "loaders": {n: path for n, (_c, path) in loaders.items()},
            "rounds": settings.rounds,
            "limits": None
            if limits is None
            else {"source": limits.source, "scratch": limits.scratch},
            "skip": ["write"] if write_times is not None else [],
        }
        out = _child(spec, timeout=3600)
        times, ltimes = out["times"], out["ltimes"]
        if write_times is not None:
            ltimes["write"] = write_times
        limit_result = _limits_result(ltimes, limits)
    finally:
        if limits is not None:
            limits.close()
    cands = _summarise(times)
    for n, (c, path) in loaders.items():
        cands[n].update(kind=c.kind, format=c.fmt, file_bytes=os.path.getsize(path))
    result = {
        "description": description,
        "tensor_bytes": nbytes,
        "saves": saves,
        "candidates": cands,
        "limits": limit_result,
        "first_limits": {},
        "cold_limits": {},
    }
    log(f"  {name}: first loads, {settings.first_rounds} fresh processes per candidate")
    first, flimits = first_loads(
        loaders, limits, settings.first_rounds, cold=False, warmup=not settings.quick
    )
    for n, runs in first.items():
        cands[n]["first"] = _first_summary(runs, cold=False)
        # A load's peak RSS: the largest of its first loads (each a fresh process).
        cands[n]["rss"] = max(runs, key=lambda x: x["delta_rss"]) if runs else {}
    result["first_limits"] = {k: _first_summary(v, cold=False) for k, v in flimits.items()}
    if settings.cold:
        log(f"  {name}: cold first loads (the file evicted before each)")
        cold, climits = first_loads(
            loaders, limits, settings.first_rounds, cold=True, warmup=not settings.quick
        )
        for n, runs in cold.items():
            cands[n]["cold"] = _first_summary(runs, cold=True)
        result["cold_limits"] = {k: _first_summary(v, cold=True) for k, v in climits.items()}
        for _c, path in loaders.values():
            _read_through(path)  # back to a warm page cache for what follows
    if settings.rss:
        if payload is not None and paths is not None and "ckptio" in paths:
            flat_src = None
            for f, s in saves.items():
                source = paths["ckptio"]
                if FORMATS[f].flat and payload[f] is not payload.get("ckptio"):
                    if flat_src is None:
                        flat_src = os.path.join(d, f"{name}-flat-source.pt")
                        ckptio.save(payload[f], flat_src)
                    source = flat_src
                scratch = os.path.join(d, f"{name}-rss-save{FORMATS[f].ext}")
                s["rss"] = _child_rss({"op": "save", "fmt": f, "source": source, "path": scratch})
    _ratios(result)
    return result


def _meta(settings: Settings) -> dict:
    opts = ckptio.get_options()
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        thp = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ckptio": ckptio.__version__,
        "ckptio_threads": opts.threads,
        "ckptio_huge_pages": opts.huge_pages,
        "ckptio_recycle_max_bytes": opts.recycle_max_bytes if opts.recycle_memory else 0,
        "transparent_hugepage": thp,
        "rounds": settings.rounds,
        "first_rounds": settings.first_rounds,
        "cold": settings.cold,
        "warmup_rounds": 1,
        "quick": settings.quick,
        "statistic": "median",
    }


def _start(settings: Settings) -> tuple[list[Candidate], dict]:
    """The candidates to run and the results dict they fill (meta, skipped candidates)."""
    cands, skipped = select(settings, settings.log)
    return cands, {"meta": _meta(settings), "skipped": skipped, "workloads": {}}


def run(workloads: Sequence[str], settings: Settings) -> dict:
    """Runs the synthetic workloads; returns the results as a JSON-ready dict."""
    log = settings.log
    cands, results = _start(settings)
    with _scratch_directory(settings) as d:
        for name in workloads:
            log(f"building workload {name}{' (quick)' if settings.quick else ''}...")
            wl = build(name, settings.quick)
            results["workloads"][name] = run_workload(wl, settings, cands, d)
            del wl
    return results


def _file_group(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "torchzip"
    if path.endswith(".tensors"):
        return "tensorizer"
    if path.endswith(".safetensors"):
        return "safetensors"
    raise BenchmarkError(f"{path}: not a torch zip checkpoint, .safetensors or .tensors file")


def _reference(path: str, group: str) -> Any:
    if group == "torchzip":
        return torch.load(path, weights_only=True)
    if group == "safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    from tensorizer import TensorDeserializer

    d = TensorDeserializer(path, device="cpu", lazy_load=False)
    out = dict(d)
    d.close()
    return out


def run_files(files: Sequence[str], settings: Settings) -> dict:
    """Benchmarks loading existing files with every candidate that reads their format."""
    log = settings.log
    cands, results = _start(settings)
    with _scratch_directory(settings) as d:
        for path in files:
            group = _file_group(path)
            original = _reference(path, group)
            loaders: dict[str, tuple[Candidate, str]] = {}
            targets: dict[str, Any] = {}
            for c in cands:
                if FORMATS[c.fmt].group != group:
                    continue
                if c.kind == "reuse":
                    targets[c.name] = zeros_like_tree(original)
                loaded = c.load(path, targets.get(c.name))
                verify(f"{c.name} ({path})", loaded, original, ordered=c.keeps_sharing)
                del loaded
                loaders[c.name] = (c, path)
            if not loaders:
                raise BenchmarkError(f"{path}: no selected candidate reads {group} files")
            log(f"{path}: {len(loaders)} loaders verified")
            nbytes = sum(
                {
                    t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in _tensors(original)
                }.values()
            )
            del original, targets  # the load rounds' process builds its own targets
            results["workloads"][os.path.basename(path)] = _measure_loads(
                os.path.basename(path), path, nbytes, loaders, {}, settings, d, path
            )
    return results


def _tensors(obj: Any) -> list[torch.Tensor]:
    from .workloads import iter_tensors

    return iter_tensors(obj)
