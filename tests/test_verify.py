"""Verified bytes (docs/verify.md): CRC-32s recorded on save, checked while reading on every
path (eager, mmap, open, load_into, the staging ring), manifests, and nothing extra when off."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import ckptio
from _simulated_copier import SimulatedCopier
from ckptio import _core, _staging, _verify
from ckptio._staging import DeviceTarget

from conftest import same_values

BIG = 300_000  # float32 elements: a 1.2 MB storage, read on its own (not the small block)


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(BIG, generator=g),
        "small": torch.randn(100, generator=g),
        "tied": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "empty": torch.zeros(0),
        "epoch": 3,
    }


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.pt"
    state = _state()
    state["view"] = state["tied"][1]  # a view: the same record as "tied"
    with ckptio.options(write_crc32=True):
        ckptio.save(state, path)
    return path


def _flip(path: Path, tensor: torch.Tensor, at: int = 0) -> None:
    """Flips one bit of `tensor`'s bytes where they lie in the file at `path`."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().numpy().tobytes()
    offset = data.find(raw[:64])
    assert offset > 0 and data.find(raw[:64], offset + 1) == -1
    data[offset + at] ^= 0x10
    path.write_bytes(bytes(data))


def _expect_corrupt(tensor_name: str, path: Path) -> Any:
    return pytest.raises(ckptio.CheckpointError, match=rf"{path}.*{tensor_name}.*CRC-32")


# ---------------------------------------------------------------------------- writing CRCs
def test_crcs_written_by_ckptio_are_zlibs(tmp_path: Path) -> None:
    state = _state()
    with ckptio.options(write_crc32=True):
        ckptio.save(state, tmp_path / "a.pt")
        buf = io.BytesIO()
        ckptio.save(state, buf)
        ckptio.async_save(state, tmp_path / "b.pt").result()
    (tmp_path / "c.pt").write_bytes(buf.getvalue())
    for name in ("a.pt", "b.pt", "c.pt"):
        with zipfile.ZipFile(tmp_path / name) as z:
            assert z.testzip() is None
            for info in z.infolist():
                assert info.CRC == zlib.crc32(z.read(info))
        loaded = torch.load(tmp_path / name, weights_only=True)  # stock torch still reads it
        assert torch.equal(loaded["big"], state["big"])


def test_former_option_name_and_default(tmp_path: Path) -> None:
    assert ckptio.get_options().write_crc32 is False  # measured > 10% of save time
    with ckptio.options(crc32=True) as opts:  # the former name
        assert opts.write_crc32 is True and opts.crc32 is True
        ckptio.save(_state(), tmp_path / "a.pt")
    assert zipfile.ZipFile(tmp_path / "a.pt").testzip() is None
    with pytest.raises(TypeError, match="former name"):
        with ckptio.options(crc32=True, write_crc32=False):
            pass


@pytest.mark.filterwarnings(
    "ignore:torch.distributed is (disabled, )?unavailable or uninitialized:UserWarning"
)
def test_dcp_writer_files_carry_crcs(tmp_path: Path) -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    state = {"w": torch.randn(1000), "b": torch.randn(10)}
    with ckptio.options(write_crc32=True):
        dcp.save(state, storage_writer=ckptio.dcp.Writer(tmp_path / "d"))
    files = [p for p in (tmp_path / "d").iterdir() if p.suffix == ".ckptio"]
    assert files
    for p in files:
        with zipfile.ZipFile(p) as z:
            assert z.testzip() is None
            assert any(i.CRC for i in z.infolist() if i.file_size)


@pytest.mark.filterwarnings(
    "ignore:torch.distributed is (disabled, )?unavailable or uninitialized:UserWarning"
)
def test_dcp_reader_checks(tmp_path: Path) -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    state = {"w": torch.randn(BIG), "b": torch.randn(10)}
    with ckptio.options(write_crc32=True):
        dcp.save(state, storage_writer=ckptio.dcp.Writer(tmp_path / "d"))
    target = {"w": torch.empty(BIG), "b": torch.empty(10)}
    dcp.load(target, storage_reader=ckptio.dcp.Reader(tmp_path / "d", verify=True))
    assert torch.equal(target["w"], state["w"])
    (f,) = [p for p in (tmp_path / "d").iterdir() if p.suffix == ".ckptio"]
    _flip(f, state["w"], at=5)
    # torch's loader wraps what a reader raises in a CheckpointException, message and all
    failed = (ckptio.CheckpointError, dcp.api.CheckpointException)
    with pytest.raises(failed, match=rf"{f}: record .* fails its CRC-32 check"):
        dcp.load(target, storage_reader=ckptio.dcp.Reader(tmp_path / "d", verify=True))
    with ckptio.options(verify=True):  # the setting
        with pytest.raises(failed, match="fails its CRC-32 check"):
            dcp.load(target, storage_reader=ckptio.dcp.Reader(tmp_path / "d"))
    dcp.load(target, storage_reader=ckptio.dcp.Reader(tmp_path / "d"))  # unverified


