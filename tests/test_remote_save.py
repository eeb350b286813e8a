"""Saving to object storage (docs/remote.md, "Saving"): ``ckptio.save`` and ``async_save`` to
``s3://`` URLs, against moto's standalone S3 server on loopback (tests/_remote_servers.py),
with the fault proxy in front of it for the failure tests.

The oracles: the bytes of a local ``ckptio.save`` to a file of the same name (the upload must
store exactly those), stock ``torch.load`` / ``safetensors.torch`` of the stored bytes, and
the store itself (``get_object``, ``list_multipart_uploads``) for what a failure leaves.
"""

from __future__ import annotations

import errno
import io
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors import torch as safetensors_torch

import ckptio
from _remote_servers import FaultProxy, MotoS3, aws_environment
from ckptio import _safetensors, settings
from ckptio._remote import _upload

from conftest import torch_can_save

pytest.importorskip("moto", reason="moto[server] and boto3 are in requirements-dev.txt")

BUCKET = "ckpt-save-bucket"
#: Parts of 64 KiB (S3 needs 5 MiB; moto's limit is lowered to match): multi-part objects of
#: a few hundred KiB keep the tests fast.
PART = 64 << 10
#: fast retries for the fault tests
FAST = {"retries": 4, "retry_backoff": 0.001}


# ------------------------------------------------------------------------------- servers
@pytest.fixture()
def s3(moto: MotoS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    """moto, configured as a user would (keys and endpoint in the environment), with parts
    of PART bytes allowed (by moto and by the remote_part_bytes setting) and in force."""
    aws_environment(monkeypatch, moto.endpoint)
    from moto.s3 import models as moto_models

    monkeypatch.setattr(moto_models, "S3_UPLOAD_PART_MIN_SIZE", PART)
    monkeypatch.setattr(settings, "MIN_REMOTE_PART_BYTES", PART)
    with ckptio.options(remote_part_bytes=PART, chunk_bytes=PART):
        yield moto


@pytest.fixture()
def proxy(s3: MotoS3) -> Iterator[FaultProxy]:
    p = FaultProxy(s3.endpoint.removeprefix("http://"))
    try:
        yield p
    finally:
        p.close()


@pytest.fixture()
def writers(monkeypatch: pytest.MonkeyPatch) -> list[_upload.PartWriter]:
    """The PartWriters the saves make (their ``requests`` and ``peak_inflight``)."""
    made: list[_upload.PartWriter] = []

    class Recorded(_upload.PartWriter):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(_upload, "PartWriter", Recorded)
    return made


def _stored(s3: MotoS3, key: str) -> tuple[bytes, str]:
    reply = s3.client.get_object(Bucket=BUCKET, Key=key)
    return reply["Body"].read(), reply["ETag"]


def _parts_of(etag: str) -> int:
    """Parts of a stored object: a multipart upload's ETag ends with -<parts>."""
    tail = etag.strip('"').rpartition("-")[2]
    return int(tail) if "-" in etag else 1


def _uploads(s3: MotoS3) -> list[Any]:
    return list(s3.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))


def _local_bytes(tmp_path: Path, name: str, obj: Any, **kwargs: Any) -> bytes:
    """What ckptio.save writes to a local file of the same name (the archive is named after
    the file)."""
    path = tmp_path / name
    ckptio.save(obj, path, **kwargs)
    return path.read_bytes()


def _state_dict(seed: int = 0, rows: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(rows, 1024, generator=g),
        "layer.0.weight": torch.randn(128, 64, generator=g).to(torch.float16),
        "layer.0.bias": torch.randn(128, generator=g),
        "layer.1.weight": torch.randint(-100, 100, (64, 128), generator=g, dtype=torch.int8),
        "step": torch.tensor(7),
        "empty": torch.empty(0, 3),
    }


