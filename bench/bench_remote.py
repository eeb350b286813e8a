"""First load of a checkpoint from an S3-compatible store on loopback, in a fresh process.

Starts moto's standalone S3 server on 127.0.0.1 (or uses ``--endpoint``), uploads the
GPT-2-medium fp16 state dict (~710 MB; ``--quick``: 2 layers and a small vocabulary, ~30 MB)
as a ckptio torch file and as a safetensors file, then times, each in a new process:

  ckptio (torch zip)        ckptio.load("s3://bucket/model.pt")
  ckptio (safetensors)      ckptio.load("s3://bucket/model.safetensors")
  boto3 + torch.load        boto3 download_file to a local file, then torch.load of it
  Run:ai streamer           runai_model_streamer's SafetensorsStreamer on the s3:// URL
  store raw limit           parallel ranged GETs (botocore, 8 MiB) into one preallocated
                            buffer: what the store can serve, no parsing
  ckptio cache fill         ckptio.load(url, cache_dir=<empty directory>): the object
                            streamed into the local cache, then loaded from there
  ckptio cache hit          ckptio.load(url, cache_dir=<warm directory>): one 1-byte GET
                            validates the entry, then a local load of it
  ckptio local file         ckptio.load of the same bytes in a local file (the cache hit's
                            yardstick: the file and the entry are both in the page cache)

Every loader's result is checked against a digest of the state dict (the raw read against
the object's bytes). Times are the median of ``--rounds`` fresh processes; throughput is
the file's bytes over that time, and each row's ratio is against the raw limit (the cache
hit's is also given against the local file).

Usage::

    python bench/bench_remote.py --quick          # a smoke run (~30 MB)
    python bench/bench_remote.py --rounds 3       # the 710 MB workload
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

BUCKET = "bench-remote"
CHILD_ENV = "CKPTIO_BENCH_REMOTE_CHILD"


def _state_dict(quick: bool) -> dict[str, Any]:
    from ckptio.benchmark.workloads import gpt2_medium_state_dict

    kw = {"n_layer": 2, "vocab": 8192} if quick else {}
    sd = gpt2_medium_state_dict(**kw)
    sd.pop("lm_head.weight", None)  # tied to the embedding: safetensors refuses shared tensors
    return dict(sd)


def _digest(tensors: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the loaders
def _ckptio(url: str, options: dict[str, Any]) -> dict[str, Any]:
    import ckptio

    return ckptio.load(url, storage_options=options)


def _ckptio_cached(url: str, options: dict[str, Any]) -> dict[str, Any]:
    import ckptio

    options = dict(options)
    cache_dir = options.pop("cache_dir")
    return ckptio.load(url, storage_options=options, cache_dir=cache_dir)


def _ckptio_local(path: str, options: dict[str, Any]) -> dict[str, Any]:
    import ckptio

    return ckptio.load(path)


def _boto3_torch(url: str, options: dict[str, Any]) -> dict[str, Any]:
    import boto3
    import torch

    bucket, key = url[len("s3://") :].split("/", 1)
    client = boto3.client("s3", endpoint_url=options["endpoint_url"])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.pt")
        client.download_file(bucket, key, path)
        return torch.load(path, weights_only=True)


def _runai(url: str, options: dict[str, Any]) -> dict[str, Any]:
    from runai_model_streamer import SafetensorsStreamer

    with SafetensorsStreamer() as s:
        s.stream_file(url, device="cpu")
        return {k: t.clone() for k, t in s.get_tensors()}


def _raw(url: str, options: dict[str, Any]) -> bytes:
    import concurrent.futures as cf

    import botocore.config
    import botocore.session

    bucket, key = url[len("s3://") :].split("/", 1)
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=options["endpoint_url"],
        config=botocore.config.Config(max_pool_connections=16),
    )
    size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    out = bytearray(size)
    chunk = 8 << 20

    def get(offset: int) -> None:
        n = min(chunk, size - offset)
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + n - 1}")
        view = memoryview(out)[offset : offset + n]
        got = 0
        while got < n:
            k = body["Body"].readinto(view[got:])
            if not k:
                raise OSError(f"short body at {offset + got}")
            got += k

    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(get, range(0, size, chunk)))
    return bytes(out)


LOADERS: dict[str, Callable[[str, dict[str, Any]], Any]] = {
    "ckptio (torch zip)": _ckptio,
    "ckptio (safetensors)": _ckptio,
    "boto3 download_file + torch.load": _boto3_torch,
    "Run:ai streamer (s3)": _runai,
    "store raw limit (ranged GETs)": _raw,
    "ckptio cache fill (torch zip)": _ckptio_cached,
    "ckptio cache hit (torch zip)": _ckptio_cached,
    "ckptio local file (torch zip)": _ckptio_local,
}


def _child() -> None:
    """Runs one loader (in a fresh process) and prints its time and result digest."""
    spec = json.loads(os.environ[CHILD_ENV])
    loader = LOADERS[spec["loader"]]
    # Imports are not the load: every loader starts with torch, ckptio and the AWS clients
    # imported (each still makes its own client inside the timed part).
    import botocore.session  # noqa: F401
    import torch  # noqa: F401

    import ckptio  # noqa: F401

    start = time.perf_counter()
    result = loader(spec["url"], spec["options"])
    elapsed = time.perf_counter() - start
    if isinstance(result, bytes):
        digest = hashlib.sha256(result).hexdigest()
    else:
        digest = _digest(result)
    print(json.dumps({"seconds": elapsed, "digest": digest}))


def _run_child(loader: str, url: str, options: dict[str, Any], env: dict[str, str]) -> dict:
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
        return {"error": tail[:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small state dict (~30 MB)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per loader")
    parser.add_argument("--endpoint", help="an S3-compatible endpoint (default: moto on loopback)")
    args = parser.parse_args()

    from safetensors import torch as safetensors_torch

    import ckptio

    server = None
    scratch = tempfile.TemporaryDirectory(prefix="bench-remote-")
    endpoint = args.endpoint
    if endpoint is None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        # the Run:ai streamer's S3 client: path-style requests to the endpoint above
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "AWS_CA_BUNDLE": os.environ.get("AWS_CA_BUNDLE", ""),
    }
    os.environ.update(env)
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        sd = _state_dict(args.quick)
        expected = _digest(sd)
        buf = io.BytesIO()
        ckptio.save(sd, buf)
        torch_bytes = buf.getvalue()
        safe_bytes = safetensors_torch.save(sd)
        client.put_object(Bucket=BUCKET, Key="model.pt", Body=torch_bytes)
        client.put_object(Bucket=BUCKET, Key="model.safetensors", Body=safe_bytes)
        del sd, buf
        local_path = os.path.join(scratch.name, "model.pt")
        with open(local_path, "wb") as fh:
            fh.write(torch_bytes)
        pt_url, st_url = f"s3://{BUCKET}/model.pt", f"s3://{BUCKET}/model.safetensors"
        raw_digest = hashlib.sha256(torch_bytes).hexdigest()
        cases = [
            ("store raw limit (ranged GETs)", pt_url, raw_digest, len(torch_bytes)),
            ("ckptio (torch zip)", pt_url, expected, len(torch_bytes)),
            ("ckptio (safetensors)", st_url, expected, len(safe_bytes)),
            ("boto3 download_file + torch.load", pt_url, expected, len(torch_bytes)),
            ("Run:ai streamer (s3)", st_url, expected, len(safe_bytes)),
            ("ckptio cache fill (torch zip)", pt_url, expected, len(torch_bytes)),
            ("ckptio local file (torch zip)", local_path, expected, len(torch_bytes)),
            ("ckptio cache hit (torch zip)", pt_url, expected, len(torch_bytes)),
        ]
        options = {"endpoint_url": endpoint}
        warm_cache = os.path.join(scratch.name, "warm-cache")
        out = _run_child(  # fills the warm cache (not timed)
            "ckptio cache fill (torch zip)", pt_url, {**options, "cache_dir": warm_cache}, env
        )
        if out.get("digest") != expected:
            print(f"  filling the cache failed: {out.get('error', 'wrong result')}")
        print(
            f"store: {'moto on loopback' if server else endpoint}; file: "
            f"{len(torch_bytes) / 1e6:.0f} MB (torch zip), {len(safe_bytes) / 1e6:.0f} MB "
            f"(safetensors); median of {args.rounds} fresh processes"
        )
        raw_rate = None
        local_time = None
        for name, url, want, nbytes in cases:
            times, error = [], None
            for i in range(args.rounds):
                child_options: dict[str, Any] = options
                if "cache fill" in name:  # an empty cache each time
                    child_options = {**options, "cache_dir": os.path.join(scratch.name, f"c{i}")}
                elif "cache hit" in name:
                    child_options = {**options, "cache_dir": warm_cache}
                out = _run_child(name, url, child_options, env)
                if "error" in out:
                    error = out["error"]
                    break
                if out["digest"] != want:
                    error = "WRONG RESULT (digest mismatch)"
                    break
                times.append(out["seconds"])
            if error is not None:
                print(f"  {name:34s} failed: {error}")
                continue
            t = statistics.median(times)
            rate = nbytes / t / 1e6
            raw_rate = raw_rate or rate
            line = f"  {name:34s} {t:7.3f} s  {rate:7.1f} MB/s  {rate / raw_rate:5.2f}x raw"
            if "local file" in name:
                local_time = t
            elif "cache hit" in name and local_time:
                line += f"  {t / local_time:5.2f}x the local file's time"
            print(line)
    finally:
        if server is not None:
            server.stop()
        scratch.cleanup()


if __name__ == "__main__":
    if CHILD_ENV in os.environ:
        _child()
    else:
        main()
