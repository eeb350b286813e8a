"""Every file object torch.load reads, ckptio reads the same way.

* Only objects whose bytes are their descriptor's bytes take the descriptor fast path:
  ``gzip.open``, ``bz2.open`` and ``lzma.open`` hand out the compressed file's descriptor, so
  they are read through their own ``read``, for zip, legacy and safetensors content alike, by
  ``load`` (eager, with map_location), ``load_into``; ``ckptio.open`` refuses them clearly.
* Streams that cannot seek (a pipe, a socket, an object with only ``read``) get torch.load's
  error: its exception type (and a pipe's errno), with torch's advice to use io.BytesIO.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import lzma
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import ckptio
from ckptio import _core, _files

from conftest import assert_same

OPENERS: dict[str, Callable[..., Any]] = {"gzip": gzip.open, "bz2": bz2.open, "lzma": lzma.open}
FORMATS = ["zip", "legacy", "safetensors"]
MAP_LOCATIONS: dict[str, Any] = {
    "none": None,
    "cpu": "cpu",
    "device": torch.device("cpu"),
    "callable": lambda storage, location: storage,
}


def _obj() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(8, 16, generator=g),
        "b": torch.arange(16, dtype=torch.int64),
        "h": torch.randn(3, 5, generator=g).half(),
    }


def _write(f: Any, fmt: str) -> None:
    if fmt == "zip":
        torch.save(_obj(), f)
    elif fmt == "legacy":
        torch.save(_obj(), f, _use_new_zipfile_serialization=False)
    else:
        ckptio.save(_obj(), f, format="safetensors")


def _plain(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"plain-{fmt}.pt"
    with open(path, "wb") as f:
        _write(f, fmt)
    return path


def _compressed(tmp_path: Path, fmt: str, kind: str) -> Path:
    # The bytes are written uncompressed first: torch.save's legacy format writes storages
    # through fileno(), into the compressed file's descriptor.
    buf = io.BytesIO()
    _write(buf, fmt)
    path = tmp_path / f"ckpt-{fmt}.pt.{kind}"
    with OPENERS[kind](path, "wb") as f:
        f.write(buf.getvalue())
    return path


def _expected(tmp_path: Path, fmt: str, map_location: Any) -> Any:
    plain = _plain(tmp_path, fmt)
    if fmt == "safetensors":  # torch.load does not read safetensors: the path is the oracle
        return ckptio.load(plain, map_location=map_location)
    return torch.load(plain, map_location=map_location)


def _sorted(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(obj.items()))


# ---------------------------------------------------------------------- compressed objects
@pytest.mark.parametrize("map_location", list(MAP_LOCATIONS), ids=list(MAP_LOCATIONS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(OPENERS))
def test_load_reads_compressed_objects_through_read(
    tmp_path: Path, kind: str, fmt: str, map_location: str
) -> None:
    ml = MAP_LOCATIONS[map_location]
    path = _compressed(tmp_path, fmt, kind)
    with OPENERS[kind](path, "rb") as f:
        ours = ckptio.load(f, map_location=ml)
    assert_same(_expected(tmp_path, fmt, ml), ours)
    assert_same(_sorted(_obj()), _sorted(ours))
    if fmt == "zip" or (fmt == "legacy" and kind == "gzip"):
        # torch reads these itself (bz2 and lzma legacy files it reads through the
        # compressed descriptor, and fails): the same result.
        with OPENERS[kind](path, "rb") as f:
            assert_same(torch.load(f, map_location=ml), ours)


@pytest.mark.parametrize("kind", list(OPENERS))
def test_load_with_weights_only_false_reads_compressed_objects(tmp_path: Path, kind: str) -> None:
    for fmt in ("zip", "legacy"):
        path = _compressed(tmp_path, fmt, kind)
        with OPENERS[kind](path, "rb") as f:
            assert_same(_obj(), ckptio.load(f, weights_only=False))


@pytest.mark.parametrize("kind", list(OPENERS))
def test_compressed_object_left_where_torch_leaves_it_for_a_second_legacy_load(
    tmp_path: Path, kind: str
) -> None:
    """Legacy files read as a stream: two saved back to back load one after the other."""
    buf = io.BytesIO()
    torch.save({"first": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    torch.save({"second": torch.zeros(3)}, buf, _use_new_zipfile_serialization=False)
    path = tmp_path / f"two.{kind}"
    with OPENERS[kind](path, "wb") as f:
        f.write(buf.getvalue())
    with OPENERS[kind](path, "rb") as f:
        assert_same({"first": torch.ones(2)}, ckptio.load(f))
        assert_same({"second": torch.zeros(3)}, ckptio.load(f))


@pytest.mark.parametrize("kind", list(OPENERS))
def test_load_into_reads_compressed_objects(tmp_path: Path, kind: str) -> None:
    path = _compressed(tmp_path, "zip", kind)
    target = {k: torch.zeros_like(v) for k, v in _obj().items()}
    with OPENERS[kind](path, "rb") as f:
        keys = ckptio.load_into(target, f)
    assert keys == ([], [])
    assert_same(_obj(), target)


@pytest.mark.parametrize("kind", list(OPENERS))
def test_open_refuses_compressed_objects(tmp_path: Path, kind: str) -> None:
    path = _compressed(tmp_path, "zip", kind)
    with OPENERS[kind](path, "rb") as f, pytest.raises(TypeError, match="pread"):
        ckptio.open(f)


# ------------------------------------------------------------------- the descriptor fast path
def test_fast_path_only_for_objects_whose_bytes_are_the_descriptors(tmp_path: Path) -> None:
    path = _plain(tmp_path, "zip")
    gz = _compressed(tmp_path, "zip", "gzip")
    with open(path, "rb") as buffered, open(path, "rb", buffering=0) as raw:
        for f in (buffered, raw):
            file = _files.descriptor_file(f)
            assert isinstance(file, _core.io.File)
            file.close()
    with open(path, "r+b") as rw:
        file = _files.descriptor_file(rw)
        assert isinstance(file, _core.io.File)
        file.close()
    with tempfile.NamedTemporaryFile(dir=tmp_path) as named:
        named.write(path.read_bytes())
        named.seek(0)
        file = _files.descriptor_file(named)
        assert isinstance(file, _core.io.File)
        file.close()
        assert_same(_obj(), ckptio.load(named))
    with gzip.open(gz, "rb") as g, open(path, "rb") as moved:
        moved.seek(1)
        for f in (g, io.BytesIO(path.read_bytes()), moved):
            assert _files.descriptor_file(f) is None


def test_objects_positioned_past_a_prefix_load_from_their_position(tmp_path: Path) -> None:
    """As torch.load: the checkpoint starts at the object's position."""
    for fmt in ("zip", "legacy"):
        path = tmp_path / f"prefixed-{fmt}.bin"
        with open(path, "wb") as f:
            f.write(b"HEADER")
            _write(f, fmt)
        packed = io.BytesIO(gzip.compress(path.read_bytes()))
        for f in (open(path, "rb"), gzip.GzipFile(fileobj=packed)):
            with f:
                f.seek(6)
                try:
                    theirs = torch.load(f)
                except RuntimeError as e:
                    # torch 2.5 looks for the zip's end record from the stream's start
                    assert fmt == "zip" and "failed finding central directory" in str(e)
                    theirs = _obj()
                f.seek(6)
                assert_same(theirs, ckptio.load(f))
        with open(path, "rb") as f:
            f.seek(6)
            with pytest.raises(TypeError, match="start"):
                ckptio.open(f)