def _same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride())
        assert torch.equal(_bits(a), _bits(b))
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            _same(a[k], b[k])
    else:
        assert a == b


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (bitwise equality, NaNs and float4/float8 included)."""
    return t.contiguous().view(-1).view(torch.uint8)


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("rows", [1, 200], ids=["one-put", "multipart"])
def test_torch_round_trip(
    s3: MotoS3, tmp_path: Path, writers: list[_upload.PartWriter], rows: int
) -> None:
    obj = {"model": _state_dict(rows=rows), "epoch": 3, "lr": [0.1, 0.01]}
    url = f"s3://{BUCKET}/rt-{rows}.pt"
    ckptio.save(obj, url)
    data, etag = _stored(s3, f"rt-{rows}.pt")
    assert data == _local_bytes(tmp_path, f"rt-{rows}.pt", obj)
    _same(torch.load(io.BytesIO(data)), obj)
    _same(ckptio.load(url), obj)
    (writer,) = writers
    if rows == 1:  # under one part: one PutObject
        assert len(data) < PART and writer.requests == ["put"] and _parts_of(etag) == 1
    else:
        parts = -(-len(data) // PART)
        assert parts > 3 and _parts_of(etag) == parts
        assert writer.requests == ["create"] + ["part"] * parts + ["complete"]
    assert _uploads(s3) == []


@pytest.mark.parametrize("rows", [1, 200], ids=["one-put", "multipart"])
def test_safetensors_round_trip(s3: MotoS3, tmp_path: Path, rows: int) -> None:
    sd = _state_dict(1, rows=rows)
    del sd["empty"]  # kept below in the dtype test; safetensors' own writer takes it too
    url = f"s3://{BUCKET}/rt-{rows}.safetensors"
    ckptio.save(sd, url, format="safetensors", metadata={"format": "pt"})
    data, etag = _stored(s3, f"rt-{rows}.safetensors")
    assert data == safetensors_torch.save(sd, metadata={"format": "pt"})
    assert data == _local_bytes(
        tmp_path, "x.safetensors", sd, format="safetensors", metadata={"format": "pt"}
    )
    _same(safetensors_torch.load(data), sd)
    _same(ckptio.load(url), sd)
    assert (_parts_of(etag) > 1) == (rows == 200)


def _every_dtype() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, (name, dtype) in enumerate(sorted(_safetensors.DTYPES.items())):
        if not torch_can_save(dtype):
            continue
        g = torch.Generator().manual_seed(i)
        wide = torch.randint(0, 256, (7, 3), generator=g, dtype=torch.uint8)
        out[f"w.{name}"] = wide.view(dtype) if dtype.itemsize == 1 else _of(dtype, (7, 3), g)
        if dtype.itemsize > 1 or dtype in (torch.int8, torch.uint8, torch.bool):
            out[f"s.{name}"] = _of(dtype, (), g)  # 0-d
        out[f"e.{name}"] = torch.empty(0, 4, dtype=dtype)
    return out


def _of(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        wide = torch.complex64 if dtype.is_complex else torch.float32
        return (torch.randn(shape, generator=g, dtype=wide) * 8).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_every_dtype_empty_and_0d(s3: MotoS3, tmp_path: Path, fmt: str) -> None:
    sd = _every_dtype()
    name = f"dtypes.{'pt' if fmt == 'torch' else 'safetensors'}"
    ckptio.save(sd, f"s3://{BUCKET}/{name}", format=fmt)
    data, _ = _stored(s3, name)
    assert data == _local_bytes(tmp_path, name, sd, format=fmt)
    _same(ckptio.load(f"s3://{BUCKET}/{name}"), sd)
    if fmt == "torch":
        _same(torch.load(io.BytesIO(data)), sd)


def test_staged_storages(s3: MotoS3, tmp_path: Path, cpu_ring: list[Any]) -> None:
    """Storages of a staged device (CUDA on a GPU host; here the CPU stands in) go through
    the writer's device path into the upload."""
    sd = _state_dict(2, rows=100)
    ckptio.save(sd, f"s3://{BUCKET}/staged.pt")
    ckptio.save(sd, f"s3://{BUCKET}/staged.safetensors", format="safetensors")
    assert _stored(s3, "staged.pt")[0] == _local_bytes(tmp_path, "staged.pt", sd)
    st = _stored(s3, "staged.safetensors")[0]
    assert st == _local_bytes(tmp_path, "staged.safetensors", sd, format="safetensors")
    assert cpu_ring


