"""Checkpoints read from object storage (docs/remote.md): ``s3://`` against moto's standalone
S3 server and ``http://`` against a Range-honouring HTTP server, both real servers on
loopback (tests/_remote_servers.py), with a fault-injecting proxy in front of them.

The oracle is stock torch / safetensors over the same bytes: ``torch.load`` of the file
uploaded, ``safetensors.torch.load``.
"""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors import torch as safetensors_torch

import ckptio
from _remote_servers import FaultProxy, Logged, MotoS3, RangeServer, aws_environment

from conftest import shift_payload

# The servers and clients come from requirements-dev.txt (make test); the compat environments
# of make test-compat (requirements-compat.txt: torch's dependencies and the tests' core set)
# have neither, and this file tests ckptio's own I/O, not torch's.
pytest.importorskip("moto", reason="moto[server] and boto3 are in requirements-dev.txt")

BUCKET = "ckpt-bucket"
#: fast retries for the fault tests (the defaults back off 0.2 s, doubled per try)
FAST = {"retries": 4, "retry_backoff": 0.001}


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(300, 64, generator=g),
        "layer.0.weight": torch.randn(128, 64, generator=g).to(torch.float16),
        "layer.0.bias": torch.randn(128, generator=g),
        "layer.1.weight": torch.randint(-100, 100, (64, 128), generator=g, dtype=torch.int8),
        "step": torch.tensor(7),
        "empty": torch.empty(0, 3),
    }


def _checkpoint(seed: int = 0) -> dict[str, Any]:
    sd = _state_dict(seed)
    view = sd["emb.weight"][10:20, 8:40]  # a view with an offset into another storage
    return {"model": sd, "view": view, "epoch": 3, "name": "run-1", "lr": [0.1, 0.01]}


def _bytes_of(obj: Any, how: str) -> bytes:
    buf = io.BytesIO()
    if how == "ckptio":
        ckptio.save(obj, buf)
    elif how == "torch":
        torch.save(obj, buf)
    else:
        return safetensors_torch.save(obj, metadata={"format": "pt"})
    return buf.getvalue()