def test_open_reads_plain_file_objects(tmp_path: Path) -> None:
    path = _plain(tmp_path, "zip")
    with open(path, "rb") as f, ckptio.open(f) as ck:
        assert_same(_obj()["w"], ck["w"])


# ---------------------------------------------------------------------- streams that can't seek
def _pipe(data: bytes, buffering: int = -1) -> Any:
    r, w = os.pipe()
    assert len(data) < 16384  # fits the pipe's buffer: no writer thread needed
    os.write(w, data)
    os.close(w)
    return open(r, "rb", buffering=buffering)


def _socket(data: bytes) -> Any:
    a, b = socket.socketpair()
    b.sendall(data)
    b.close()
    f = a.makefile("rb")
    a.close()  # the file object holds the socket open
    return f


class _ReadOnly:
    def __init__(self, data: bytes) -> None:
        self._b = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._b.read(n)


class _NoTell(_ReadOnly):
    def readline(self) -> bytes:
        return self._b.readline()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._b.seek(offset, whence)


STREAMS: dict[str, Callable[[bytes], Any]] = {
    "pipe": _pipe,
    "pipe-unbuffered": lambda data: _pipe(data, 0),
    "socket": _socket,
    "read-only": _ReadOnly,
    "no-tell": _NoTell,
}


def _small(fmt: str) -> bytes:
    buf = io.BytesIO()
    obj = {"a": torch.arange(4.0)}
    if fmt == "legacy":
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
    else:
        torch.save(obj, buf)
    return buf.getvalue()


def _closing(f: Any) -> None:
    close = getattr(f, "close", None)
    if close is not None:
        close()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("stream", list(STREAMS))
def test_streams_that_cannot_seek_get_torchs_error(stream: str, fmt: str) -> None:
    data = _small(fmt)
    theirs_f, ours_f = STREAMS[stream](data), STREAMS[stream](data)
    try:
        with pytest.raises(Exception) as theirs:
            torch.load(theirs_f)
        with pytest.raises(Exception) as ours:
            ckptio.load(ours_f)
    finally:
        _closing(theirs_f)
        _closing(ours_f)
    assert type(ours.value) is type(theirs.value)
    assert not isinstance(ours.value, ckptio.CheckpointError)
    assert "seekable" in str(ours.value) and "BytesIO" in str(ours.value)
    if isinstance(theirs.value, OSError) and theirs.value.errno is not None:
        assert ours.value.errno == theirs.value.errno == errno.ESPIPE  # type: ignore[attr-defined]


@pytest.mark.parametrize("stream", list(STREAMS))
def test_load_into_and_open_refuse_streams_that_cannot_seek(stream: str) -> None:
    data = _small("zip")
    f = STREAMS[stream](data)
    try:
        with pytest.raises((OSError, AttributeError)) as e:
            ckptio.load_into({"a": torch.zeros(4)}, f)
        assert "seekable" in str(e.value)
    finally:
        _closing(f)
    f = STREAMS[stream](data)
    try:
        with pytest.raises(TypeError, match="pread"):
            ckptio.open(f)
    finally:
        _closing(f)


def test_streams_read_into_bytesio_load_as_torch_advises() -> None:
    data = _small("zip")
    for stream in STREAMS.values():
        f = stream(data)
        try:
            buf = io.BytesIO(f.read())
        finally:
            _closing(f)
        assert_same(torch.load(io.BytesIO(buf.getvalue())), ckptio.load(buf))


def test_text_mode_files_and_non_files() -> None:
    with pytest.raises(AttributeError) as theirs:
        torch.load(42)  # type: ignore[arg-type]
    with pytest.raises(AttributeError) as ours:
        ckptio.load(42)  # type: ignore[arg-type]
    assert str(theirs.value).split(".")[0] == str(ours.value).split(".")[0]