def test_legacy_format(s3: MotoS3) -> None:
    obj = {"w": torch.randn(4, 5), "n": 3}
    ckptio.save(obj, f"s3://{BUCKET}/legacy.pt", _use_new_zipfile_serialization=False)
    data, _ = _stored(s3, "legacy.pt")
    _same(torch.load(io.BytesIO(data)), obj)
    _same(ckptio.load(f"s3://{BUCKET}/legacy.pt"), obj)


def test_overwrite_and_storage_options(s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Explicit storage_options instead of the environment; a second save replaces the
    object."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    options = {
        "endpoint_url": s3.endpoint,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "region_name": "us-east-1",
    }
    url = f"s3://{BUCKET}/options.pt"
    for seed in (3, 4):
        ckptio.save(_state_dict(seed), url, storage_options=options)
        _same(ckptio.load(url, storage_options=options), _state_dict(seed))


def test_part_size_grows() -> None:
    base = 8 << 20
    assert _upload.part_size(1, base) == _upload.part_size(1000, base) == base
    assert _upload.part_size(1001, base) == 2 * base
    assert _upload.part_size(2001, base) == 4 * base
    assert _upload.part_size(10_000, base) == 512 * base  # 4 GiB: under S3's 5 GiB
    assert _upload.part_size(10_000, 64 << 20) == 5 << 30
    total = sum(_upload.part_size(n, base) for n in range(1, _upload.MAX_PARTS + 1))
    assert total > 5 << 40  # S3's largest object fits


def test_growing_parts_upload(
    s3: MotoS3, monkeypatch: pytest.MonkeyPatch, writers: list[_upload.PartWriter]
) -> None:
    """Parts of growing sizes (the size doubling every 2 parts here) make a valid object."""
    monkeypatch.setattr(_upload, "PARTS_PER_SIZE", 2)
    sd = _state_dict(5, rows=250)  # ~1.05 MB: parts of 64, 64, 128, 128, 256, 256... KiB
    ckptio.save(sd, f"s3://{BUCKET}/growing.pt")
    data, etag = _stored(s3, "growing.pt")
    _same(torch.load(io.BytesIO(data)), sd)
    sizes = [PART, PART, 2 * PART, 2 * PART, 4 * PART, 4 * PART, 8 * PART]
    parts = next(n for n in range(1, 8) if sum(sizes[:n]) >= len(data))
    assert parts >= 6 and _parts_of(etag) == writers[0].requests.count("part") == parts


def test_inflight_bound(s3: MotoS3, writers: list[_upload.PartWriter]) -> None:
    """Parts being sent never hold more than remote_inflight_bytes."""
    with ckptio.options(remote_inflight_bytes=2 * PART):
        sd = _state_dict(6, rows=300)
        ckptio.save(sd, f"s3://{BUCKET}/bounded.pt")
    _same(ckptio.load(f"s3://{BUCKET}/bounded.pt"), sd)
    assert 0 < writers[0].peak_inflight <= 2 * PART


