"""The local cache of remote objects (``cache_dir=``, the ``remote_cache_dir`` setting;
docs/remote.md, "Local cache"), against moto's S3 server and a Range-honouring HTTP server
on loopback, each behind the counting (and fault-injecting) proxy of tests/_remote_servers.py:
every request a load makes is seen, with the body bytes it moved.

The oracle is stock torch / safetensors over the same bytes. Concurrency is tested with
real processes (a file barrier, no sleeps to line them up); the killed fill with a proxy
that holds a GET until the filling process is dead.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors import torch as safetensors_torch

import ckptio
from _remote_servers import FaultProxy, MotoS3, RangeServer, aws_environment
from ckptio import settings
from ckptio._remote import _cache

pytest.importorskip("moto", reason="moto[server] and boto3 are in requirements-dev.txt")

BUCKET = "cache-bucket"
#: small opening probes, so that a 1 MiB object has data GETs beyond them
PROBE = 65536


def _state_dict(seed: int = 0, rows: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(rows, 512, generator=g),
        "b": torch.randn(64, 33, generator=g).to(torch.float16),
        "step": torch.tensor(seed),
    }


def _bytes_of(obj: Any, fmt: str) -> bytes:
    if fmt == "safetensors":
        return safetensors_torch.save(obj)
    buf = io.BytesIO()
    ckptio.save(obj, buf)
    return buf.getvalue()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------- servers
@pytest.fixture()
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    aws_environment(monkeypatch)


class Store:
    """A store behind the proxy: `put` bytes, get their URL; `options` reach it; `gets`
    lists the GETs of an object the proxy relayed; `change` replaces it at the origin."""

    def __init__(self, kind: str, moto: MotoS3 | None, http: RangeServer | None) -> None:
        self.kind = kind
        upstream = moto.endpoint if moto is not None else http.url  # type: ignore[union-attr]
        self.proxy = FaultProxy(upstream.removeprefix("http://"))
        self.http = http
        self._moto = moto
        self.options: dict[str, Any] = {"retries": 3, "retry_backoff": 0.001}
        self.options["probe_bytes"] = PROBE
        if moto is not None:
            self.options["endpoint_url"] = self.proxy.url

    def put(self, name: str, data: bytes) -> str:
        if self._moto is not None:
            self._moto.client.put_object(Bucket=BUCKET, Key=name, Body=data)
            return f"s3://{BUCKET}/{name}"
        assert self.http is not None
        self.http.objects["/" + name] = data
        return f"{self.proxy.url}/{name}"

    change = put

    def delete(self, name: str) -> None:
        if self._moto is not None:
            self._moto.client.delete_object(Bucket=BUCKET, Key=name)
        else:
            assert self.http is not None
            del self.http.objects["/" + name]

    def requests(self, name: str, since: int = 0) -> list[Any]:
        return [e for e in self.proxy.log[since:] if e.path.split("?")[0].endswith("/" + name)]

    def gets(self, name: str, since: int = 0) -> list[Any]:
        return [e for e in self.requests(name, since) if e.method == "GET"]


@pytest.fixture(params=["s3", "http"])
def store(request: pytest.FixtureRequest, http_server: RangeServer) -> Iterator[Store]:
    if request.param == "s3":
        request.getfixturevalue("aws_env")
        s = Store("s3", request.getfixturevalue("moto"), None)
    else:
        s = Store("http", None, http_server)
    try:
        yield s
    finally:
        s.proxy.close()


def _entry_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def _one_entry(cache: Path) -> Path:
    """The data file of the only entry, checked: data, sidecar and lock, no temporary."""
    names = _entry_files(cache)
    assert len(names) == 3, names
    key = names[0].split(".")[0]
    assert names == [f"{key}.data", f"{key}.json", f"{key}.lock"]
    return cache / f"{key}.data"


# ------------------------------------------------------------------------- miss then hit
@pytest.mark.parametrize("fmt", ["ckptio", "safetensors"])
def test_miss_then_hit(store: Store, tmp_path: Path, fmt: str) -> None:
    sd = _state_dict(1)
    data = _bytes_of(sd, fmt)
    name = f"hit.{fmt}"
    url = store.put(name, data)
    cache = tmp_path / "cache"
    _same(ckptio.load(url, storage_options=store.options, cache_dir=cache), sd)
    assert sum(e.sent for e in store.gets(name)) == len(data)  # probes reused by the fill
    entry = _one_entry(cache)
    assert entry.read_bytes() == data
    assert entry.stat().st_mode & 0o777 == 0o444
    meta = json.loads(entry.with_suffix(".json").read_text())
    assert meta["url"] == url and meta["size"] == len(data) and meta["etag"]

    since = len(store.proxy.log)
    _same(ckptio.load(url, storage_options=store.options, cache_dir=cache), sd)
    # a hit: one validating GET of the first byte, no object bytes beyond it
    hit = store.requests(name, since)
    assert [(e.method, e.range, e.status, e.sent) for e in hit] == [("GET", "bytes=0-0", 206, 1)]
    assert _one_entry(cache) == entry


def test_s3_hit_is_validated_without_a_client(
    moto: MotoS3, aws_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3 entry records where its signed GETs went (URL and region, no credentials). A
    hit in a process with no botocore client validates there, signed with the credentials
    botocore's chain gives now, and makes no client (about 0.1 s of a hit's time); an answer
    other than a clear one there is asked again through a client; a replaced object is
    still seen."""
    from ckptio._remote import _s3

    store = Store("s3", moto, None)
    try:
        sd = _state_dict(5)
        url = store.put("noclient.pt", _bytes_of(sd, "ckptio"))
        _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), sd)
        sidecar = _one_entry(tmp_path).with_suffix(".json")
        meta = json.loads(sidecar.read_text())
        assert meta["signed_get"] == {
            "url": f"{store.proxy.url}/{BUCKET}/noclient.pt",
            "region": "us-east-1",
        }
        assert "testing" not in sidecar.read_text()  # the keys, neither one

        monkeypatch.setattr(_s3, "_clients", {})  # a fresh process
        since = len(store.proxy.log)
        _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), sd)
        assert _s3._clients == {}
        hit = store.requests("noclient.pt", since)
        assert [(e.range, e.status) for e in hit] == [("bytes=0-0", 206)]
        assert "botocore" not in hit[0].agent.lower()

        store.proxy.inject("403", times=1)  # the client-less GET refused: a client asks
        since = len(store.proxy.log)
        _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), sd)
        hit = store.requests("noclient.pt", since)
        assert [(e.range, e.status) for e in hit] == [("bytes=0-0", 403), ("bytes=0-0", 206)]
        assert _s3._clients  # the second GET was the client's (signed at the URL it resolves)

        monkeypatch.setattr(_s3, "_clients", {})
        new = _state_dict(6, rows=300)
        store.change("noclient.pt", _bytes_of(new, "ckptio"))
        _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), new)
    finally:
        store.proxy.close()