def _same(a: Any, b: Any, ordered: bool = True) -> None:
    """Equal values, dtypes, shapes and strides, recursively (tensors compared bitwise); with
    `ordered` False, dicts in any order (safetensors' own loader sorts names)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert (a.dtype, a.shape, a.stride(), a.device) == (b.dtype, b.shape, b.stride(), b.device)
        if a.device.type != "meta":
            assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
        for k in a:
            _same(a[k], b[k], ordered)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------------------- servers
@pytest.fixture()
def s3_env(moto: MotoS3, monkeypatch: pytest.MonkeyPatch) -> MotoS3:
    """The AWS configuration a user would set: keys and the endpoint in the environment."""
    aws_environment(monkeypatch, moto.endpoint)
    return moto


class Store:
    """One object store under test: puts bytes, gives their URL."""

    def __init__(self, kind: str, moto: MotoS3 | None, http: RangeServer | None) -> None:
        self.kind = kind
        self._moto = moto
        self._http = http

    def put(self, name: str, data: bytes) -> str:
        if self._moto is not None:
            self._moto.client.put_object(Bucket=BUCKET, Key=name, Body=data)
            return f"s3://{BUCKET}/{name}"
        assert self._http is not None
        self._http.objects["/" + name] = data
        return f"{self._http.url}/{name}"


@pytest.fixture(params=["s3", "http"])
def store(request: pytest.FixtureRequest, http_server: RangeServer) -> Store:
    if request.param == "s3":
        return Store("s3", request.getfixturevalue("s3_env"), None)
    return Store("http", None, http_server)


# ----------------------------------------------------------------------------------- load
@pytest.mark.parametrize("writer", ["ckptio", "torch"])
def test_load_torch_zip_eager(store: Store, writer: str) -> None:
    obj = _checkpoint()
    data = _bytes_of(obj, writer)
    url = store.put(f"load-{writer}.pt", data)
    got = ckptio.load(url)
    _same(got, torch.load(io.BytesIO(data)))
    # the view still shares its storage with the tensor it views, as in torch
    assert got["view"].untyped_storage().data_ptr() == got["model"]["emb.weight"].data_ptr()


def test_load_safetensors_eager(store: Store) -> None:
    sd = {k: v for k, v in _state_dict(1).items()}
    data = _bytes_of(sd, "safetensors")
    url = store.put("model.safetensors", data)
    _same(ckptio.load(url), safetensors_torch.load(data), ordered=False)
    with ckptio.open(url) as h:
        assert h.metadata == {"format": "pt"}


@pytest.mark.parametrize("fmt", ["ckptio", "safetensors"])
def test_load_meta_reads_no_data(store: Store, http_server: RangeServer, fmt: str) -> None:
    sd = {f"w{i}": torch.randn(256, 1024) for i in range(4)}  # 4 MiB
    data = _bytes_of(sd, fmt)
    url = store.put(f"meta.{fmt}", data)
    got = ckptio.load(url, map_location="meta", storage_options={"probe_bytes": 65536})
    _same(got, {k: v.to("meta") for k, v in sd.items()})
    if store.kind == "http":  # header and container only: far less than the 4 MiB
        last = [e for e in http_server.log if e.path == "/meta." + fmt]
        assert sum(e.sent for e in last) < 300_000


@pytest.mark.parametrize("fmt", ["ckptio", "torch", "safetensors"])
def test_load_staged_device(store: Store, staged_cpu: list[Any], fmt: str) -> None:
    """map_location to a staged device: storages stream from the GETs through the ring."""
    sd = {f"w{i}": torch.randn(128, 512 + i) for i in range(5)}
    data = _bytes_of(sd, fmt)
    url = store.put(f"staged.{fmt}", data)
    with ckptio.options(staging_buffer_bytes=1 << 18, staging_buffers=2):
        got = ckptio.load(url, map_location="cpu")
    _same(got, sd, ordered=fmt != "safetensors")
    assert len(staged_cpu) == 1 and staged_cpu[0].allocated > 0


def test_mmap_is_refused(http_server: RangeServer) -> None:
    url = f"{http_server.url}/whatever.pt"
    with pytest.raises(ValueError, match="mmap=True needs a local file.*cache_dir="):
        ckptio.load(url, mmap=True)


def test_storage_options_need_a_url(tmp_path: Path) -> None:
    ckptio.save({"a": torch.ones(2)}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="storage_options applies to"):
        ckptio.load(str(tmp_path / "a.pt"), storage_options={"anon": True})


def test_unknown_storage_option(http_server: RangeServer) -> None:
    http_server.objects["/x.pt"] = _bytes_of({"a": torch.ones(2)}, "ckptio")
    with pytest.raises(TypeError, match="unknown storage_options nope"):
        ckptio.load(f"{http_server.url}/x.pt", storage_options={"nope": 1})


def test_import_does_not_load_client_libraries() -> None:
    code = (
        "import sys, ckptio; "
        "print([m for m in sys.modules if m.split('.')[0] in ('botocore', 'boto3', 'urllib3')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------ predicted local headers
def _big_storages() -> dict[str, torch.Tensor]:
    """Storages 2.4 MB apart: their local headers lie farther apart than one GET of the
    container round spans, so fetching them would take GETs of their own."""
    g = torch.Generator().manual_seed(3)
    return {f"w{i}": torch.randn(600_000, generator=g) for i in range(6)}


@pytest.mark.parametrize("how", ["ckptio", "torch"])
def test_eager_load_fetches_no_local_header_on_its_own(http_server: RangeServer, how: str) -> None:
    """A torch archive laid out as torch's and ckptio's writers lay one out: the storages'
    local headers are predicted, and each comes with its payload's GET (and is checked
    there), so after the two opening GETs every GET carries payload."""
    sd = _big_storages()
    data = _bytes_of(sd, how)
    http_server.objects["/predicted.pt"] = data
    since = len(http_server.log)
    _same(ckptio.load(f"{http_server.url}/predicted.pt"), sd)
    gets = _data_gets(http_server, "/predicted.pt", since)
    assert len(gets) > 2 and all(e.sent >= 1 << 20 for e in gets[2:]), [e.range for e in gets]
    assert sum(e.sent for e in gets) <= len(data) + (2 << 20)


def test_a_wrong_prediction_is_caught_and_the_archive_read_again(
    http_server: RangeServer,
) -> None:
    """An archive whose headers all lie where the writer puts them, but one storage's local
    header is not the writer's (a shorter extra field, the payload moved): the prediction
    is caught by its check, and the load is done again with the headers fetched. Same
    tensors as torch.load of the same bytes."""
    sd = _big_storages()
    data = shift_payload(_bytes_of(sd, "ckptio"), "archive/data/2", 64)
    _same(torch.load(io.BytesIO(data), weights_only=True), sd)  # the oracle: a valid file
    http_server.objects["/mispredicted.pt"] = data
    since = len(http_server.log)
    _same(ckptio.load(f"{http_server.url}/mispredicted.pt"), sd)
    gets = _data_gets(http_server, "/mispredicted.pt", since)
    assert any(e.sent < 1 << 10 for e in gets[2:])  # the headers, fetched the second time


def test_a_local_header_naming_another_record_is_refused_when_predicted(
    http_server: RangeServer, tmp_path: Path
) -> None:
    """A storage's local header that names another record fails the prediction's check,
    then the zip reader's, as a local file's does: CheckpointError, no result."""
    data = bytearray(_bytes_of(_big_storages(), "ckptio"))
    h = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("archive/data/4").header_offset
    data[h + 30 + len("archive/data/")] ^= 0x01  # "4" -> "5"
    (tmp_path / "bad.pt").write_bytes(data)
    with pytest.raises(ckptio.CheckpointError, match="names a different record"):
        ckptio.load(tmp_path / "bad.pt")
    http_server.objects["/bad.pt"] = bytes(data)
    with pytest.raises(ckptio.CheckpointError, match="names a different record"):
        ckptio.load(f"{http_server.url}/bad.pt")


def test_a_directory_of_torch_shards_fetches_no_local_header_on_its_own(
    http_server: RangeServer, tmp_path: Path
) -> None:
    """A remote directory's zip shards are predicted as a lone archive is: after each
    shard's two opening GETs, every GET carries payload."""
    sd = _big_storages()
    d = tmp_path / "dir"
    ckptio.save(sd, d, max_shard_size=8_000_000, format="torch")
    shards = sorted(p.name for p in d.glob("*.bin"))
    assert len(shards) == 2
    for p in d.iterdir():
        http_server.objects[f"/rdir/{p.name}"] = p.read_bytes()
    since = len(http_server.log)
    _same(ckptio.load(f"{http_server.url}/rdir/pytorch_model.bin.index.json"), sd)
    for shard in shards:
        gets = _data_gets(http_server, f"/rdir/{shard}", since)
        assert len(gets) > 2 and all(e.sent >= 1 << 20 for e in gets[2:]), [e.range for e in gets]