# ---------------------------------------------------------------------- failure semantics
class Unpicklable:
    def __reduce__(self) -> Any:
        raise RuntimeError("cannot pickle this")


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_failed_pickling_keeps_previous_object(s3: MotoS3, fmt: str) -> None:
    key = f"keep.{fmt}"
    previous = b"previous bytes"
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=previous)
    sd: dict[str, Any] = _state_dict(7, rows=200)
    if fmt == "torch":
        sd["zzz"] = Unpicklable()  # after the tensors
        with pytest.raises(RuntimeError, match="cannot pickle this"):
            ckptio.save(sd, f"s3://{BUCKET}/{key}")
    else:
        sd["zzz"] = [1]  # not a tensor
        with pytest.raises((TypeError, ValueError)):
            ckptio.save(sd, f"s3://{BUCKET}/{key}", format="safetensors")
    assert _stored(s3, key)[0] == previous
    assert _uploads(s3) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_failure_mid_upload_aborts(
    s3: MotoS3,
    monkeypatch: pytest.MonkeyPatch,
    writers: list[_upload.PartWriter],
    fmt: str,
    error: type,
) -> None:
    """The writer fails after several parts went out: the upload is aborted, nothing is left
    in the bucket, the previous object is intact, and the error is the writer's."""
    from ckptio import _writer

    key = f"mid.{fmt}"
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=b"previous")
    written = [0]
    write_all = _writer.write_all

    def failing(target: Any, data: Any) -> None:
        if written[0] >= 5 * PART:
            raise error("interrupted")
        written[0] += memoryview(data).nbytes
        write_all(target, data)

    monkeypatch.setattr(_writer, "write_all", failing)
    with pytest.raises(error, match="interrupted"):
        ckptio.save(_state_dict(8, rows=300), f"s3://{BUCKET}/{key}", format=fmt)
    (writer,) = writers
    assert writer.requests[0] == "create" and writer.requests.count("part") >= 3
    assert writer.requests[-1] == "abort"
    assert _stored(s3, key)[0] == b"previous"
    assert _uploads(s3) == []


def _is_part(method: str, path: str, headers: dict) -> bool:
    return method == "PUT" and "partNumber=" in path


@pytest.mark.parametrize("status", ["503", "500"])
def test_part_faults_are_retried(
    s3: MotoS3, proxy: FaultProxy, tmp_path: Path, status: str
) -> None:
    proxy.inject(status, times=3, match=_is_part)
    sd = _state_dict(9, rows=200)
    ckptio.save(
        sd, f"s3://{BUCKET}/retried.pt", storage_options={**FAST, "endpoint_url": proxy.url}
    )
    assert _stored(s3, "retried.pt")[0] == _local_bytes(tmp_path, "retried.pt", sd)
    assert sum(1 for e in proxy.log if e.status == int(status)) == 3
    assert _uploads(s3) == []


def test_dropped_connections_are_retried(s3: MotoS3, proxy: FaultProxy, tmp_path: Path) -> None:
    """A connection reset before any answer (to an UploadPart and to the
    CompleteMultipartUpload): retried, the object exact."""
    proxy.inject("drop", times=2, match=_is_part)
    proxy.inject("drop", times=1, match=lambda m, p, h: m == "POST" and "uploadId=" in p)
    sd = _state_dict(12, rows=200)
    ckptio.save(
        sd, f"s3://{BUCKET}/dropped.pt", storage_options={**FAST, "endpoint_url": proxy.url}
    )
    assert _stored(s3, "dropped.pt")[0] == _local_bytes(tmp_path, "dropped.pt", sd)
    assert sum(1 for e in proxy.log if e.status == 0) == 3
    assert _uploads(s3) == []


def test_failed_abort_is_noted(s3: MotoS3, proxy: FaultProxy) -> None:
    """The abort fails too: the first error is raised, with a note naming the upload left
    behind."""
    proxy.inject("503", times=1000, match=_is_part)
    proxy.inject("503", times=1000, match=lambda m, p, h: m == "DELETE")
    url = f"s3://{BUCKET}/abort-fails.pt"
    try:
        with pytest.raises(OSError) as info:
            ckptio.save(
                _state_dict(rows=200), url, storage_options={**FAST, "endpoint_url": proxy.url}
            )
        assert info.value.filename == url and "part " in info.value.strerror
        (note,) = info.value.__notes__
        (upload,) = _uploads(s3)
        assert upload["UploadId"] in note and "could not be aborted" in note
    finally:
        for upload in _uploads(s3):
            s3.client.abort_multipart_upload(
                Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"]
            )


def test_small_object_faults_are_retried(s3: MotoS3, proxy: FaultProxy) -> None:
    proxy.inject("503", times=2, match=lambda m, p, h: m == "PUT")
    sd = {"a": torch.arange(10.0)}
    ckptio.save(sd, f"s3://{BUCKET}/small.pt", storage_options={**FAST, "endpoint_url": proxy.url})
    _same(ckptio.load(f"s3://{BUCKET}/small.pt"), sd)


