"""An eager load of a local archive out of the page cache predicts its payload offsets from the
layout instead of reading every local header first (``ArchiveReader(predict=True)``,
``_core.zip.read_zip_directory(predict_cold=True)``), and checks them against the real headers
before the result is kept. A model directory's zip shards are predicted alike, and the whole
directory is read again if one prediction was wrong.

Each test evicts its file with ``posix_fadvise(DONTNEED)`` and checks with ``mincore`` that
its pages left; a file system that keeps them cannot be made cold, and the test says so.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio import _archive, _core
from ckptio.benchmark.limits import evict, evicted

from conftest import assert_same, shift_payload


def _storages() -> dict[str, torch.Tensor]:
    """Records of every kind a layout has: many small ones (a few KiB apart, so their headers
    share reads), large ones, an empty one (no data descriptor), a 0-d one, odd dtypes and a
    non-contiguous view."""
    g = torch.Generator().manual_seed(5)
    sd: dict[str, torch.Tensor] = {}
    for part in range(2):  # the middle of the file far from both ends, as in a real one
        for i in range(150):
            sd[f"small.{part}.{i}"] = torch.randn(1 + (i * 37) % 900, generator=g)
        sd[f"big.{part}"] = torch.randn(400_000, generator=g)
    sd["empty"] = torch.empty(0)
    sd["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    sd["half"] = torch.randn(1000, generator=g).half()
    sd["bool"] = torch.rand(777, generator=g) > 0.5
    sd["int8"] = torch.randint(-128, 127, (513,), dtype=torch.int8, generator=g)
    sd["view"] = torch.randn(64, 48, generator=g).t()
    return sd


def _bytes_of(obj: Any, how: str) -> bytes:
    buf = io.BytesIO()
    (ckptio.save if how == "ckptio" else torch.save)(obj, buf)
    return buf.getvalue()


def _cold(path: Path) -> None:
    """Evicts `path` until none of its pages is resident (a page the kernel was still
    writing back or reading ahead can stay after one try)."""
    for _ in range(5):
        resident = evict(str(path))
        if resident == 0.0:
            return
    if not evicted(resident):
        pytest.skip(f"the file system of {path.parent} keeps the file's pages in the cache")
    raise AssertionError(f"{path}: {resident:.1%} of its pages stay in the page cache")


class _Spy:
    """Records what each eager load's archives predicted and how many were read again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.predicted: list[bool] = []
        self.reopened = 0
        check = _archive.ArchiveReader.check_predictions
        forget = _archive.ArchiveReader.forget_predictions

        def spy_check(archive: _archive.ArchiveReader) -> None:
            self.predicted.append(archive.predicted)
            check(archive)

        def spy_forget(archive: _archive.ArchiveReader) -> None:
            self.reopened += 1  # every reading again starts here
            forget(archive)

        monkeypatch.setattr(_archive.ArchiveReader, "check_predictions", spy_check)
        monkeypatch.setattr(_archive.ArchiveReader, "forget_predictions", spy_forget)


@pytest.mark.parametrize("how", ["ckptio", "torch"])
def test_a_cold_file_is_loaded_with_predicted_offsets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """ckptio's and torch's writers lay records out as predicted: the cold load predicts,
    the check passes, nothing is read twice, and the result is torch.load's."""
    sd = _storages()
    path = tmp_path / "cold.pt"
    path.write_bytes(_bytes_of(sd, how))
    spy = _Spy(monkeypatch)
    _cold(path)
    got = ckptio.load(path)
    assert spy.predicted == [True] and spy.reopened == 0
    assert_same(got, torch.load(path, weights_only=True))
    assert_same(got, sd)


def test_the_prediction_is_the_zip_readers_offsets(tmp_path: Path) -> None:
    """The predicted directory of a cold file equals the one read from its local headers,
    the CRC-32s included; a warm file is read, not predicted."""
    path = tmp_path / "cold.pt"
    path.write_bytes(_bytes_of(_storages(), "ckptio"))
    with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
        prefix, records, crcs = _core.zip.read_zip_directory(f, 2, True)
        warm = _core.zip.read_zip_directory(f, 2, True, predict_cold=True)
        assert warm == (prefix, records, crcs, False)
        _cold(path)
        cold = _core.zip.read_zip_directory(f, 2, False, predict_cold=True)
        assert cold == (prefix, records, None, True)


