"""Model directories: ckptio against what loaders of sharded checkpoints do today.

    python bench/bench_directories.py [--gb 3] [--shards 4,16] [--rounds 5] [--dir DIR]
                                      [--json out.json] [--markdown out.md]

An LLM-shaped fp16 state dict of about ``--gb`` GB is saved as huggingface_hub's layout
(``model-0000i-of-0000n.safetensors`` + index, and ``pytorch_model-...bin`` + index) in each
shard count. Every sample is the FIRST load of a fresh Python process (imports excluded),
followed by a touch of every page, page cache warm; candidates run in a new (seeded) random
order each round, and each result is checked against a per-tensor digest of the state dict.
Medians of ``--rounds`` processes. Before each sample the machine settles: the run waits
until the memory the previous process freed is available again (``MemAvailable`` stops
rising), so no candidate pays for its predecessor's teardown. The shard size is chosen so the
hub's split rule gives exactly the shard counts asked for. ``--json`` is rewritten after
every round, so an interrupted run keeps what it measured.

Candidates, on the same file list. Eager loads (every tensor in the process's own memory):
  ckptio.load(dir)                          one read plan over every shard
  safetensors load_file(backend='pread')    shard by shard
  torch.load                                shard by shard (torch-bin directories)
  fastsafetensors                           fastsafe_open(file list), CPU, no GDS
  Run:ai streamer                           SafetensorsStreamer.stream_files(file list), CPU
Zero-copy loads (tensors view mappings of the files), compared with each other only:
  ckptio.load(dir, mmap=True)               against safetensors load_file, shard by shard
Per-rank slices (rank 0 of 2 and of 4, rows of every matrix): ckptio open(dir).get_slices
(eager) against safetensors safe_open().get_slice per tensor, shard by shard, copied (eager)
and as views of the mapping (zero-copy, labelled).
Limits, measured the same way (fresh process, touch): the bytes each kind of load needs (the
whole shards, or only rank 0's rows) read into fresh memory (a mapping per 8 MiB) by ckptio's
C++ parallel pread as one plan, and every shard mapped with its pages touched. They bound what
any loader can do here; "vs limit" is a row's median over its group's limit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

CHILD = "--child"


# ------------------------------------------------------------------------- the state dict
def build(gb: float) -> dict[str, torch.Tensor]:
    """A decoder's weights in fp16: embeddings, then per layer attention and MLP matrices."""
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 2
    layers = max(1, int((gb * 1e9 - 2 * vocab * hidden * 2) / per_layer))
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.float16)

    sd["model.embed_tokens.weight"] = rand(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = rand(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        sd[p + "input_layernorm.weight"] = rand(hidden)
        sd[p + "post_attention_layernorm.weight"] = rand(hidden)
    sd["lm_head.weight"] = rand(vocab, hidden)
    return sd


def digest(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: the sum of its bytes (order-free, cheap, catches a wrong or torn read)."""
    return {
        k: float(t.contiguous().view(torch.uint8).sum(dtype=torch.int64))
        for k, t in tensors.items()
    }


# ------------------------------------------------------------------------ the candidates
def _files(d: str) -> list[str]:
    (index,) = [n for n in os.listdir(d) if n.endswith(".index.json")]
    with open(os.path.join(d, index)) as f:
        weight_map = json.load(f)["weight_map"]
    return [os.path.join(d, s) for s in dict.fromkeys(weight_map.values())]


def _ckptio(d: str) -> dict[str, torch.Tensor]:
    import ckptio

    return ckptio.load(d)


def _ckptio_mmap(d: str) -> dict[str, torch.Tensor]:
    import ckptio

    return ckptio.load(d, mmap=True)


def _safetensors(d: str) -> dict[str, torch.Tensor]:
    """safetensors' default: tensors that view a mapping of each file (zero-copy)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in _files(d):
        out.update(load_file(f))
    return out


def _safetensors_pread(d: str) -> dict[str, torch.Tensor]:
    """safetensors' eager backend: each file read into fresh memory."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in _files(d):
        out.update(load_file(f, backend="pread"))  # type: ignore[call-arg]
    return out


def _torch(d: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in _files(d):
        out.update(torch.load(f, weights_only=True))
    return out


def _fastsafetensors(d: str) -> dict[str, torch.Tensor]:
    from fastsafetensors import fastsafe_open

    with fastsafe_open(_files(d), framework="pt", device="cpu", nogds=True) as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}


def _runai(d: str) -> dict[str, torch.Tensor]:
    from runai_model_streamer import SafetensorsStreamer

    with SafetensorsStreamer() as s:
        s.stream_files(_files(d), device="cpu")
        return {k: t.clone() for k, t in s.get_tensors()}


# ----------------------------------------------------------------------------- the limits
# What the machine allows for each kind of load, measured in the same run and the same way
# (a fresh process, then a touch of every page): no loader can beat these on this machine.
def _spans(d: str, world: int) -> list[tuple[str, int, int]]:
    """(file, offset, length) of every byte a loader must read: each shard whole (`world` 0),
    else rank 0's rows of every tensor (safetensors shards: one contiguous span each)."""
    if not world:
        return [(f, 0, os.path.getsize(f)) for f in _files(d)]
    import ckptio

    out = []
    for f in _files(d):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            begin, end = v["data_offsets"]
            shape = v["shape"]
            (rows,) = ckptio.rank_slice(tuple(shape), 0, world)[:1]
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            out.append(
                (f, 8 + n + begin + rows.start * row_bytes, (rows.stop - rows.start) * row_bytes)
            )
    return out


def _read_limit(d: str, world: int = 0) -> dict[str, torch.Tensor]:
    """The bytes a load needs, read into fresh memory by ckptio's C++ parallel pread over
    every file as one plan (threads, chunk size and huge pages from its settings): what an
    eager load costs without parsing, unpickling or making tensors. The memory is one fresh
    mapping per 8 MiB, as a loader allocates per tensor: faulting in one mapping of the whole
    size was measured 25-45% slower here (2.93 GB: 1.24-1.58 s against 0.97-1.10 s)."""
    import array

    from ckptio import _core
    from ckptio.settings import get_options

    opts = get_options()
    piece = 8 << 20
    buffers = []
    requests: dict[str, array.array] = {}
    for f, offset, n in _spans(d, world):
        for start in range(0, n, piece):
            size = min(piece, n - start)
            buffers.append(_core.io.HostBuffer(size, opts.huge_pages))
            requests.setdefault(f, array.array("Q")).extend(
                (offset + start, size, buffers[-1].address)
            )
    files = {f: _core.io.File.open(f, _core.io.FileMode.READ) for f in requests}
    try:
        _core.io.read_many(
            [(files[f], r, 0) for f, r in requests.items()], opts.threads, opts.chunk_bytes
        )
    finally:
        for file in files.values():
            file.close()
    return {str(i): torch.frombuffer(b, dtype=torch.uint8) for i, b in enumerate(buffers)}


def _map_limit(d: str) -> dict[str, torch.Tensor]:
    """Every shard mapped (read-only, private) as one uint8 tensor: what a zero-copy load
    costs without parsing a header or making a tensor per entry (the touch faults the pages)."""
    import mmap

    out = {}
    for f in _files(d):
        with open(f, "rb") as fh:
            m = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        out[f] = torch.frombuffer(memoryview(m), dtype=torch.uint8)  # type: ignore[arg-type]
    return out


def _slices_limit(d: str, world: int) -> dict[str, torch.Tensor]:
    return _read_limit(d, world)


def _rank_rows(rank: int, world: int) -> Callable[[str, tuple[int, ...]], Any]:
    import ckptio

    return lambda name, shape: ckptio.rank_slice(shape, rank, world, dim=0)


def _ckptio_slices(d: str, world: int) -> dict[str, torch.Tensor]:
    import ckptio

    with ckptio.open(d) as h:
        return h.get_slices(_rank_rows(0, world))


def _safetensors_slices(d: str, world: int, copy: bool = True) -> dict[str, torch.Tensor]:
    """safe_open().get_slice per tensor, shard by shard: views of the file's mapping, or with
    `copy` owned by the process (what a rank that keeps its part, not the file, holds)."""
    from safetensors import safe_open

    import ckptio

    out: dict[str, torch.Tensor] = {}
    for f in _files(d):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                part = s[ckptio.rank_slice(tuple(s.get_shape()), 0, world)]
                out[k] = part.clone() if copy else part
    return out


def _safetensors_slice_views(d: str, world: int) -> dict[str, torch.Tensor]:
    return _safetensors_slices(d, world, copy=False)


LIMIT_READ = "limit: every shard read into fresh memory"
LIMIT_MAP = "limit: every shard mapped (mmap), pages touched"
LIMIT_SLICES = "limit: the slices' bytes read into fresh memory"
LOADERS: dict[str, Callable[[str], dict[str, torch.Tensor]]] = {
    "ckptio.load(dir)": _ckptio,
    "ckptio.load(dir, mmap=True)": _ckptio_mmap,
    "safetensors load_file per shard (mmap views)": _safetensors,
    "safetensors load_file(backend='pread') per shard": _safetensors_pread,
    "torch.load per shard": _torch,
    "fastsafetensors (file list)": _fastsafetensors,
    "Run:ai streamer (file list)": _runai,
    LIMIT_READ: _read_limit,
    LIMIT_MAP: _map_limit,
}
#: Who loads which format of directory.
PLAN = {
    "safetensors": [
        "ckptio.load(dir)",
        LIMIT_READ,
        "safetensors load_file(backend='pread') per shard",
        "fastsafetensors (file list)",
        "Run:ai streamer (file list)",
        "ckptio.load(dir, mmap=True)",
        LIMIT_MAP,
        "safetensors load_file per shard (mmap views)",
    ],
    "torch": ["ckptio.load(dir)", LIMIT_READ, "torch.load per shard"],
}
SLICERS: dict[str, Callable[[str, int], dict[str, torch.Tensor]]] = {
    "ckptio get_slices": _ckptio_slices,
    "safetensors get_slice per tensor, copied": _safetensors_slices,
    "safetensors get_slice per tensor (mmap views)": _safetensors_slice_views,
    LIMIT_SLICES: _slices_limit,
}


def _touch(tensors: dict[str, torch.Tensor]) -> None:
    from ckptio.benchmark._measure import touch

    touch(tensors)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh-process sample: imports first (untimed), then the load and a touch of every
    page (timed), then the digest (untimed)."""
    import safetensors.torch  # noqa: F401

    import ckptio  # noqa: F401

    t0 = time.perf_counter()
    if spec["world"]:
        out = SLICERS[spec["candidate"]](spec["dir"], spec["world"])
    else:
        out = LOADERS[spec["candidate"]](spec["dir"])
    _touch(out)
    seconds = time.perf_counter() - t0
    # A limit returns raw bytes, not the state dict: nothing to check (and summing one
    # multi-GB tensor as int64 would need eight times its memory).
    limit = spec["candidate"].startswith("limit")
    return {"seconds": seconds, "digest": {} if limit else digest(out)}


# ----------------------------------------------------------------------------- the run
def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    return 0


def settle(limit_s: float = 10.0) -> float:
    """Waits until available memory stops rising (the last process's pages returned, and on
    a VM the balloon settled): three polls 0.2 s apart within 16 MiB of each other. Returns
    the seconds waited."""
    t0 = time.perf_counter()
    seen = [_mem_available()]
    while time.perf_counter() - t0 < limit_s:
        time.sleep(0.2)
        seen.append(_mem_available())
        if len(seen) >= 3 and max(seen[-3:]) - min(seen[-3:]) < 16 << 20:
            break
    return time.perf_counter() - t0


def shard_size_for(sd: dict[str, torch.Tensor], n: int, fmt: str) -> int:
    """The smallest max_shard_size (to 1 MiB) for which huggingface_hub's split rule, as
    ckptio's directory save applies it, writes exactly `n` shards (or the closest count)."""
    from ckptio._shard_writer import plan_directory

    total = sum(t.nbytes for t in sd.values())
    size = -(-total // n)
    best = size
    while size <= total:
        count = len(plan_directory(sd, size, fmt).shards)
        if count <= n:
            return size if count == n else best
        best = size
        size += 1 << 20
    return best


def _sample(candidate: str, d: str, world: int) -> dict[str, Any]:
    spec = json.dumps({"candidate": candidate, "dir": d, "world": world})
    done = subprocess.run(
        [sys.executable, __file__, CHILD, spec], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"{candidate} on {d} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _available(candidate: str) -> str | None:
    module = {"fastsafetensors": "fastsafetensors", "Run:ai": "runai_model_streamer"}
    for key, name in module.items():
        if candidate.startswith(key):
            try:
                __import__(name)
            except ImportError as e:
                return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--shards", default="4,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the directories go (default: a temp dir)")
    ap.add_argument(
        "--formats",
        default="safetensors,torch",
        help="directory formats to measure (default both); slices need safetensors",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)

    import ckptio

    root = args.dir or tempfile.mkdtemp(prefix="ckptio-dirbench-")
    os.makedirs(root, exist_ok=True)
    sd = build(args.gb)
    total = sum(t.nbytes for t in sd.values())
    expected = digest(sd)
    print(f"state dict: {len(sd)} tensors, {total / 1e9:.2f} GB", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        for n in [int(x) for x in args.shards.split(",")]:
            dirs = {}
            formats = args.formats.split(",")
            for fmt in formats:
                d = os.path.join(root, f"{fmt}-{n}")
                ckptio.save(sd, d, max_shard_size=shard_size_for(sd, n, fmt), format=fmt)
                dirs[fmt] = d
            written = [x for x in os.listdir(next(iter(dirs.values()))) if "-of-" in x]
            print(f"{n} shards requested: {len(written)} written", flush=True)
            plan = [
                (fmt, c)
                for fmt, names in PLAN.items()
                if fmt in formats
                for c in names
                if _available(c) is None
            ]
            slices = [(w, c) for w in (2, 4) for c in SLICERS if "safetensors" in formats]
            times: dict[tuple[str, str, int], list[float]] = {}
            samples = [(fmt, c, 0) for fmt, c in plan] + [("safetensors", c, w) for w, c in slices]
            shuffle = random.Random(n)
            for r in range(args.rounds):
                # A new order each round (seeded): a process runs after whatever ran before it,
                # and one that leaves the machine busy (freeing GBs, the VM's balloon taking
                # memory back) must not always slow the same candidate.
                order = shuffle.sample(samples, len(samples))
                for fmt, c, w in order:
                    settle()
                    got = _sample(c, dirs[fmt], w)
                    if w == 0 and not c.startswith("limit") and got["digest"] != expected:
                        raise RuntimeError(f"{c} on {dirs[fmt]} returned different tensors")
                    times.setdefault((fmt, c, w), []).append(got["seconds"])
                print(f"  round {r + 1}/{args.rounds} done", flush=True)
                if args.json:
                    _write_json(args.json, total, rows + _rows(times, len(written)))
            rows += _rows(times, len(written))
            for d in dirs.values():
                shutil.rmtree(d)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    table = _markdown(rows, total)
    print(table)
    if args.json:
        _write_json(args.json, total, rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


def _rows(times: dict[tuple[str, str, int], list[float]], shards: int) -> list[dict[str, Any]]:
    """One row per candidate, sorted: format, eager before zero-copy, ranks, then candidate
    (ckptio first)."""
    out = [
        {
            "shards": shards,
            "format": fmt,
            "candidate": c,
            "ranks": w,
            "median_s": statistics.median(ts),
            "samples": ts,
        }
        for (fmt, c, w), ts in times.items()
    ]
    return sorted(
        out,
        key=lambda r: (
            r["format"] != "safetensors",
            r["ranks"],
            "mmap" in r["candidate"] or "views" in r["candidate"],
            0 if r["candidate"].startswith("ckptio") else 1 if _is_limit(r) else 2,
            r["candidate"],
        ),
    )


def _is_limit(row: dict[str, Any]) -> bool:
    return str(row["candidate"]).startswith("limit")


def _write_json(path: str, total: int, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"total_bytes": total, "rows": rows}, f, indent=1)


def _markdown(rows: list[dict[str, Any]], total: int) -> str:
    lines = [
        f"State dict {total / 1e9:.2f} GB fp16; first load+touch of a fresh process, page cache "
        "warm, median of each candidate's processes.",
        "",
        "| shards | format | candidate | what | median | vs ckptio | vs limit | samples (s) |",
        "|---:|---|---|---|---:|---:|---:|---|",
    ]

    def group(x: dict[str, Any], r: dict[str, Any]) -> bool:
        zero_copy = "mmap" in r["candidate"] and not r["ranks"]
        return (
            x["shards"] == r["shards"]
            and x["ranks"] == r["ranks"]
            and x["format"] == r["format"]
            and ("mmap" in x["candidate"]) == zero_copy
        )

    for r in rows:
        base = next(
            x["median_s"] for x in rows if group(x, r) and x["candidate"].startswith("ckptio")
        )
        limit = next((x["median_s"] for x in rows if group(x, r) and _is_limit(x)), None)
        what = f"rank 0 of {r['ranks']} (rows)" if r["ranks"] else "whole directory"
        over = f"{r['median_s'] / limit:.2f}x" if limit else ""
        lines.append(
            f"| {r['shards']} | {r['format']} | {r['candidate']} | {what} | "
            f"{r['median_s']:.3f} s | {r['median_s'] / base:.2f}x | {over} | "
            f"{', '.join(f'{t:.2f}' for t in r['samples'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == CHILD:
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