@pytest.mark.parametrize("where", ["part", "complete", "put"])
def test_persistent_fault_aborts_and_names_url(
    s3: MotoS3, proxy: FaultProxy, writers: list[_upload.PartWriter], where: str
) -> None:
    key = f"failing-{where}.pt"
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=b"previous")
    if where == "part":  # the third part fails for good; the others went through
        proxy.inject(
            "503",
            times=1000,
            match=lambda m, p, h: m == "PUT" and re.search(r"[?&]partNumber=3(&|$)", p) is not None,
        )
    elif where == "complete":
        proxy.inject("503", times=1000, match=lambda m, p, h: m == "POST" and "uploadId=" in p)
    else:
        proxy.inject("500", times=1000, match=lambda m, p, h: m == "PUT")
    url = f"s3://{BUCKET}/{key}"
    rows = 1 if where == "put" else 200
    with pytest.raises(OSError) as info:
        ckptio.save(
            _state_dict(10, rows=rows), url, storage_options={**FAST, "endpoint_url": proxy.url}
        )
    e = info.value
    assert type(e) is OSError and e.errno == errno.EIO and e.filename == url
    assert f"after {FAST['retries']} attempts" in e.strerror and url in str(e)
    assert _stored(s3, key)[0] == b"previous"
    assert _uploads(s3) == []
    if where != "put":
        assert writers[0].requests[-1] == "abort"
        assert any(x.method == "DELETE" and x.status == 204 for x in proxy.log)


def test_forbidden(s3: MotoS3, proxy: FaultProxy) -> None:
    proxy.inject("403", times=1000, match=lambda m, p, h: m in ("PUT", "POST"))
    url = f"s3://{BUCKET}/forbidden.pt"
    for rows in (1, 200):  # PutObject; CreateMultipartUpload
        before = len(proxy.log)
        with pytest.raises(PermissionError) as info:
            ckptio.save(
                _state_dict(rows=rows), url, storage_options={**FAST, "endpoint_url": proxy.url}
            )
        assert info.value.errno == errno.EACCES and info.value.filename == url
        assert len(proxy.log) - before == 1  # not retried


@pytest.mark.parametrize("rows", [1, 200], ids=["one-put", "multipart"])
def test_missing_bucket(s3: MotoS3, rows: int) -> None:
    url = f"s3://no-such-bucket-ckptio/k{rows}.pt"
    with pytest.raises(FileNotFoundError) as info:
        ckptio.save(_state_dict(rows=rows), url)
    assert info.value.errno == errno.ENOENT and info.value.filename == url
    assert "NoSuchBucket" in str(info.value)


# ------------------------------------------------------------------------------ async_save
def test_async_save_snapshot(s3: MotoS3, tmp_path: Path) -> None:
    sd = _state_dict(11, rows=200)
    expected = _local_bytes(tmp_path, "async.pt", sd)
    future = ckptio.async_save(sd, f"s3://{BUCKET}/async.pt")
    for t in sd.values():  # the snapshot was taken: the upload keeps the old values
        t.zero_()
    assert future.result(timeout=60) is None
    assert _stored(s3, "async.pt")[0] == expected
    assert future.target == f"s3://{BUCKET}/async.pt"


def test_async_save_in_order(s3: MotoS3) -> None:
    """Saves to the same URL complete in call order: the last one stays."""
    futures = [
        ckptio.async_save(_state_dict(seed, rows=100), f"s3://{BUCKET}/order.pt")
        for seed in (1, 2, 3)
    ]
    for f in futures:
        f.result(timeout=60)
    _same(ckptio.load(f"s3://{BUCKET}/order.pt"), _state_dict(3, rows=100))