# ------------------------------------------------------------------------- verifying reads
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_intact_file_verifies(saved: Path, mmap: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ckptio.load(saved, mmap=mmap, verify=True)
    assert torch.equal(out["big"], _state()["big"])


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("which", ["big", "small"])
def test_flipped_byte_fails_naming_file_and_tensor(saved: Path, mmap: bool, which: str) -> None:
    _flip(saved, _state()[which], at=7)
    with _expect_corrupt(f"'{which}'", saved):
        ckptio.load(saved, mmap=mmap, verify=True)
    ckptio.load(saved, mmap=mmap)  # unverified, as torch.load: loads the wrong bytes


def test_the_setting_and_its_environment_variable(saved: Path) -> None:
    _flip(saved, _state()["big"])
    with ckptio.options(verify=True):
        with _expect_corrupt("'big'", saved):
            ckptio.load(saved)
        ckptio.load(saved, verify=False)  # the argument wins
    import json
    import os
    import subprocess
    import sys

    code = (
        "import ckptio, json, sys\n"
        "try:\n    ckptio.load(sys.argv[1])\nexcept ckptio.CheckpointError as e:\n"
        "    print(json.dumps(str(e)))\n"
    )
    env = {**os.environ, "CKPTIO_VERIFY": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(saved)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "CRC-32" in json.loads(proc.stdout)


def test_a_view_names_every_tensor_of_its_record(saved: Path) -> None:
    _flip(saved, _state()["tied"], at=1)
    with pytest.raises(ckptio.CheckpointError, match=r"tensors 'tied', 'view'"):
        ckptio.load(saved, verify=True)


def test_open_checks_whole_and_partial_reads(saved: Path) -> None:
    _flip(saved, _state()["big"], at=4 * (BIG - 10))  # near the end of the record
    with ckptio.open(saved, verify=True) as h:
        assert torch.equal(h["small"], _state()["small"])
        with _expect_corrupt("'big'", saved):
            h["big"]
        with _expect_corrupt("'big'", saved):
            h.get_slice("big")[0:10]  # the slice is intact; its record is read again whole
    with ckptio.open(saved) as h:
        h.get_slice("big")[0:10]  # unverified


def test_load_into_checks(saved: Path) -> None:
    _flip(saved, _state()["big"], at=100)
    target = {k: torch.empty_like(v) for k, v in _state().items() if isinstance(v, torch.Tensor)}
    target["view"] = torch.empty(4, dtype=torch.int64)
    with pytest.raises(ckptio.CheckpointError, match=rf"{saved}.*data/.*CRC-32"):
        ckptio.load_into(target, saved, verify=True)
    ckptio.load_into(target, saved)


@pytest.fixture
def staged_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SimulatedCopier]]:
    """CPU storages of loads go through the pinned-ring pipeline with a simulated copier
    (late copies on a thread of its own): small ring buffers, so a record spans fills."""
    made: list[SimulatedCopier] = []

    def copier() -> SimulatedCopier:
        made.append(SimulatedCopier(delay=0.0005))
        return made[-1]

    def target(location: str) -> DeviceTarget | None:
        return DeviceTarget(torch.device("cpu"), copier) if location == "cpu" else None

    monkeypatch.setattr(_staging, "staging_target", target)
    with ckptio.options(staging_buffer_bytes=256 << 10, staging_buffers=2):
        yield made
    for c in made:
        assert c.violations == []
        c.close()