def test_s3_hit_without_a_client_takes_a_profiles_keys(
    moto: MotoS3, aws_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a profile in storage_options, the client-less validation signs with that
    profile's keys (botocore's chain for it), not with the environment's, as a client
    would; without one, with the environment's (the chain's first link)."""
    from ckptio._remote import _s3

    credentials = tmp_path / "credentials"
    credentials.write_text("[ckpt]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-the-profiles")
    store = Store("s3", moto, None)
    try:
        sd = _state_dict(7)
        url = store.put("profile.pt", _bytes_of(sd, "ckptio"))
        options = {**store.options, "profile": "ckpt"}
        cache = tmp_path / "cache"
        _same(ckptio.load(url, storage_options=options, cache_dir=cache), sd)
        monkeypatch.setattr(_s3, "_clients", {})
        since = len(store.proxy.log)
        _same(ckptio.load(url, storage_options=options, cache_dir=cache), sd)
        assert _s3._clients == {}
        hit = store.requests("profile.pt", since)
        assert [(e.range, e.status) for e in hit] == [("bytes=0-0", 206)]
        assert _s3._credentials({"profile": "ckpt"}).access_key == "testing"
        assert _s3._credentials({}).access_key == "not-the-profiles"
    finally:
        store.proxy.close()


def test_hit_when_ranges_are_answered_200(store: Store, tmp_path: Path) -> None:
    """A store that answers ranged GETs with 200 and a Content-Range (rclone's serve s3):
    the validating GET still tells the size and ETag, so the second load is a hit."""
    sd = _state_dict(4)
    url = store.put("hit200.pt", _bytes_of(sd, "ckptio"))
    store.proxy.inject("status_200", times=10_000)
    _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), sd)
    since = len(store.proxy.log)
    _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), sd)
    hit = store.requests("hit200.pt", since)
    assert [(e.method, e.range, e.status, e.sent) for e in hit] == [("GET", "bytes=0-0", 200, 1)]


def test_replaced_object_is_refilled(store: Store, tmp_path: Path) -> None:
    old, new = _state_dict(1), _state_dict(2, rows=300)
    url = store.put("replaced.pt", _bytes_of(old, "ckptio"))
    _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), old)
    new_bytes = _bytes_of(new, "ckptio")
    store.change("replaced.pt", new_bytes)
    since = len(store.proxy.log)
    _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), new)
    assert sum(e.sent for e in store.gets("replaced.pt", since)) == 1 + len(new_bytes)
    assert _one_entry(tmp_path).read_bytes() == new_bytes
    since = len(store.proxy.log)
    _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), new)
    assert sum(e.sent for e in store.gets("replaced.pt", since)) == 1  # a hit again


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "swapped", "sidecar"])
def test_corrupted_entry_is_refilled(store: Store, tmp_path: Path, damage: str) -> None:
    sd = _state_dict(3)
    data = _bytes_of(sd, "ckptio")
    url = store.put("corrupt.pt", data)
    ckptio.load(url, storage_options=store.options, cache_dir=tmp_path)
    entry = _one_entry(tmp_path)
    if damage == "swapped":  # another file under the entry's name
        other = tmp_path / "other"
        other.write_bytes(bytes(len(data)))
        other.rename(entry)
    elif damage == "sidecar":
        entry.with_suffix(".json").write_text("{not json")
    else:
        entry.chmod(0o644)
        with open(entry, "r+b") as fh:
            if damage == "truncated":
                fh.truncate(len(data) // 2)
            else:  # same size, other bytes: the mtime tells
                fh.seek(100)
                fh.write(b"\0" * 4096)
        os.utime(entry, ns=(1, 1))
    since = len(store.proxy.log)
    _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), sd)
    assert sum(e.sent for e in store.gets("corrupt.pt", since)) >= len(data)  # refilled
    assert _one_entry(tmp_path).read_bytes() == data


# ------------------------------------------------------------------ the other entry points
def test_open_load_into_and_mmap(store: Store, tmp_path: Path) -> None:
    sd = _state_dict(4)
    url = store.put("modes.safetensors", _bytes_of(sd, "safetensors"))
    opts = store.options
    # mmap=True maps the local copy, on the fill as on a hit
    for _ in range(2):
        got = ckptio.load(url, mmap=True, storage_options=opts, cache_dir=tmp_path)
        _same(got, sd)
    with ckptio.open(url, storage_options=opts, cache_dir=tmp_path) as h:
        assert sorted(h.keys()) == sorted(sd)
        assert torch.equal(h.get_slice("a")[10:20], sd["a"][10:20])
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    ckptio.load_into(target, url, storage_options=opts, cache_dir=tmp_path)
    _same(target, sd)
    _one_entry(tmp_path)
    # only the fill moved the object; every later load made one 1-byte GET
    gets = store.gets("modes.safetensors")
    assert [e.sent for e in gets if e.range == "bytes=0-0"] == [1, 1, 1]


def test_verify_goes_through_the_cache(store: Store, tmp_path: Path) -> None:
    """load(verify=...) re-enters load with the setting changed: cache_dir goes along."""
    sd = _state_dict(13)
    with ckptio.options(write_crc32=True):
        data = _bytes_of(sd, "ckptio")
    url = store.put("verified.pt", data)
    for _ in range(2):
        _same(ckptio.load(url, verify=True, storage_options=store.options, cache_dir=tmp_path), sd)
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    ckptio.load_into(target, url, verify=True, storage_options=store.options, cache_dir=tmp_path)
    _same(target, sd)
    assert _one_entry(tmp_path).read_bytes() == data
    assert [e.range for e in store.gets("verified.pt")].count("bytes=0-0") == 2


def test_map_shared_is_refused(store: Store, tmp_path: Path) -> None:
    import mmap

    url = store.put("shared.pt", _bytes_of(_state_dict(), "ckptio"))
    getter = getattr(torch.serialization, "get_default_mmap_options", None)
    if getter is None:
        pytest.skip("torch without set_default_mmap_options")
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        with pytest.raises(ValueError, match="MAP_SHARED"):
            ckptio.load(url, mmap=True, storage_options=store.options, cache_dir=tmp_path)
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)


# --------------------------------------------------------------------- setting, keyword
def test_setting_and_keyword(http_server: RangeServer, tmp_path: Path) -> None:
    sd = _state_dict(5)
    http_server.objects["/setting.pt"] = _bytes_of(sd, "ckptio")
    url = f"{http_server.url}/setting.pt"
    local = tmp_path / "local.pt"
    ckptio.save(sd, local)
    by_setting, by_keyword = tmp_path / "setting", tmp_path / "keyword"
    with ckptio.options(remote_cache_dir=by_setting):
        assert ckptio.get_options().remote_cache_dir == str(by_setting)
        _same(ckptio.load(url), sd)
        _one_entry(by_setting)
        _same(ckptio.load(url, cache_dir=by_keyword), sd)  # the keyword wins
        _one_entry(by_keyword)
        _same(ckptio.load(local), sd)  # the setting leaves local paths alone
        with ckptio.open(url) as h:
            assert torch.equal(h["a"], sd["a"])
    assert len(list(by_setting.iterdir())) == 3
    with pytest.raises(ValueError, match="remote_cache_dir must be a path"):
        ckptio.set_options(remote_cache_dir=3)


def test_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CKPTIO_REMOTE_CACHE_DIR", str(tmp_path))
    assert settings._from_environment().remote_cache_dir == str(tmp_path)
    monkeypatch.setenv("CKPTIO_REMOTE_CACHE_DIR", "")
    assert settings._from_environment().remote_cache_dir is None


def test_entry_key() -> None:
    key = _cache.entry_key
    assert key("https://Host:443/a/b.pt#x", None) == key("https://host/a/b.pt", None)
    assert key("http://host:8080/a.pt", None) != key("http://host/a.pt", None)
    assert key("http://host/a.pt?v=1", None) != key("http://host/a.pt?v=2", None)
    one = key("s3://b/k.pt", {"endpoint_url": "http://127.0.0.1:9000"})
    assert one != key("s3://b/k.pt", {"endpoint_url": "http://127.0.0.1:9001"})
    assert one != key("s3://b/k.pt", None)


# ---------------------------------------------------------------------------- errors
def test_errors(store: Store, tmp_path: Path) -> None:
    sd = _state_dict(6)
    local = tmp_path / "local.pt"
    ckptio.save(sd, local)
    with pytest.raises(ValueError, match="cache_dir applies to"):
        ckptio.load(local, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="cache_dir applies to"):
        ckptio.open(str(local), cache_dir=tmp_path / "c")
    url = store.put("gone.pt", _bytes_of(sd, "ckptio"))
    with pytest.raises(TypeError, match="unknown storage_options nope"):
        ckptio.load(url, storage_options={**store.options, "nope": 1}, cache_dir=tmp_path)
    ckptio.load(url, storage_options=store.options, cache_dir=tmp_path / "c")
    with pytest.raises(TypeError, match="unknown storage_options nope"):
        ckptio.load(url, storage_options={**store.options, "nope": 1}, cache_dir=tmp_path / "c")
    store.delete("gone.pt")
    # the store no longer has it: an error, not the cached copy
    with pytest.raises(FileNotFoundError) as info:
        ckptio.load(url, storage_options=store.options, cache_dir=tmp_path / "c")
    assert info.value.filename == url


def test_weak_etag_is_not_cached(http_server: RangeServer, tmp_path: Path) -> None:
    sd = _state_dict(7)
    http_server.objects["/weak.pt"] = _bytes_of(sd, "ckptio")
    http_server.etag = lambda path: 'W/"1"'  # type: ignore[method-assign]
    try:
        with pytest.warns(UserWarning, match="not cached"):
            _same(ckptio.load(f"{http_server.url}/weak.pt", cache_dir=tmp_path), sd)
    finally:
        del http_server.etag
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]


def test_unwritable_cache_loads_from_the_store(store: Store, tmp_path: Path) -> None:
    """The cache's file system failing (here: its path runs through a regular file) is
    not the load's failure: a warning, and the object from the store."""
    sd = _state_dict(12)
    url = store.put("unwritable.pt", _bytes_of(sd, "ckptio"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.warns(UserWarning, match="not cached"):
        got = ckptio.load(url, storage_options=store.options, cache_dir=tmp_path / "file" / "c")
    _same(got, sd)


def test_object_changed_during_fill(store: Store, tmp_path: Path) -> None:
    """Replaced after the fill opened it: a data GET fails If-Match: ESTALE, no entry."""
    name = "changing.pt"
    url = store.put(name, _bytes_of(_state_dict(8, rows=1024), "ckptio"))
    changed = []

    def before(method: str, path: str, headers: dict) -> None:
        r = headers.get("Range", "")
        if not changed and method == "GET" and _is_data_range(r) and path.endswith(name):
            changed.append(r)
            store.change(name, _bytes_of(_state_dict(9, rows=1024), "ckptio"))

    store.proxy.before = before
    with pytest.raises(OSError) as info:
        ckptio.load(url, storage_options=store.options, cache_dir=tmp_path)
    assert info.value.errno == errno.ESTALE and info.value.filename == url
    assert changed
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]  # no entry, no temporary
    store.proxy.before = None
    _same(ckptio.load(url, storage_options=store.options, cache_dir=tmp_path), _state_dict(9, 1024))


def _is_data_range(r: str) -> bool:
    return r.startswith("bytes=") and not r.startswith(("bytes=0-", "bytes=-"))


# ------------------------------------------------------------------------- processes
_CHILD = """
import json, sys, os, time, torch, ckptio
url, cache, options, ready, go = sys.argv[1:6]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
sd = ckptio.load(url, storage_options=json.loads(options), cache_dir=cache)
print(json.dumps({k: [float(v.double().sum()), v.numel()] for k, v in sd.items()}))
"""


def _child(url: str, cache: Path, options: dict, ready: Path, go: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, str(cache), json.dumps(options), str(ready), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(paths: list[Path], procs: list[subprocess.Popen], limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not all(p.exists() for p in paths):
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the children did not start"
        time.sleep(0.01)


@pytest.mark.parametrize("store", ["http"], indirect=True)  # the lock is the same for S3
def test_concurrent_fills(store: Store, tmp_path: Path) -> None:
    """Four processes load one URL into an empty cache at once: each gets the right tensors,
    the object is downloaded once (the others wait on the key's lock, then hit), and one
    complete entry is left, no temporary."""
    sd = _state_dict(10, rows=2048)  # 4 MiB
    data = _bytes_of(sd, "ckptio")
    url = store.put("shared.pt", data)
    cache, go = tmp_path / "cache", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(4)]
    env_options = dict(store.options)
    procs = [_child(url, cache, env_options, r, go) for r in ready]
    try:
        _wait_for(ready, procs)
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    expected = {k: [float(v.double().sum()), v.numel()] for k, v in sd.items()}
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert json.loads(out) == expected
    assert _one_entry(cache).read_bytes() == data
    gets = store.gets("shared.pt")
    assert sum(e.sent for e in gets if e.range != "bytes=0-0") == len(data)  # one download


def test_concurrent_fills_in_threads(store: Store, tmp_path: Path) -> None:
    """Threads of one process filling one key: the lock is per open file (flock), so they
    serialize as processes do: one download, every thread right."""
    sd = _state_dict(14, rows=1024)
    data = _bytes_of(sd, "ckptio")
    url = store.put("threads.pt", data)
    barrier = threading.Barrier(4)
    results: list[Any] = [None] * 4

    def load(i: int) -> None:
        barrier.wait()
        try:
            results[i] = ckptio.load(url, storage_options=store.options, cache_dir=tmp_path)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        assert isinstance(got, dict), got
        _same(got, sd)
    assert _one_entry(tmp_path).read_bytes() == data
    gets = store.gets("threads.pt")
    assert sum(e.sent for e in gets if e.range != "bytes=0-0") == len(data)


def test_killed_fill(store: Store, tmp_path: Path) -> None:
    """A fill killed (SIGKILL) midway leaves its temporary; the next load removes it, fills
    and loads the right tensors."""
    sd = _state_dict(11, rows=1024)
    url = store.put("killed.pt", _bytes_of(sd, "ckptio"))
    cache = tmp_path / "cache"
    holding, release = threading.Event(), threading.Event()

    def before(method: str, path: str, headers: dict) -> None:
        if method == "GET" and _is_data_range(headers.get("Range", "")):
            holding.set()
            release.wait(120)

    store.proxy.before = before
    proc = _child(url, cache, store.options, tmp_path / "ready", tmp_path / "go")
    try:
        (tmp_path / "go").touch()
        while not holding.wait(0.05):
            assert proc.poll() is None, proc.communicate()[1]
        temps = [n for n in _entry_files(cache) if n.endswith(".tmp")]
        assert len(temps) == 1 and str(proc.pid) in temps[0]
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        release.set()
        store.proxy.before = None
    assert proc.returncode == -signal.SIGKILL
    assert not any(n.endswith((".data", ".json")) for n in _entry_files(cache))
    _same(ckptio.load(url, storage_options=store.options, cache_dir=cache), sd)
    _one_entry(cache)  # the temporary is gone