def test_a_warm_file_and_a_mapping_are_not_predicted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = _storages()
    path = tmp_path / "warm.pt"
    path.write_bytes(_bytes_of(sd, "ckptio"))
    spy = _Spy(monkeypatch)
    assert_same(ckptio.load(path), sd)
    _cold(path)
    assert_same(ckptio.load(path, mmap=True), sd)
    assert spy.predicted == [False, False] and spy.reopened == 0


@pytest.mark.parametrize("verify", [False, True])
def test_a_wrong_prediction_is_caught_and_the_file_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    """A valid archive with one local header no writer writes (a shorter extra field, its
    payload moved): the prediction reads the wrong bytes for that record, the check catches
    it, and the file is read again with its headers: torch.load's result, with or without
    verify (whose CRC check of the mispredicted record fails first)."""
    sd = _storages()
    with ckptio.options(write_crc32=True):
        data = shift_payload(_bytes_of(sd, "ckptio"), "archive/data/150", 64)
    path = tmp_path / "cold.pt"
    path.write_bytes(data)
    expected = torch.load(path, weights_only=True)  # the oracle: a valid file
    assert_same(expected, sd)
    spy = _Spy(monkeypatch)
    _cold(path)
    with ckptio.options(verify=verify):
        got = ckptio.load(path)
    assert spy.predicted[0] is True and spy.reopened == 1
    assert_same(got, expected)


def test_a_misplaced_metadata_record_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.pkl itself mispredicted: its predicted bytes are not the pickle, the error that
    leads to is dropped for the check's verdict, and the file is read again."""
    sd = _storages()
    data = shift_payload(_bytes_of(sd, "ckptio"), "archive/data.pkl", 32)
    path = tmp_path / "cold.pt"
    path.write_bytes(data)
    assert_same(torch.load(path, weights_only=True), sd)
    spy = _Spy(monkeypatch)
    _cold(path)
    assert_same(ckptio.load(path), sd)
    assert spy.predicted[0] is True and spy.reopened == 1


def test_a_local_header_naming_another_record_is_refused_cold(tmp_path: Path) -> None:
    """A header the prediction skipped is still checked: one that names another record gets
    the zip reader's CheckpointError, as when the file is warm."""
    data = bytearray(_bytes_of(_storages(), "ckptio"))
    h = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("archive/data/40").header_offset
    data[h + 30 + len("archive/data/")] ^= 0x01  # "40" -> "50"
    path = tmp_path / "cold.pt"
    path.write_bytes(data)
    _cold(path)
    with pytest.raises(ckptio.CheckpointError, match="names a different record"):
        ckptio.load(path)
    with pytest.raises(ckptio.CheckpointError, match="names a different record"):
        ckptio.load(path)  # warm: the same refusal


def _rename(data: bytes, name: str, at: int, byte: int) -> bytes:
    """`data` with byte `at` of record `name`'s name set to `byte`, in its local header and
    in the central directory alike (a damaged name, consistent in both)."""
    out = bytearray(data)
    z = zipfile.ZipFile(io.BytesIO(data))
    h = z.getinfo(name).header_offset
    out[h + 30 + at] = byte
    pos = data.find(name.encode(), z.start_dir)
    assert pos > 0
    out[pos + at] = byte
    return bytes(out)


@pytest.mark.parametrize("cold", [True, False])
@pytest.mark.parametrize("name", ["archive/.data/serialization_id", "archive/data/40"])
def test_a_record_name_that_is_not_utf8_is_refused(tmp_path: Path, cold: bool, name: str) -> None:
    """Writers store names in UTF-8; a damaged one (the same in both headers) gets a
    CheckpointError naming the record, cold (whose offsets are predicted) and warm alike,
    never a UnicodeDecodeError. torch.load refuses these files too."""
    path = tmp_path / "damaged.pt"
    path.write_bytes(_rename(_bytes_of(_storages(), "ckptio"), name, 9, 0xFF))
    with pytest.raises(UnicodeDecodeError):
        torch.load(path, weights_only=True)
    if cold:
        _cold(path)
    with pytest.raises(ckptio.CheckpointError, match="is not UTF-8"):
        ckptio.load(path)