@pytest.mark.parametrize("how", ["ckptio", "torch"])
def test_the_locator_reads_a_local_header_as_the_zip_reader_does(how: str) -> None:
    """_zip.data_offset (the remote locator's reading of a local header) gives every record's
    payload offset as the C++ zip reader finds it, for ckptio's and torch's writers; bytes
    that are not a local header, or too few of them, give None."""
    from ckptio import _core
    from ckptio._remote import _zip

    data = _bytes_of(_checkpoint(), how)
    prefix, records = _core.zip.read_zip_directory(_core.io.BufferSource(data, "f"), 1)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
    assert len(infos) == len(records)
    for info in infos:
        h = info.header_offset
        assert _zip.data_offset(data[h : h + 30], h) == records[info.filename[len(prefix) :]][0]
        assert _zip.data_offset(memoryview(data)[h : h + 29], h) is None  # too short
    assert _zip.data_offset(b"PK\x01\x02" + bytes(26), 0) is None  # a central header


# ----------------------------------------------------------------------------------- open
def _data_gets(server: RangeServer | FaultProxy, path: str, since: int) -> list[Any]:
    return [e for e in server.log[since:] if e.path == path and e.method == "GET"]


def test_open_get_slice_reads_only_its_bytes(http_server: RangeServer) -> None:
    """open reads the header once, then each read only the ranges it needs (bytes counted
    at the server)."""
    sd = {"big": torch.randn(1024, 1024), "small": torch.randn(16)}  # 4 MiB + 64 B
    for fmt in ("ckptio", "safetensors"):
        path = f"/slice.{fmt}"
        http_server.objects[path] = data = _bytes_of(sd, fmt)
        url = http_server.url + path
        before = len(http_server.log)
        with ckptio.open(url, storage_options={"probe_bytes": 65536}) as h:
            opened = sum(e.sent for e in _data_gets(http_server, path, before))
            assert opened < 200_000, opened  # two probes and the container
            at = len(http_server.log)
            rows = h.get_slice("big")[10:20]
            assert torch.equal(rows, sd["big"][10:20])
            gets = _data_gets(http_server, path, at)
            assert sum(e.sent for e in gets) == 10 * 1024 * 4 and len(gets) == 1
            at = len(http_server.log)
            assert torch.equal(h["small"], sd["small"])
            # 64 bytes, or none when they lie in a probed end (served from the cache)
            assert sum(e.sent for e in _data_gets(http_server, path, at)) in (0, 64)
            cols = h.get_slice("big")[:, 3:5]
            assert torch.equal(cols, sd["big"][:, 3:5])
            assert torch.equal(h["big"], sd["big"])
            assert sorted(h.keys()) == sorted(sd)
        assert len(data) > 4 << 20