def test_async_save_error_surfaces(s3: MotoS3, proxy: FaultProxy) -> None:
    url = "s3://no-such-bucket-ckptio/async.pt"
    future = ckptio.async_save(_state_dict(rows=200), url)
    with pytest.raises(FileNotFoundError) as info:
        future.result(timeout=60)
    assert info.value.filename == url
    proxy.inject("503", times=1000, match=_is_part)
    url = f"s3://{BUCKET}/async-failing.pt"
    future = ckptio.async_save(
        _state_dict(rows=200), url, storage_options={**FAST, "endpoint_url": proxy.url}
    )
    with pytest.raises(OSError) as info2:
        future.result(timeout=60)
    assert info2.value.errno == errno.EIO and info2.value.filename == url
    assert _uploads(s3) == []


def test_async_save_legacy(s3: MotoS3) -> None:
    obj = {"w": torch.randn(3, 3)}
    url = f"s3://{BUCKET}/async-legacy.pt"
    ckptio.async_save(obj, url, _use_new_zipfile_serialization=False).result(timeout=60)
    _same(ckptio.load(url), obj)


# ----------------------------------------------------------------------------- refusals
def test_http_urls_are_refused(tmp_path: Path) -> None:
    for url in ("http://127.0.0.1:1/x.pt", "https://example.org/x.pt"):
        with pytest.raises(ValueError, match="s3:// URLs only"):
            ckptio.save({"a": torch.ones(2)}, url)
        with pytest.raises(ValueError, match="s3:// URLs only"):
            ckptio.save({"a": torch.ones(2)}, url, format="safetensors")
        with pytest.raises(ValueError, match="s3:// URLs only"):
            ckptio.async_save({"a": torch.ones(2)}, url)
    assert list(tmp_path.iterdir()) == []


def test_storage_options_validation(tmp_path: Path) -> None:
    local = tmp_path / "a.pt"
    for call in (
        lambda: ckptio.save({"a": torch.ones(2)}, local, storage_options={"anon": True}),
        lambda: ckptio.save({"a": torch.ones(2)}, local, format="safetensors", storage_options={}),
        lambda: ckptio.async_save({"a": torch.ones(2)}, str(local), storage_options={}),
        lambda: ckptio.save({"a": torch.ones(2)}, io.BytesIO(), storage_options={}),
    ):
        with pytest.raises(ValueError, match="storage_options applies to s3:// URLs"):
            call()
    assert not local.exists()
    with pytest.raises(TypeError, match="unknown storage_options nope"):
        ckptio.save({"a": torch.ones(2)}, f"s3://{BUCKET}/x.pt", storage_options={"nope": 1})
    with pytest.raises(ValueError, match="names a bucket and a key"):
        ckptio.save({"a": torch.ones(2)}, "s3://bucket-only")
    with pytest.raises(ValueError, match="not a prefix"):
        ckptio.save({"a": torch.ones(2)}, f"s3://{BUCKET}/dir/")
    with pytest.raises(NotImplementedError, match="model directory"):
        ckptio.save({"a": torch.ones(2)}, f"s3://{BUCKET}/llm", max_shard_size="1MB")


def test_part_size_setting() -> None:
    with pytest.raises(ValueError, match="remote_part_bytes"):
        ckptio.set_options(remote_part_bytes=(5 << 20) - 1)
    with pytest.raises(ValueError, match="remote_part_bytes"):
        ckptio.set_options(remote_part_bytes=(5 << 30) + 1)
    with ckptio.options(remote_part_bytes=16 << 20) as opts:
        assert opts.remote_part_bytes == 16 << 20
    assert ckptio.get_options().remote_part_bytes == 8 << 20


def test_concurrent_saves_to_different_keys(s3: MotoS3) -> None:
    """Two threads saving at once (one client, one connection pool)."""
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            with ckptio.options(remote_part_bytes=PART):
                ckptio.save(_state_dict(seed, rows=150), f"s3://{BUCKET}/thread-{seed}.pt")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (20, 21)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for seed in (20, 21):
        _same(ckptio.load(f"s3://{BUCKET}/thread-{seed}.pt"), _state_dict(seed, rows=150))