# ------------------------------------------------------------------------- model directories
def _sharded_storages() -> dict[str, torch.Tensor]:
    """About 2.6 MB of small records, so that each of 3 shards of 1 MB has many header
    groups (a shard of one large record has one header read to save, and is not predicted)."""
    g = torch.Generator().manual_seed(6)
    sd = {f"w.{i}": torch.randn(1000 + (i * 37) % 900, generator=g) for i in range(450)}
    sd["empty"] = torch.empty(0)
    sd["view"] = torch.randn(64, 48, generator=g).t()
    return sd


def _torch_directory(tmp_path: Path, how: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A directory of 3 torch zip shards with an index: written by ckptio, or by
    huggingface_hub (whose shards torch.save writes)."""
    sd = _sharded_storages()
    d = tmp_path / how
    if how == "ckptio":
        ckptio.save(sd, d, max_shard_size=1_000_000, format="torch")
    else:
        hub = pytest.importorskip("huggingface_hub")
        d.mkdir()
        hub.save_torch_state_dict(sd, d, max_shard_size=1_000_000, safe_serialization=False)
    assert len(list(d.glob("*.bin"))) == 3
    return d, sd


def _same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same tensors (a directory's order is its index's, not the state dict's)."""
    assert sorted(got) == sorted(expected)
    assert_same({k: got[k] for k in expected}, expected)


def _cold_directory(d: Path) -> None:
    for path in d.iterdir():
        _cold(path)


@pytest.mark.parametrize("how", ["ckptio", "huggingface_hub"])
def test_a_cold_directory_is_loaded_with_predicted_offsets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Every zip shard of a cold directory is predicted, every prediction holds, nothing is
    read twice; a warm directory and a mapped one are read, not predicted."""
    d, sd = _torch_directory(tmp_path, how)
    spy = _Spy(monkeypatch)
    _cold_directory(d)
    _same_tensors(ckptio.load(d), sd)
    assert spy.predicted == [True] * 3 and spy.reopened == 0
    spy.predicted.clear()
    _same_tensors(ckptio.load(d), sd)  # warm now
    _cold_directory(d)
    _same_tensors(ckptio.load(d, mmap=True), sd)
    assert spy.predicted == [False] * 3 and spy.reopened == 0


def _shift_in_shard(d: Path, record: str) -> Path:
    """A shard of `d` whose record `record` (archive-relative) has room to move, with its
    payload moved by all of its padding (:func:`shift_payload`); a valid directory still."""
    for shard in sorted(d.glob("*.bin")):
        data = shard.read_bytes()
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        name = names[0].split("/", 1)[0] + "/" + record
        if name not in names:
            continue
        h = zipfile.ZipFile(io.BytesIO(data)).getinfo(name).header_offset
        n, m = struct.unpack_from("<HH", data, h + 26)
        if m >= 4 + 4:  # at least 4 bytes of padding
            shard.write_bytes(shift_payload(data, name, m - 4))
            return shard
    raise AssertionError(f"no shard's {record} has room to move")


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("record", ["data/1", "data.pkl"])
def test_a_wrong_prediction_in_one_shard_reads_the_directory_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: str, verify: bool
) -> None:
    """One shard's record (a storage, or its data.pkl, whose wrong bytes make unpickling
    fail) laid out as no writer does: the check catches it, the directory is read again
    with every header read, and the result is what torch.load gives shard by shard, with
    or without verify."""
    sd = _sharded_storages()
    d = tmp_path / "dir"
    with ckptio.options(write_crc32=True):
        ckptio.save(sd, d, max_shard_size=1_000_000, format="torch")
    shard = _shift_in_shard(d, record)
    expected: dict[str, torch.Tensor] = {}
    for path in sorted(d.glob("*.bin")):
        expected.update(torch.load(path, weights_only=True))  # the oracle: valid shards
    _same_tensors(expected, sd)
    spy = _Spy(monkeypatch)
    _cold(shard)
    with ckptio.options(verify=verify):
        got = ckptio.load(d)
    assert True in spy.predicted and spy.reopened >= 1
    _same_tensors(got, expected)