def test_eager_load_merges_small_and_large_reads(http_server: RangeServer) -> None:
    """Small tensors between large ones are read in the same plan as their neighbours: the
    GETs of an eager load are about the object's size over chunk_bytes, not one per small
    tensor (each GET costs a round trip and a request's CPU)."""
    sd = {}
    for i in range(24):
        sd[f"l{i:02d}.a"] = torch.randn(320, 1024)  # 1.25 MiB: a storage of its own
        sd[f"l{i:02d}.b"] = torch.randn(64)  # 256 B, next to it in the file
    data = _bytes_of(sd, "safetensors")
    http_server.objects["/merge.safetensors"] = data
    before = len(http_server.log)
    with ckptio.options(chunk_bytes=4 << 20):
        out = ckptio.load(f"{http_server.url}/merge.safetensors")
    _same(out, sd, ordered=False)
    gets = _data_gets(http_server, "/merge.safetensors", before)
    assert len(gets) <= 2 + -(-len(data) // (4 << 20)) + 1, [g.range for g in gets]


def test_open_s3_torch_file(store: Store) -> None:
    obj = _checkpoint(2)
    data = _bytes_of(obj, "torch")
    url = store.put("open-torch.pt", data)
    with ckptio.open(url) as h:
        assert h.non_tensors["epoch"] == 3
        _same(h["model.layer.0.weight"], obj["model"]["layer.0.weight"])
        _same(h.get_slice("model.emb.weight")[5:9], obj["model"]["emb.weight"][5:9])


@pytest.mark.parametrize("fmt", ["ckptio", "torch", "safetensors"])
def test_open_staged_device(store: Store, staged_cpu: list[Any], fmt: str) -> None:
    sd = {f"w{i}": torch.randn(64, 256 + i) for i in range(3)}
    url = store.put(f"open-staged.{fmt}", _bytes_of(sd, fmt))
    with ckptio.open(url, map_location="cpu") as h:
        _same(h.get_tensors(), sd, ordered=False)
        assert torch.equal(h.get_slice("w1")[2:7], sd["w1"][2:7])
    assert staged_cpu and staged_cpu[0].allocated > 0


# ------------------------------------------------------------------------------ load_into
@pytest.mark.parametrize("fmt", ["ckptio", "torch", "safetensors"])
def test_load_into(store: Store, fmt: str) -> None:
    sd = _state_dict(3)
    url = store.put(f"into.{fmt}", _bytes_of(sd, fmt))
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    pointers = {k: v.data_ptr() for k, v in target.items()}
    missing, unexpected = ckptio.load_into(target, url)
    assert (missing, unexpected) == ([], [])
    _same(target, sd)
    assert {k: v.data_ptr() for k, v in target.items()} == pointers  # in place


def test_load_into_module(store: Store) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    source = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    url = store.put("module.pt", _bytes_of(source.state_dict(), "torch"))
    ckptio.load_into(model, url)
    _same(model.state_dict(), source.state_dict())


# --------------------------------------------------------------------------------- faults
class Faulty:
    """A store behind the fault proxy: `url` of an object uploaded through it, `options` to
    reach it, `proxy` to inject faults, `change` to replace the object at the origin."""

    def __init__(self, kind: str, moto: MotoS3 | None, http: RangeServer | None) -> None:
        self.kind = kind
        upstream = moto.endpoint if moto is not None else http.url  # type: ignore[union-attr]
        self.proxy = FaultProxy(upstream.removeprefix("http://"))
        self._moto, self._http = moto, http
        self.options: dict[str, Any] = dict(FAST)
        if moto is not None:
            self.options["endpoint_url"] = self.proxy.url

    def put(self, name: str, data: bytes) -> str:
        if self._moto is not None:
            self._moto.client.put_object(Bucket=BUCKET, Key=name, Body=data)
            return f"s3://{BUCKET}/{name}"
        assert self._http is not None
        self._http.objects["/" + name] = data
        return f"{self.proxy.url}/{name}"

    def change(self, name: str, data: bytes) -> None:
        self.put(name, data)


@pytest.fixture(params=["s3", "http"])
def faulty(request: pytest.FixtureRequest, http_server: RangeServer) -> Iterator[Faulty]:
    if request.param == "s3":
        f = Faulty("s3", request.getfixturevalue("s3_env"), None)
    else:
        f = Faulty("http", None, http_server)
    try:
        yield f
    finally:
        f.proxy.close()


def _is_data_get(method: str, path: str, headers: dict) -> bool:
    """A GET of the data: not one of the two opening probes (first and last bytes)."""
    r = headers.get("Range", "")
    return method == "GET" and r.startswith("bytes=") and not r.startswith(("bytes=0-", "bytes=-"))


def _big_state_dict() -> dict[str, torch.Tensor]:
    return {
        f"w{i}": torch.randn(256, 1024, generator=torch.Generator().manual_seed(i))
        for i in range(3)
    }


@pytest.mark.parametrize("missing", ["key", "bucket"])
def test_missing_object(faulty: Faulty, missing: str) -> None:
    if faulty.kind == "s3":
        url = f"s3://{BUCKET}/no-such-key.pt" if missing == "key" else "s3://no-such-bucket/k.pt"
    else:
        url = f"{faulty.proxy.url}/no-such-{missing}.pt"
    for call in (
        lambda: ckptio.load(url, storage_options=faulty.options),
        lambda: ckptio.open(url, storage_options=faulty.options),
        lambda: ckptio.load_into({}, url, storage_options=faulty.options),
    ):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert info.value.errno == errno.ENOENT and info.value.filename == url
        assert url in str(info.value)


def test_forbidden(faulty: Faulty) -> None:
    url = faulty.put("forbidden.pt", _bytes_of({"a": torch.ones(3)}, "ckptio"))
    faulty.proxy.inject("403", times=10)
    with pytest.raises(PermissionError) as info:
        ckptio.load(url, storage_options=faulty.options)
    assert info.value.errno == errno.EACCES and info.value.filename == url
    # Not retried: each opening GET (head and tail) is sent once; over S3 twice, signed by
    # ckptio, then by botocore, which reads S3's error.
    assert len(faulty.proxy.log) <= (4 if faulty.kind == "s3" else 2)


def _by_botocore(entry: Logged) -> bool:
    """Whether botocore sent the request (its User-Agent names it; the signed GETs' is
    urllib3's)."""
    return "botocore" in entry.agent.lower()


def test_s3_gets_are_signed_by_botocore_and_sent_without_its_client(s3_env: MotoS3) -> None:
    """Every GET of a load, the opening ones included, goes out as a SigV4-signed urllib3
    request to the URL botocore resolves, not through botocore's per-request machinery
    (test_remote_rclone.py runs them against a store that checks every signature)."""
    proxy = FaultProxy(s3_env.endpoint.removeprefix("http://"))
    try:
        sd = {f"t{i}": torch.randn(300_000) for i in range(4)}
        s3_env.client.put_object(Bucket=BUCKET, Key="signed.pt", Body=_bytes_of(sd, "ckptio"))
        options = {**FAST, "endpoint_url": proxy.url}
        with ckptio.settings.options(chunk_bytes=1 << 20, remote_inflight_bytes=4 << 20):
            out = ckptio.load(f"s3://{BUCKET}/signed.pt", storage_options=options)
        _same(sd, out)
        gets = [e for e in proxy.log if e.method == "GET"]
        assert len(gets) > 4 and all(e.status in (200, 206) for e in gets)
        assert not any(_by_botocore(e) for e in gets), [e.agent for e in gets]
    finally:
        proxy.close()


def test_s3_signed_gets_fall_back_to_botocore_on_an_error_answer(s3_env: MotoS3) -> None:
    """A GET the store answers with an error (a 403 here; a redirect to the bucket's region,
    a 400...) is sent again through botocore, which reads S3's error; the object's later GETs
    go through botocore too, and the load succeeds."""
    proxy = FaultProxy(s3_env.endpoint.removeprefix("http://"))
    try:
        sd = {f"t{i}": torch.randn(300_000) for i in range(3)}
        s3_env.client.put_object(Bucket=BUCKET, Key="fallback.pt", Body=_bytes_of(sd, "ckptio"))
        proxy.inject("403", times=1)
        options = {**FAST, "endpoint_url": proxy.url}
        with ckptio.settings.options(chunk_bytes=1 << 20, remote_inflight_bytes=4 << 20):
            out = ckptio.load(f"s3://{BUCKET}/fallback.pt", storage_options=options)
        _same(sd, out)
        gets = [e for e in proxy.log if e.method == "GET"]
        assert [e.status for e in gets].count(403) == 1
        assert not _by_botocore(next(e for e in gets if e.status == 403))
        assert any(_by_botocore(e) and e.status in (200, 206) for e in gets)
    finally:
        proxy.close()


def test_s3_signed_gets_are_off_where_a_proxy_is_configured(
    s3_env: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore honours the proxy variables and the signed GETs' urllib3 pool would not: with
    one set, every GET goes through botocore (here NO_PROXY exempts the loopback store)."""
    proxy = FaultProxy(s3_env.endpoint.removeprefix("http://"))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    try:
        sd = {"a": torch.arange(10_000)}
        s3_env.client.put_object(Bucket=BUCKET, Key="proxied.pt", Body=_bytes_of(sd, "ckptio"))
        out = ckptio.load(
            f"s3://{BUCKET}/proxied.pt", storage_options={**FAST, "endpoint_url": proxy.url}
        )
        _same(sd, out)
        gets = [e for e in proxy.log if e.method == "GET"]
        assert gets and all(_by_botocore(e) for e in gets)
    finally:
        proxy.close()


@pytest.mark.parametrize(
    "fault", ["503", "500", "reset", "truncate", "long_length", "short_length"]
)
def test_transient_faults_are_retried(faulty: Faulty, fault: str) -> None:
    """A burst of faults on the data GETs: retried, and the result is exact."""
    sd = _big_state_dict()
    url = faulty.put(f"retried-{fault}.pt", _bytes_of(sd, "ckptio"))
    faulty.proxy.inject(fault, times=3, match=_is_data_get)
    with ckptio.options(chunk_bytes=1 << 20):
        got = ckptio.load(url, storage_options=faulty.options)
    _same(got, sd)
    assert sum(1 for e in faulty.proxy.log if e.status in (500, 503)) == (
        3 if fault in ("500", "503") else 0
    )


@pytest.mark.parametrize("fault", ["503", "reset", "truncate", "long_length", "short_length"])
def test_persistent_faults_name_url_and_range(faulty: Faulty, fault: str) -> None:
    sd = _big_state_dict()
    url = faulty.put(f"failing-{fault}.pt", _bytes_of(sd, "ckptio"))
    faulty.proxy.inject(fault, times=1000, match=_is_data_get)
    with pytest.raises(OSError) as info:
        ckptio.load(url, storage_options=faulty.options)
    e = info.value
    assert type(e) is OSError and e.errno == errno.EIO and e.filename == url
    assert "bytes " in e.strerror and f"after {FAST['retries']} attempts" in e.strerror


def test_faults_while_opening_are_retried(faulty: Faulty) -> None:
    sd = _big_state_dict()
    url = faulty.put("probe-503.pt", _bytes_of(sd, "torch"))
    faulty.proxy.inject("503", times=2)  # the first two GETs: the probes
    faulty.proxy.inject("reset", times=1)
    _same(ckptio.load(url, storage_options=faulty.options), sd)


@pytest.mark.parametrize("fmt", ["ckptio", "safetensors"])
def test_object_changed_during_read(faulty: Faulty, fmt: str) -> None:
    """The object is replaced after open read its header: the next GET (If-Match the first
    ETag) fails with ESTALE instead of returning bytes of another version."""
    sd = _big_state_dict()
    name = f"changing.{fmt}"
    url = faulty.put(name, _bytes_of(sd, fmt))
    with ckptio.open(url, storage_options=faulty.options) as h:
        faulty.change(name, _bytes_of({k: v + 1 for k, v in sd.items()}, fmt))
        with pytest.raises(OSError) as info:
            h["w1"]
    assert info.value.errno == errno.ESTALE and info.value.filename == url
    assert "changed while it was read" in info.value.strerror


def test_object_changed_between_probes(faulty: Faulty) -> None:
    """Replaced between the two opening GETs (different ETags): refused too."""
    url = faulty.put("changing-probe.pt", _bytes_of(_big_state_dict(), "ckptio"))
    head_answered = threading.Event()

    def after(method: str, path: str, headers: dict) -> None:
        if headers.get("Range", "").startswith("bytes=0-"):
            head_answered.set()

    def before(method: str, path: str, headers: dict) -> None:
        if headers.get("Range", "").startswith("bytes=-"):  # the tail probe, after the head
            assert head_answered.wait(10)
            faulty.change("changing-probe.pt", _bytes_of({"x": torch.ones(5)}, "ckptio"))

    faulty.proxy.before, faulty.proxy.after = before, after
    with pytest.raises(OSError) as info:
        ckptio.load(url, storage_options=faulty.options)
    assert info.value.errno == errno.ESTALE and info.value.filename == url
    assert "changed while it was opened" in info.value.strerror


def test_server_ignoring_range(faulty: Faulty) -> None:
    """A ranged GET answered with 200 and the whole object: refused with a clear error
    (reading by ranges would download the whole object per range)..."""
    sd = _big_state_dict()
    url = faulty.put("no-ranges.pt", _bytes_of(sd, "ckptio"))
    faulty.proxy.inject("ignore_range", times=1000)
    with pytest.raises(OSError, match="does not serve byte ranges") as info:
        ckptio.load(url, storage_options=faulty.options)
    assert info.value.errno == errno.EIO and info.value.filename == url


@pytest.mark.parametrize("fmt", ["ckptio", "safetensors"])
def test_ranges_answered_with_200_and_content_range(faulty: Faulty, fmt: str) -> None:
    """Some stores (rclone's serve s3) answer ranged GETs with 200 and a Content-Range: the
    Content-Range says which bytes came, so the load is exact (the opening GETs included,
    which must not take the answer for a whole 1 MiB object)."""
    sd = _big_state_dict()
    url = faulty.put(f"status200.{fmt}", _bytes_of(sd, fmt))
    faulty.proxy.inject("status_200", times=10_000)
    _same(ckptio.load(url, storage_options=faulty.options), sd, ordered=fmt != "safetensors")
    with ckptio.open(url, storage_options=faulty.options) as h:
        name = next(iter(sd))
        assert torch.equal(h.get_slice(name)[1:3], sd[name][1:3])


def test_empty_etag_is_no_version(faulty: Faulty, tmp_path: Path) -> None:
    """An ETag of "" names no version: the load works without If-Match, and the local
    cache, which could not tell a replaced object from the cached one, does not keep it."""
    sd = _big_state_dict()
    url = faulty.put("empty-etag.pt", _bytes_of(sd, "ckptio"))
    faulty.proxy.inject("empty_etag", times=10_000)
    source = ckptio._remote.open_source(url, faulty.options)
    with source:
        assert source.etag is None
    _same(ckptio.load(url, storage_options=faulty.options), sd)
    with pytest.warns(UserWarning, match="no strong ETag"):
        _same(ckptio.load(url, storage_options=faulty.options, cache_dir=tmp_path), sd)
    assert not [p for p in tmp_path.rglob("*.data")]


@pytest.mark.parametrize("size", ["small", "large"])
def test_suffix_range_refused(faulty: Faulty, size: str) -> None:
    """A 416 to the opening suffix range (a server refusing bytes=-N longer than the object)
    is not an empty object: a small one is what the first GET brought, a larger one's last
    bytes are asked for by offsets."""
    sd = {"w": torch.arange(100.0)} if size == "small" else _big_state_dict()
    url = faulty.put(f"suffix-{size}.pt", _bytes_of(sd, "ckptio"))
    faulty.proxy.inject("suffix_416", times=10_000)
    options = {**faulty.options, "probe_bytes": 65536}
    _same(ckptio.load(url, storage_options=options), sd)


def test_server_ignoring_range_small_object(faulty: Faulty) -> None:
    """...unless the whole object fits in the opening GET: then that is all there is."""
    sd = {"a": torch.arange(10.0), "b": torch.ones(3, 3, dtype=torch.int64)}
    url = faulty.put("small-no-ranges.pt", _bytes_of(sd, "torch"))
    faulty.proxy.inject("ignore_range", times=1000)
    _same(ckptio.load(url, storage_options=faulty.options), sd)


# ------------------------------------------------------------------------------- planning
def test_plan_gets_covers_every_byte_once() -> None:
    """Every requested byte is read once, into its own address, by GETs of at most
    chunk_bytes; neighbours within the gap share GETs, far ones do not."""
    import random

    from ckptio._remote._source import plan_gets

    rng = random.Random(1)
    for _ in range(500):
        requests, at, address = [], rng.randint(0, 100), 1 << 30
        for _ in range(rng.randint(1, 10)):
            at += rng.choice([0, 1, 50, 70_000, rng.randint(0, 300)])
            length = rng.randint(0, 400)
            requests.append((at, length, address))
            address += length + 7
            at += length if rng.random() < 0.8 else -rng.randint(0, length)  # some overlap
        chunk = rng.choice([16, 100, 4096])
        covered: dict[int, int] = {}
        for job in plan_gets(requests, chunk, gap=rng.choice([0, 64, 65536])):
            assert 0 < job.stop - job.start <= chunk
            previous = job.start
            for offset, addr, n in job.pieces:
                assert n > 0 and previous <= offset and offset + n <= job.stop
                previous = offset + n
                for k in range(n):
                    assert addr + k not in covered
                    covered[addr + k] = offset + k
        assert covered == {a + k: o + k for o, n, a in requests for k in range(n)}
    assert len(plan_gets([(0, 10, 0), (20, 10, 100)], 1 << 20)) == 1  # 10 bytes apart: one
    assert len(plan_gets([(0, 10, 0), (1 << 20, 10, 100)], 1 << 21)) == 2  # 1 MiB apart: two
    assert len(plan_gets([(0, 100 << 20, 0)], 8 << 20)) == 13  # 100 MiB in 13 GETs


def test_legacy_torch_file(store: Store) -> None:
    """A pre-zip torch file at a URL: read whole, handed to torch, as a file object."""
    obj = {"w": torch.randn(4, 5), "n": 3}
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    url = store.put("legacy.pt", buf.getvalue())
    _same(ckptio.load(url), torch.load(io.BytesIO(buf.getvalue())))


def _legacy_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _body_bytes(server: RangeServer, path: str) -> int:
    return sum(e.sent for e in server.log if e.path == path and e.method == "GET")


# The opening probe fetches this much of each end (twice the object when it is smaller).
_PROBE = {"probe_bytes": 4096}


def test_legacy_file_fetched_once(http_server: RangeServer) -> None:
    """The bytes ckptio checks are the bytes torch loads: the object is fetched once (past
    the size up to which a source keeps what it read, _source.CACHE_PREAD_BYTES)."""
    obj = {"w": torch.randn(4200, 1024), "b": torch.arange(10)}  # 17 MB
    data = _legacy_bytes(obj)
    http_server.objects["/once-legacy.pt"] = data
    _same(ckptio.load(f"{http_server.url}/once-legacy.pt", storage_options=_PROBE), obj)
    sent = _body_bytes(http_server, "/once-legacy.pt")
    assert len(data) <= sent <= len(data) + 2 * _PROBE["probe_bytes"]


def test_directory_legacy_shard_fetched_once(http_server: RangeServer, tmp_path: Path) -> None:
    """A legacy shard of a remote directory is handed to torch from the shard already opened
    (each shard's bytes fetched once), beside a torch zip shard ckptio reads itself."""
    sd = _sharded_state_dict()
    names = list(sd)
    legacy = {k: sd[k] for k in names[:4]}
    zipped = {k: sd[k] for k in names[4:]}
    http_server.objects["/dir-legacy/a.bin"] = _legacy_bytes(legacy)
    http_server.objects["/dir-legacy/b.bin"] = _bytes_of(zipped, "ckptio")
    weight_map = {**{k: "a.bin" for k in legacy}, **{k: "b.bin" for k in zipped}}
    http_server.objects["/dir-legacy/pytorch_model.bin.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": weight_map}
    ).encode()
    index = f"{http_server.url}/dir-legacy/pytorch_model.bin.index.json"
    _same(ckptio.load(index, storage_options=_PROBE), {k: sd[k] for k in weight_map})
    size = len(http_server.objects["/dir-legacy/a.bin"])
    assert size <= _body_bytes(http_server, "/dir-legacy/a.bin") <= size + 2 * 4096


# ---------------------------------------------------------------------- model directories
def _sharded_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    sd = {f"layers.{i}.weight": torch.randn(96, 64, generator=g) for i in range(6)}
    sd["layers.0.bias"] = torch.randn(96, generator=g).to(torch.bfloat16)
    sd["scale"] = torch.tensor(0.5)
    return sd


def _put_directory(store: Store, tmp_path: Path, prefix: str, fmt: str) -> dict[str, str]:
    """Saves a model directory of several shards (ckptio's writer: huggingface_hub's layout,
    tests/test_shard_save.py) and uploads every file under `prefix`/; {file name: URL}."""
    local = tmp_path / prefix
    ckptio.save(_sharded_state_dict(), local, max_shard_size=30_000, format=fmt)
    return {p.name: store.put(f"{prefix}/{p.name}", p.read_bytes()) for p in local.iterdir()}


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_directory_by_index_and_directory_url(store: Store, tmp_path: Path, fmt: str) -> None:
    urls = _put_directory(store, tmp_path, f"dir-{fmt}", fmt)
    assert sum(n.endswith((".safetensors", ".bin")) for n in urls) >= 4
    index = next(u for n, u in urls.items() if n.endswith(".index.json"))
    sd = _sharded_state_dict()
    _same(ckptio.load(index), sd)
    # the directory's URL: S3 lists the prefix, HTTP is asked for the usual index names
    _same(ckptio.load(index[: index.rindex("/") + 1]), sd)
    _same(ckptio.load(index, map_location="meta"), {k: v.to("meta") for k, v in sd.items()})


def test_s3_directory_load_makes_one_client(
    s3_env: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing the prefix, reading the index and every shard share one botocore client
    (each one made costs about 0.1 s in a fresh process)."""
    from ckptio._remote import _s3

    local = tmp_path / "one-client"
    ckptio.save(_sharded_state_dict(), local, max_shard_size=30_000, format="safetensors")
    for p in local.iterdir():
        s3_env.client.put_object(Bucket=BUCKET, Key=f"one-client/{p.name}", Body=p.read_bytes())
    monkeypatch.setattr(_s3, "_clients", {})  # a fresh process
    _same(ckptio.load(f"s3://{BUCKET}/one-client/", storage_options=FAST), _sharded_state_dict())
    assert len(_s3._clients) == 1


def test_directory_url_staged_device_one_ring(
    store: Store, tmp_path: Path, staged_cpu: list[Any]
) -> None:
    urls = _put_directory(store, tmp_path, "dir-staged", "safetensors")
    index = next(u for n, u in urls.items() if n.endswith(".index.json"))
    _same(ckptio.load(index, map_location="cpu"), _sharded_state_dict())
    assert len(staged_cpu) == 1  # one placement for every shard


def test_directory_url_open_and_slices(store: Store, tmp_path: Path) -> None:
    urls = _put_directory(store, tmp_path, "dir-open", "safetensors")
    index = next(u for n, u in urls.items() if n.endswith(".index.json"))
    sd = _sharded_state_dict()
    with ckptio.open(index) as h:
        assert h.keys() == list(sd)
        assert torch.equal(h["layers.3.weight"], sd["layers.3.weight"])
        parts = h.get_slices(lambda name, shape: slice(0, 10) if len(shape) == 2 else None)
        assert set(parts) == {k for k, v in sd.items() if v.dim() == 2}
        for name, part in parts.items():
            assert torch.equal(part, sd[name][0:10])


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_directory_url_load_into(store: Store, tmp_path: Path, fmt: str) -> None:
    urls = _put_directory(store, tmp_path, f"dir-into-{fmt}", fmt)
    index = next(u for n, u in urls.items() if n.endswith(".index.json"))
    sd = _sharded_state_dict()
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    assert ckptio.load_into(target, index) == ([], [])
    _same(target, sd)


def test_directory_url_missing_shard(store: Store, tmp_path: Path) -> None:
    local = tmp_path / "dir-missing"
    ckptio.save(_sharded_state_dict(), local, max_shard_size=30_000, format="safetensors")
    files = sorted(p.name for p in local.iterdir())
    gone = next(n for n in files if n.endswith(".safetensors"))
    urls = {n: store.put(f"dir-missing/{n}", (local / n).read_bytes()) for n in files if n != gone}
    index = next(u for n, u in urls.items() if n.endswith(".index.json"))
    for call in (ckptio.load, lambda u: ckptio.load_into({}, u, strict=False)):
        with pytest.raises(ckptio.CheckpointError, match=f"shard '{gone}' is missing"):
            call(index)
    with ckptio.open(index) as h:
        with pytest.raises(ckptio.CheckpointError, match=f"shard '{gone}' is missing"):
            h.get_tensors()


@pytest.mark.parametrize("shard", ["../escape.safetensors", "%2e%2e/x.safetensors", "s3:x"])
def test_directory_url_index_cannot_leave_its_directory(store: Store, shard: str) -> None:
    index = {"metadata": {}, "weight_map": {"w": shard}}
    url = store.put("dir-escape/model.safetensors.index.json", json.dumps(index).encode())
    with pytest.raises(ckptio.CheckpointError, match="not a file name inside"):
        ckptio.load(url)


def test_directory_url_without_a_model(store: Store) -> None:
    store.put("dir-empty/readme.txt", b"nothing here")
    url = store.put("dir-empty/notes.md", b"nor here")
    directory = url[: url.rindex("/") + 1]
    # S3 lists the prefix and finds no weights (torch.load's error for a directory, saying
    # what was looked for); HTTP has no listing and finds none of the usual names.
    error = IsADirectoryError if store.kind == "s3" else FileNotFoundError
    with pytest.raises(error, match="not a model directory"):
        ckptio.load(directory)


def test_directory_url_mmap_needs_a_cache(store: Store, tmp_path: Path) -> None:
    urls = _put_directory(store, tmp_path, "dir-mmap", "safetensors")
    directory = next(iter(urls.values())).rsplit("/", 1)[0] + "/"
    with pytest.raises(ValueError, match="mmap=True needs local files"):
        ckptio.load(directory, mmap=True)
    # with a local cache, the shards' cached copies are mapped
    _same(ckptio.load(directory, mmap=True, cache_dir=tmp_path / "cache"), _sharded_state_dict())


def test_directory_url_cached_shards(store: Store, tmp_path: Path) -> None:
    """With cache_dir, every shard is cached as an object: a second load transfers no shard
    bytes (each is validated by the cache's small request), and open/load_into use it too."""
    urls = _put_directory(store, tmp_path, "dir-cache", "torch")
    index = next(u for n, u in urls.items() if n.endswith(".index.json"))
    cache = tmp_path / "cache"
    sd = _sharded_state_dict()
    _same(ckptio.load(index, cache_dir=cache), sd)
    cached = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 20_000]
    assert len(cached) == sum(n.endswith(".bin") for n in urls)
    with ckptio.open(index, cache_dir=cache) as h:
        assert torch.equal(h["layers.5.weight"], sd["layers.5.weight"])
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    assert ckptio.load_into(target, index, cache_dir=cache) == ([], [])
    _same(target, sd)
    if store.kind == "http":
        server = store._http
        assert server is not None
        before = len(server.log)
        _same(ckptio.load(index, cache_dir=cache), sd)
        shard_bytes = sum(e.sent for e in server.log[before:] if e.path.endswith(".bin"))
        assert shard_bytes <= 4 * sum(n.endswith(".bin") for n in urls)  # validations only


def test_directory_url_single_weights_file(store: Store) -> None:
    sd = _state_dict(5)
    url = store.put("dir-single/model.safetensors", _bytes_of(sd, "safetensors"))
    directory = url[: url.rindex("/") + 1]
    _same(ckptio.load(directory), sd, ordered=False)
    with ckptio.open(directory) as h:
        assert sorted(h.keys()) == sorted(sd)