def test_staged_load_checks_on_the_pinned_slot(
    saved: Path, staged_cpu: list[SimulatedCopier], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = ckptio.load(saved, verify=True)  # intact: the record's pieces combine to its CRC
    assert torch.equal(out["big"], _state()["big"]) and staged_cpu
    _flip(saved, _state()["big"], at=4 * (BIG // 2))
    with _expect_corrupt("'big'", saved):
        ckptio.load(saved, verify=True)


def test_reads_into_existing_device_memory_through_the_ring(
    saved: Path, cpu_ring: list[Any]
) -> None:
    """What load_into does for tensors on a staged device (CUDA; the CPU stands in through
    the copier_for hook): ReadBatch.to_device streams the record through the pinned ring,
    checked piece by piece on the slots."""
    from ckptio import _archive, _reads

    def read(path: Path) -> torch.Tensor:
        out = torch.empty(BIG)
        with ckptio.options(verify=True, staging_buffer_bytes=256 << 10):
            with _core.io.File.open(str(path), _core.io.FileMode.READ) as f:
                archive = _archive.ArchiveReader(f)
                offset, size, _ = archive.records["data/0"]
                batch = _reads.ReadBatch(f)
                assert batch.stages(out.device)
                batch.to_device(offset, size, out)
                batch.run()
        return out

    assert torch.equal(read(saved), _state()["big"]) and cpu_ring
    _flip(saved, _state()["big"], at=4 * (BIG - 1))
    with pytest.raises(ckptio.CheckpointError, match=rf"{saved}: record 'data/0'.*CRC-32"):
        read(saved)


def test_torch_save_files_verify_and_a_flipped_byte_fails(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save(_state(), path)  # torch records real CRC-32s
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mmap in (False, True):
            ckptio.load(path, mmap=mmap, verify=True)
    _flip(path, _state()["small"], at=3)
    for mmap in (False, True):
        with _expect_corrupt("'small'", path):
            ckptio.load(path, mmap=mmap, verify=True)


def test_data_pkl_is_checked(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    at = data.find(b"epoch")
    data[at] ^= 0x20  # "Epoch": a valid pickle, wrong bytes
    saved.write_bytes(bytes(data))
    with pytest.raises(ckptio.CheckpointError, match="record 'data.pkl'"):
        ckptio.load(saved, verify=True)


# ---------------------------------------------------------------- files without CRC-32s
def test_a_file_without_crcs_loads_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    ckptio.save(_state(), path)  # write_crc32 off: every CRC is 0
    with pytest.warns(ckptio.UnverifiedWarning, match="records no CRC-32s"):
        out = ckptio.load(path, verify=True)
    assert torch.equal(out["big"], _state()["big"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckptio.UnverifiedWarning)
        with pytest.raises(ckptio.UnverifiedWarning):
            ckptio.load(path, verify=True)


def _zero_central_crc(path: Path, record: str) -> None:
    """Sets the CRC the central directory declares for `record` to 0."""
    data = bytearray(path.read_bytes())
    name = record.encode()
    at = data.rfind(b"PK\x01\x02", 0, data.rfind(name))
    struct.pack_into("<I", data, at + 16, 0)
    path.write_bytes(bytes(data))


def test_a_zero_crc_among_recorded_ones_is_checked(saved: Path) -> None:
    """0 is a CRC like any other in a file that recorded CRCs: a record declaring 0 whose
    bytes have another CRC is corrupt, not "unrecorded"."""
    _zero_central_crc(saved, "ckpt/data/0")
    with pytest.raises(ckptio.CheckpointError, match=r"stored 00000000"):
        ckptio.load(saved, verify=True)


# ------------------------------------------------------------------ nothing extra when off
def test_verify_off_costs_nothing_extra(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_init = _verify.RecordChecker.__init__
    real_check = _verify.RecordChecker.check_reads

    def init(self: Any, *a: Any, **k: Any) -> None:
        calls.append("checker")
        real_init(self, *a, **k)

    def check(self: Any, *a: Any, **k: Any) -> bool:
        calls.append("check_reads")
        return real_check(self, *a, **k)

    monkeypatch.setattr(_verify.RecordChecker, "__init__", init)
    monkeypatch.setattr(_verify.RecordChecker, "check_reads", check)
    real_dir = _core.zip.read_zip_directory
    asked: list[bool] = []

    def read_dir(source: Any, threads: int = 1, crcs: bool = False, **predict: bool) -> Any:
        asked.append(crcs)
        return real_dir(source, threads, crcs, **predict)

    monkeypatch.setattr(_core.zip, "read_zip_directory", read_dir)
    ckptio.load(saved)
    ckptio.load(saved, mmap=True)
    with ckptio.open(saved) as h:
        h["big"]
    assert calls == [] and asked and not any(asked)
    ckptio.load(saved, verify=True)
    assert calls.count("checker") == 1 and "check_reads" in calls and asked[-1] is True


# -------------------------------------------------------------------------------- manifests
def test_manifest_round_trip_and_corruption(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    (d / "a.safetensors").write_bytes(b"x" * 100_000)
    (d / "sub").mkdir()
    (d / "sub" / "b.bin").write_bytes(b"")
    parts = [(zlib.crc32(b"x" * 60_000), 60_000), (zlib.crc32(b"x" * 40_000), 40_000)]
    entries = [
        _verify.manifest_entry("a.safetensors", 100_000, _verify.combine(parts)),
        _verify.manifest_entry("sub/b.bin", *_verify.file_crc32(d / "sub" / "b.bin")),
    ]
    assert entries[0][1] == {"size": 100_000, "crc32": f"{zlib.crc32(b'x' * 100_000):08x}"}
    path = _verify.write_manifest(d, entries)
    assert path == str(d / _verify.MANIFEST_NAME)
    assert _verify.check_manifest(d) == 2
    assert _verify.read_manifest(path)["a.safetensors"] == (100_000, zlib.crc32(b"x" * 100_000))
    (d / "a.safetensors").write_bytes(b"x" * 99_999 + b"y")
    with pytest.raises(ckptio.CheckpointError, match=r"a.safetensors.*CRC-32"):
        _verify.check_manifest(d)
    (d / "a.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(ckptio.CheckpointError, match="10 bytes where the manifest says 100000"):
        _verify.check_manifest(d)
    (d / "a.safetensors").unlink()
    with pytest.raises(ckptio.CheckpointError, match="which is missing"):
        _verify.check_manifest(d)


def test_manifest_beside_a_single_file(tmp_path: Path) -> None:
    f = tmp_path / "m.safetensors"
    ckptio.save({"w": torch.randn(1000)}, f, format="safetensors")
    _verify.write_manifest(
        tmp_path,
        [_verify.manifest_entry(f.name, *_verify.file_crc32(f))],
        name=f.name + _verify.MANIFEST_SUFFIX,
    )
    assert _verify.check_manifest(f) == 1
    with pytest.raises(ckptio.CheckpointError, match="no manifest"):
        _verify.check_manifest(tmp_path / "other.safetensors")


@pytest.mark.parametrize(
    "doc, message",
    [
        ("[]", "not a ckptio manifest"),
        (
            '{"format": "ckptio.manifest", "version": 2, "algorithm": "crc32", "files": {}}',
            "version 2",
        ),
        (
            '{"format": "ckptio.manifest", "version": 1, "algorithm": "crc32", "files": '
            '{"../x": {"size": 1, "crc32": "00"}}}',
            "malformed",
        ),
        (
            '{"format": "ckptio.manifest", "version": 1, "algorithm": "crc32", "files": '
            '{"x": {"size": -1, "crc32": "00"}}}',
            "malformed",
        ),
        ("{", "not a ckptio manifest"),
    ],
    ids=["not-object", "version", "dotdot", "negative-size", "json"],
)
def test_malformed_manifests(tmp_path: Path, doc: str, message: str) -> None:
    (tmp_path / _verify.MANIFEST_NAME).write_text(doc)
    with pytest.raises(ckptio.CheckpointError, match=message):
        _verify.check_manifest(tmp_path)


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "./a"])
def test_manifest_entry_refuses_unsafe_names(name: str) -> None:
    with pytest.raises(ValueError, match="relative path"):
        _verify.manifest_entry(name, 1, 0)


@pytest.mark.parametrize("staged", [False, True], ids=["host", "ring"])
def test_write_placed_returns_the_files_crc(
    tmp_path: Path, staged: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest a manifest records, computed from the buffers written (device payloads on
    the pinned slots), equals zlib's CRC-32 of the file, into a File and a file object."""
    from ckptio import _writer

    if staged:
        monkeypatch.setattr(_staging, "copier_for", lambda d: _staging.TorchCopier(d))
    tensors = [torch.randn(70_000), torch.zeros(0), torch.arange(33, dtype=torch.int8)]
    copiers: dict[Any, Any] = {}
    payloads: list[Any] = [b"head"]
    keep = []
    for t in tensors:
        payload, held = _writer.tensor_payload(t, copiers)
        payloads.append(payload)
        keep.append(held)
    placed, at = [], 0
    for p in payloads:
        placed.append((at, p))
        at += _writer.payload_size(p)
    if staged:
        assert isinstance(payloads[1], _writer.DevicePayload)
    path = tmp_path / "f.bin"
    with _core.io.File.open(str(path), _core.io.FileMode.CREATE) as f:
        crc = _writer.write_placed(f, placed, at, file_crc32=True)
    assert crc == zlib.crc32(path.read_bytes())
    buf = io.BytesIO()
    assert _writer.write_placed(buf, placed, at, file_crc32=True) == crc
    assert buf.getvalue() == path.read_bytes()
    with _core.io.File.open(str(tmp_path / "g.bin"), _core.io.FileMode.CREATE) as f:
        assert _writer.write_placed(f, placed, at) is None


@pytest.mark.parametrize("destination", ["file", "bytesio"])
@pytest.mark.parametrize("staged", [False, True], ids=["host", "ring"])
@pytest.mark.parametrize("record_crcs", [False, True], ids=["zeros", "record-crcs"])
def test_torch_archive_writer_returns_the_files_crc(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    destination: str,
    staged: bool,
    record_crcs: bool,
) -> None:
    """The CRC-32 of a whole torch archive that its writer combines from the regions it
    writes (local headers, padding, payloads split into pieces or grouped, descriptors with
    or without record CRCs, central directory, end records) is zlib's CRC-32 of the file:
    into a File (storages written while pickling, or reserved and streamed through the ring)
    and into a file object."""
    import pickle
    import sys

    from ckptio import _writer

    if staged:
        monkeypatch.setattr(_staging, "copier_for", lambda d: _staging.TorchCopier(d))
    state = _state()

    def save(file_crc32: bool) -> tuple[int | None, bytes]:
        args = ("archive", state, pickle, 2)
        with ckptio.options(write_crc32=record_crcs, write_chunk_bytes=256 << 10):
            if destination == "bytesio":
                buf = io.BytesIO()
                crc = _writer.save_object(
                    buf, *args, byteorder=sys.byteorder, file_crc32=file_crc32
                )
                return crc, buf.getvalue()
            path = tmp_path / "a.pt"
            with _core.io.File.open(str(path), _core.io.FileMode.CREATE) as f:
                crc = _writer.save_object(f, *args, byteorder=sys.byteorder, file_crc32=file_crc32)
            return crc, path.read_bytes()

    crc, data = save(file_crc32=True)
    assert crc == zlib.crc32(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert any(i.CRC for i in z.infolist()) == record_crcs
        if record_crcs:
            assert z.testzip() is None
    out = torch.load(io.BytesIO(data))
    assert torch.equal(out["big"], state["big"]) and out["epoch"] == 3
    assert save(file_crc32=False)[0] is None


def _edge_tensors() -> dict[str, torch.Tensor]:
    """A state dict for several shards at the edges of what the formats store: empty, 0-d,
    non-contiguous, narrow and wide dtypes."""
    g = torch.Generator().manual_seed(7)
    return {
        "big": torch.randn(70_000, generator=g),  # a shard of its own
        "empty": torch.zeros(0),
        "scalar": torch.tensor(2.5),
        "transposed": torch.randn(64, 48, generator=g).t(),
        "bf16": torch.randn(3000, generator=g).to(torch.bfloat16),
        "fp8": torch.randn(5000, generator=g).to(torch.float8_e4m3fn),
        "bool": torch.rand(333, generator=g) > 0.5,
        "complex": torch.randn(2000, dtype=torch.complex64, generator=g),
        "int64": torch.arange(10_000),
    }


def _check_listed(d: Path) -> dict[str, tuple[int, int]]:
    """The manifest of directory `d`, checked against the files on disk: every file but the
    manifest listed, each with its size and zlib's CRC-32."""
    listed = _verify.read_manifest(d / _verify.MANIFEST_NAME)
    assert sorted(listed) == sorted(p.name for p in d.iterdir() if p.name != _verify.MANIFEST_NAME)
    for name, (size, crc) in listed.items():
        data = (d / name).read_bytes()
        assert (size, crc) == (len(data), zlib.crc32(data)), name
    return listed


@pytest.mark.parametrize("staged", [False, True], ids=["host", "ring"])
@pytest.mark.parametrize("record_crcs", [False, True], ids=["zeros", "record-crcs"])
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_directory_manifest_crcs_come_from_the_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, record_crcs: bool, staged: bool
) -> None:
    """save(..., manifest=True) lists the CRC-32 each writer computed from the buffers it
    wrote (the index's from its bytes): no file is read back, and each is zlib's CRC-32 of
    the file on disk, with its size. A verified load passes, and fails once a byte changes
    that only the manifest covers (a torch shard's padding) or a tensor's byte."""
    if staged:
        monkeypatch.setattr(_staging, "copier_for", lambda d: _staging.TorchCopier(d))

    def read_back(path: Any) -> tuple[int, int]:
        raise AssertionError(f"the save read {path} back")

    monkeypatch.setattr(_verify, "file_crc32", read_back)
    sd = _edge_tensors()
    d = tmp_path / "model"
    with ckptio.options(write_crc32=record_crcs, write_chunk_bytes=64 << 10):
        ckptio.save(sd, d, max_shard_size=60_000, format=fmt, manifest=True)
    monkeypatch.undo()
    listed = _check_listed(d)
    shards = sorted(n for n in listed if not n.endswith(".json"))
    assert len(shards) >= 3 and len(listed) == len(shards) + 1  # and the index
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ckptio.load(d, verify=True)
    assert sorted(out) == sorted(sd)
    assert all(same_values(out[k], v) for k, v in sd.items())
    big = next(n for n in shards if (d / n).stat().st_size > 280_000)
    raw = bytearray((d / big).read_bytes())
    if fmt == "torch":
        at = raw.index(b"ZZZZ")  # padding of the FB extra field: no record CRC covers it
    else:
        at = raw.index(sd["big"].numpy().tobytes()[:64]) + 100
    raw[at] ^= 0x01
    (d / big).write_bytes(bytes(raw))
    with pytest.raises(ckptio.CheckpointError, match=rf"{big}: fails the CRC-32 its manifest"):
        ckptio.load(d, verify=True)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_directory_manifest_of_one_shard_and_of_nothing(tmp_path: Path, fmt: str) -> None:
    """One shard (no index) and an empty state dict (one empty shard) are listed too."""
    for name, sd in [("one", {"w": torch.randn(10)}), ("none", {})]:
        d = tmp_path / name
        ckptio.save(sd, d, max_shard_size="1GB", format=fmt, manifest=True)
        assert len(_check_listed(d)) == 1
        assert _verify.check_manifest(d) == 1


def test_directory_manifest_of_legacy_torch_shards(tmp_path: Path) -> None:
    """Shards in torch's legacy format, which torch writes, are read back for their CRCs."""
    d = tmp_path / "model"
    sd = {f"w{i}": torch.randn(5000) for i in range(3)}
    ckptio.save(sd, d, _use_new_zipfile_serialization=False, max_shard_size=25_000, manifest=True)
    assert len(_check_listed(d)) == 4
    assert _verify.check_manifest(d) == 4


# ------------------------------------------------------------------------------ the command
def _cli(*args: Any) -> tuple[int, str]:
    import contextlib

    from ckptio.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["verify", "--no-progress", *map(str, args)])
    return code, out.getvalue()


def test_cli_verify_records(saved: Path, tmp_path: Path) -> None:
    code, out = _cli(saved)
    assert code == 0 and "CRC-32 of all" in out, out
    plain = tmp_path / "plain.pt"
    ckptio.save(_state(), plain)
    code, out = _cli(plain)
    assert code == 0 and "not recorded (all zero: written without write_crc32)" in out
    _flip(saved, _state()["big"], at=9)
    code, out = _cli(saved)
    assert code == 1 and "CRC-32 mismatch in 1 records: ckpt/data/0" in out, out


def test_cli_verify_manifests(tmp_path: Path) -> None:
    f = tmp_path / "m.safetensors"
    ckptio.save({"w": torch.randn(1000)}, f, format="safetensors")
    code, out = _cli(f)
    assert code == 0 and "no m.safetensors.ckptio.manifest.json manifest" in out, out
    _verify.write_manifest(
        tmp_path,
        [_verify.manifest_entry(f.name, *_verify.file_crc32(f))],
        name=f.name + _verify.MANIFEST_SUFFIX,
    )
    code, out = _cli(f)
    assert code == 0 and "size and CRC-32 of 1 files match" in out, out
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    code, out = _cli(f)
    assert code == 1 and "manifest   FAILED" in out and "CRC-32" in out, out


def test_cli_verify_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "model"
    state = {f"layer{i}.weight": torch.randn(20_000) for i in range(4)}
    ckptio.save(state, d, max_shard_size=100_000, format="safetensors")
    shards = sorted(p.name for p in d.iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 1
    code, out = _cli(d)
    assert code == 0 and "ckptio.manifest.json absent" in out, out
    assert all(s in out for s in shards)
    _verify.write_manifest(
        d, [_verify.manifest_entry(s, *_verify.file_crc32(d / s)) for s in shards]
    )
    code, out = _cli(d)
    assert code == 0 and f"size and CRC-32 of {len(shards)} files match" in out, out
    data = bytearray((d / shards[1]).read_bytes())
    data[-5] ^= 1
    (d / shards[1]).write_bytes(bytes(data))
    code, out = _cli(d)
    assert code == 1 and shards[1] in out and "FAILED" in out, out


# --------------------------------------------------------------------------- remote sources
def test_remote_objects_are_checked_too(saved: Path) -> None:
    """A URL read by ranged GETs (_remote): the GETs' CRC-32s are checked like a file's,
    and a record read in part is read again whole through a scratch buffer."""
    pytest.importorskip("urllib3")
    from _remote_servers import RangeServer

    good = saved.read_bytes()
    _flip(saved, _state()["big"], at=4 * (BIG - 3))
    with RangeServer() as server:
        server.objects["/good.pt"] = good
        server.objects["/bad.pt"] = saved.read_bytes()
        out = ckptio.load(f"{server.url}/good.pt", verify=True)
        assert torch.equal(out["big"], _state()["big"])
        with pytest.raises(ckptio.CheckpointError, match=r"bad.pt.*'big'.*CRC-32"):
            ckptio.load(f"{server.url}/bad.pt", verify=True)
        with ckptio.open(f"{server.url}/bad.pt", verify=True) as h:
            with pytest.raises(ckptio.CheckpointError, match=r"bad.pt.*'big'.*CRC-32"):
                h.get_slice("big")[0:10]


# ------------------------------------------------------------ manifests checked by loads
def _manifest_for(directory: Path, names: list[str], name: str = _verify.MANIFEST_NAME) -> None:
    entries = [_verify.manifest_entry(n, *_verify.file_crc32(directory / n)) for n in names]
    _verify.write_manifest(directory, entries, name=name)


def _flip_at(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_safetensors_file_checked_against_its_manifest(tmp_path: Path, mmap: bool) -> None:
    f = tmp_path / "m.safetensors"
    sd = {"a": torch.randn(BIG), "b": torch.randn(7)}
    ckptio.save(sd, f, format="safetensors")
    with pytest.warns(ckptio.UnverifiedWarning, match="no manifest"):
        ckptio.load(f, mmap=mmap, verify=True)
    _manifest_for(tmp_path, [f.name], name=f.name + _verify.MANIFEST_SUFFIX)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ckptio.load(f, mmap=mmap, verify=True)
    assert torch.equal(out["a"], sd["a"])
    _flip(f, sd["a"], at=11)
    with pytest.raises(
        ckptio.CheckpointError, match=r"m.safetensors: fails the CRC-32 its manifest"
    ):
        ckptio.load(f, mmap=mmap, verify=True)
    ckptio.load(f, mmap=mmap)  # unverified


def test_a_safetensors_header_byte_is_covered_too(tmp_path: Path) -> None:
    """Bytes no tensor read covers (the header) are read for the check."""
    f = tmp_path / "m.safetensors"
    ckptio.save({"a": torch.randn(100)}, f, format="safetensors", metadata={"note": "aaaa"})
    _manifest_for(tmp_path, [f.name], name=f.name + _verify.MANIFEST_SUFFIX)
    data = f.read_bytes()
    f.write_bytes(data.replace(b'"aaaa"', b'"aaab"'))  # still a valid header
    with ckptio.open(f) as h:
        assert h.metadata == {"note": "aaab"}
    with pytest.raises(ckptio.CheckpointError, match="fails the CRC-32 its manifest"):
        ckptio.load(f, verify=True)


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "legacy"])
def test_directory_checked_against_its_manifest(tmp_path: Path, fmt: str) -> None:
    d = tmp_path / "model"
    sd = {f"layer{i}.weight": torch.randn(20_000) for i in range(4)}
    if fmt == "legacy":  # shards torch's legacy loader reads, from the files ckptio opened
        ckptio.save(sd, d, max_shard_size=100_000, _use_new_zipfile_serialization=False)
    else:
        ckptio.save(sd, d, max_shard_size=100_000, format=fmt)
    shards = sorted(p.name for p in d.iterdir() if not p.name.endswith(".json"))
    assert len(shards) > 1
    if fmt != "torch":
        with pytest.warns(ckptio.UnverifiedWarning, match="does not list it"):
            ckptio.load(d, verify=True)
    _manifest_for(d, shards)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the manifest covers shards without record CRCs too
        out = ckptio.load(d, verify=True)
    assert all(torch.equal(out[k], v) for k, v in sd.items())
    name = next(iter(ckptio.load(d / shards[1])))
    _flip(d / shards[1], sd[name], at=2)
    with pytest.raises(ckptio.CheckpointError, match=rf"{shards[1]}: fails the CRC-32"):
        ckptio.load(d, verify=True)
    ckptio.load(d)


def test_legacy_files_warn(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"a": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    with pytest.warns(ckptio.UnverifiedWarning, match="legacy"):
        ckptio.load(path, verify=True)


def test_safetensors_manifest_through_the_ring(
    tmp_path: Path, staged_cpu: list[SimulatedCopier]
) -> None:
    """The pieces the ring's fills read (on the pinned slots) make up the file's CRC."""
    f = tmp_path / "m.safetensors"
    sd = {"a": torch.randn(BIG), "b": torch.randn(9)}
    ckptio.save(sd, f, format="safetensors")
    _manifest_for(tmp_path, [f.name], name=f.name + _verify.MANIFEST_SUFFIX)
    out = ckptio.load(f, verify=True)
    assert torch.equal(out["a"], sd["a"]) and staged_cpu
    _flip(f, sd["a"], at=4 * (BIG - 2))
    with pytest.raises(ckptio.CheckpointError, match="fails the CRC-32 its manifest"):
        ckptio.load(f, verify=True)


@pytest.mark.parametrize("kind", ["bytesio", "file"])
def test_file_objects_are_checked(saved: Path, kind: str) -> None:
    def load() -> Any:
        if kind == "bytesio":
            return ckptio.load(io.BytesIO(saved.read_bytes()), verify=True)
        with open(saved, "rb") as f:
            return ckptio.load(f, verify=True)

    assert torch.equal(load()["big"], _state()["big"])
    _flip(saved, _state()["big"], at=33)
    with pytest.raises(ckptio.CheckpointError, match=r"'big'.*CRC-32"):
        load()


def test_directory_torch_shards_record_crcs(tmp_path: Path) -> None:
    d = tmp_path / "model"
    with ckptio.options(write_crc32=True):
        ckptio.save({f"w{i}": torch.randn(20_000) for i in range(4)}, d, max_shard_size=100_000)
    shards = [p for p in d.iterdir() if not p.name.endswith(".json")]
    assert len(shards) > 1
    for p in shards:
        with zipfile.ZipFile(p) as z:
            assert z.testzip() is None and any(i.CRC for i in z.infolist())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckptio.load(d, verify=True)


def test_corrupt_record_pickles() -> None:
    import pickle

    e = _verify.CorruptRecord("f.pt", "data/3", 1, 2, "tensor 'w'")
    back = pickle.loads(pickle.dumps(e))
    assert isinstance(back, ckptio.CheckpointError) and str(back) == str(e)
    assert (back.file, back.record, back.stored, back.found) == ("f.pt", "data/3", 1, 2)
