"""The bytes ckptio writes: torch's zip layout (docs/format.md) with page-aligned
``data/*`` records, checked with Python's zipfile, with torch's strictest loader, and byte for
byte against a file torch.save wrote."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio import _core, _writer

from conftest import (
    assert_same,
    assert_same_sharing,
    make_model,
    torch_archive_parts,
    torch_can_save,
    trained_optimizer,
    write_plain_zip,
    zip_records,
)


def _sample() -> dict[str, Any]:
    model, opt = trained_optimizer("adamw")
    base = torch.arange(30, dtype=torch.float32).reshape(6, 5)
    # torch 2.5 cannot save uint16, and ckptio pickles each storage as the installed torch does
    u16 = {"u16": torch.arange(7).to(torch.uint16)} if torch_can_save(torch.uint16) else {}
    return {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "window": base[2:, 1:4],
        "base": base,
        "empty": torch.empty(0),
        **u16,
        "f8": torch.ones(5).to(torch.float8_e4m3fn),
        "big": torch.randn(70_000, generator=torch.Generator().manual_seed(0)),
        "step": 2**40,
    }


try:
    from torch.utils.serialization import config as torch_config
except ImportError:  # torch 2.5 has no serialization config
    torch_config = None


def _torch_config_option(name: str) -> pytest.MarkDecorator:
    """Skips a test that sets torch.utils.serialization.config's `name` ("save.compute_crc32")
    where the installed torch has no such option."""
    value: Any = torch_config
    for part in name.split("."):
        value = getattr(value, part, None) if value is not None else None
    return pytest.mark.skipif(
        value is None,
        reason=f"torch {torch.__version__} has no torch.utils.serialization.config.{name}",
    )


def _raw(data: bytes | Path, name: str) -> bytes:
    """A record's payload, read by offset (zipfile.read would check CRCs, which are 0)."""
    data = data if isinstance(data, bytes) else data.read_bytes()
    rec = next(r for r in zip_records(data) if r.name == name)
    return data[rec.data_offset : rec.data_offset + rec.size]


def _n_storages(path: Path) -> int:
    return sum(1 for r in zip_records(path) if "/data/" in r.name)


@pytest.fixture
def sample_file(tmp_path: Path) -> Path:
    path = tmp_path / "sample.pt"
    ckptio.save(_sample(), path)
    return path


# ------------------------------------------------------------------------------ the layout
def test_record_order(sample_file: Path) -> None:
    records = zip_records(sample_file)
    n = _n_storages(sample_file)
    assert n > 5
    # torch's records; data.pkl after the storages, which are written while it is pickled
    # (docs/format.md: record order does not matter to torch.load).
    expected = (
        [".format_version", ".storage_alignment", "byteorder"]
        + [f"data/{k}" for k in range(n)]
        + ["data.pkl", "version", ".data/serialization_id"]
    )
    assert [r.name for r in records] == [f"sample/{name}" for name in expected]
    # The central directory lists the records in file order.
    offsets = [r.header_offset for r in records]
    assert offsets == sorted(offsets) and offsets[0] == 0


@pytest.mark.parametrize("crc32", [False, True], ids=["nocrc", "crc32"])
@pytest.mark.parametrize("threads", [1, 3], ids=lambda t: f"threads{t}")
def test_streamed_file_is_the_file_object_bytes(tmp_path: Path, crc32: bool, threads: int) -> None:
    """To a path, storages are written while the pickler runs (records of up to write_chunk_bytes
    grouped, larger ones split); to a file object, one after the other once it is done: the
    bytes are the same."""
    many = [torch.full((i,), i) for i in range(300)]
    obj = {**_sample(), "big": torch.randn(700_000), "many": many}
    with ckptio.options(crc32=crc32, threads=threads, write_chunk_bytes=1 << 20):
        ckptio.save(obj, tmp_path / "archive.pt")  # the name a file object's archive gets
        buf = io.BytesIO()
        ckptio.save(obj, buf)
    assert (tmp_path / "archive.pt").read_bytes() == buf.getvalue()
    with zipfile.ZipFile(tmp_path / "archive.pt") as zf:
        assert (zf.testzip() is None) == crc32  # CRCs off: every record's is 0
    assert_same(obj, torch.load(tmp_path / "archive.pt"))


@pytest.mark.parametrize("alignment", [4096, 64, 32768], ids=lambda a: f"align{a}")
def test_data_records_aligned(tmp_path: Path, alignment: int) -> None:
    path = tmp_path / "sample.pt"
    with ckptio.options(data_alignment=alignment):
        ckptio.save(_sample(), path)
    records = zip_records(path)
    for r in records:
        align = alignment if "/data/" in r.name else 64
        assert r.data_offset % align == 0, (r.name, r.data_offset)
    assert _raw(path, "sample/.storage_alignment") == str(alignment).encode()
    loaded = torch.load(path, mmap=True)
    assert_same(_sample(), loaded)


def test_metadata_records(sample_file: Path) -> None:
    assert _raw(sample_file, "sample/.format_version") == b"1"
    assert _raw(sample_file, "sample/.storage_alignment") == b"4096"
    assert _raw(sample_file, "sample/byteorder") == b"little"
    assert _raw(sample_file, "sample/version") == b"3\n"
    sid = _raw(sample_file, "sample/.data/serialization_id")
    assert len(sid) == 40 and sid.isdigit()
    with zipfile.ZipFile(sample_file) as zf:
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED


def test_local_headers_follow_miniz(sample_file: Path) -> None:
    """Flags 0x0808 with a data descriptor; 0x0800 and none for empty records (§1.3): the
    arithmetic-offset loader depends on it."""
    data = sample_file.read_bytes()
    records = zip_records(sample_file)
    for r, nxt in zip(records, records[1:] + [None], strict=True):
        assert r.flags == (0x0808 if r.size else 0x0800), r.name
        end = r.data_offset + r.size
        if r.size:
            sig, _crc, csize, usize = struct.unpack_from("<IIII", data, end)
            assert sig == 0x08074B50 and csize == usize == r.size, r.name
            end += 16
        if nxt is not None:
            assert nxt.header_offset == end, r.name


def test_storage_payloads_are_the_raw_bytes(sample_file: Path) -> None:
    obj = _sample()
    # Keys follow pickling order: the model's own buffer first, then the tied embedding.
    assert _raw(sample_file, "sample/data/0") == obj["model"]["mask"].numpy().tobytes()
    emb = obj["model"]["tok_emb.weight"]
    assert _raw(sample_file, "sample/data/1") == emb.numpy().tobytes()
    assert _raw(sample_file, "sample/data/2") == obj["model"]["pos_emb.weight"].numpy().tobytes()


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("path", "sample"),
        ("buffer", "archive"),
        ("no-suffix", "weights"),
        ("two-suffixes", "model.v2"),
    ],
)
def test_archive_name(tmp_path: Path, target: str, name: str) -> None:
    obj = {"t": torch.ones(2)}
    if target == "buffer":
        buf = io.BytesIO()
        ckptio.save(obj, buf)
        ref = io.BytesIO()
        torch.save(obj, ref)
        data, ref_data = buf.getvalue(), ref.getvalue()
    else:
        fname = {"path": "sample.pt", "no-suffix": "weights", "two-suffixes": "model.v2.pt"}[target]
        ckptio.save(obj, tmp_path / fname)
        torch.save(obj, tmp_path / ("ref-" + fname))
        data = (tmp_path / fname).read_bytes()
        ref_data = (tmp_path / ("ref-" + fname)).read_bytes()
    names = [r.name for r in zip_records(data)]
    assert all(n.startswith(name + "/") for n in names), names
    ref_prefix = zip_records(ref_data)[0].name.split("/", 1)[0]
    assert ref_prefix.removeprefix("ref-") == name  # the name torch picks


def test_non_ascii_path_archive_name(tmp_path: Path) -> None:
    """torch names the archive 'archive' when the path is not ASCII; so does ckptio."""
    obj = {"t": torch.ones(2)}
    ckptio.save(obj, tmp_path / "modèle.pt")
    torch.save(obj, tmp_path / "modèle-torch.pt")
    ours = {r.name.split("/", 1)[0] for r in zip_records(tmp_path / "modèle.pt")}
    theirs = {r.name.split("/", 1)[0] for r in zip_records(tmp_path / "modèle-torch.pt")}
    assert ours == theirs == {"archive"}
    assert_same(obj, torch.load(tmp_path / "modèle.pt"))


def test_zipfile_crc_checks(tmp_path: Path) -> None:
    path = tmp_path / "sample.pt"
    with ckptio.options(crc32=True):
        ckptio.save(_sample(), path)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert zf.read("sample/byteorder") == b"little"


def test_crc_off_writes_zero_crcs(sample_file: Path) -> None:
    with zipfile.ZipFile(sample_file) as zf:
        assert {info.CRC for info in zf.infolist()} == {0}


def test_crc_buffer_target(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with ckptio.options(crc32=True):
        ckptio.save(_sample(), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        assert zf.testzip() is None


# ------------------------------------------------------------- torch's strictest loading
@_torch_config_option("load.calculate_storage_offsets")
@pytest.mark.parametrize("weights_only", [True, False], ids=["weights-only", "full"])
def test_torch_arithmetic_offsets(
    sample_file: Path, monkeypatch: pytest.MonkeyPatch, weights_only: bool
) -> None:
    """torch computes every offset from the layout rules (no local header reads) and, with
    TORCH_SERIALIZATION_DEBUG=1, asserts each against the real header."""
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    with torch_config.patch("load.calculate_storage_offsets", True):
        loaded = torch.load(sample_file, mmap=True, weights_only=weights_only)
    assert torch_config.load.calculate_storage_offsets is False
    obj = _sample()
    assert_same(obj, loaded)
    assert_same_sharing(obj, loaded)


@_torch_config_option("load.calculate_storage_offsets")
def test_arithmetic_offsets_control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the test above: a valid zip laid out differently (Python's zipfile:
    no padding, no data descriptors) fails torch's debug asserts, so passing them means the
    layout is miniz-exact."""
    obj = {"a": torch.ones(100), "b": torch.arange(10)}
    records = {
        "data.pkl": torch_archive_parts(obj)[0],
        ".format_version": b"1",
        "data/0": obj["a"].numpy().tobytes(),
        "data/1": obj["b"].numpy().tobytes(),
        "version": b"3\n",
    }
    path = tmp_path / "plain.pt"
    write_plain_zip(path, records)
    assert_same(obj, torch.load(path, mmap=True))
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    with (
        torch_config.patch("load.calculate_storage_offsets", True),
        pytest.raises(RuntimeError, match="Incorrect offset"),
    ):
        torch.load(path, mmap=True)


def test_torch_meta_load_uses_arithmetic_offsets(sample_file: Path) -> None:
    loaded = torch.load(sample_file, map_location="meta")
    assert_same(_sample(), loaded, values=False)


# ------------------------------------------------------------------------------ golden bytes
def _golden_object() -> dict[str, Any]:
    return {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "empty": torch.empty(0),
        "b": torch.tensor([1, 2, 3], dtype=torch.int16),
        "flag": torch.tensor(True),
        "n": 7,
        "name": "golden",
    }


def _central_directory(data: bytes) -> list[tuple[str, int]]:
    """(name, offset of the central directory entry) for every entry."""
    eocd = data.rindex(b"PK\x05\x06")
    count, _size, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    out, pos = [], cd_offset
    for _ in range(count):
        assert data[pos : pos + 4] == b"PK\x01\x02"
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        out.append((data[pos + 46 : pos + 46 + name_len].decode(), pos))
        pos += 46 + name_len + extra_len + comment_len
    return out


def _with_serialization_id(data: bytes, sid: bytes) -> bytes:
    """`data` with the serialization_id payload replaced by `sid` and its CRC fixed (in the
    data descriptor and the central directory entry)."""
    out = bytearray(data)
    rec = next(r for r in zip_records(data) if r.name.endswith("/.data/serialization_id"))
    assert rec.size == len(sid) == 40
    out[rec.data_offset : rec.data_offset + 40] = sid
    crc = struct.pack("<I", zlib.crc32(sid))
    dd = rec.data_offset + 40
    assert out[dd : dd + 4] == b"PK\x07\x08"
    out[dd + 4 : dd + 8] = crc
    cd_pos = dict(_central_directory(data))[rec.name]
    out[cd_pos + 16 : cd_pos + 20] = crc
    return bytes(out)


def _in_torch_order(
    specs: list[Any], payloads: list[Any], torch_bytes: bytes
) -> tuple[list[Any], list[Any]]:
    """ckptio's records as the installed torch.save writes them: only the records it writes
    (torch 2.5 writes no .format_version and .storage_alignment), data.pkl first."""
    written = {r.name.split("/", 1)[1] for r in zip_records(torch_bytes)}
    kept = [(spec, p) for spec, p in zip(specs, payloads, strict=True) if spec[0] in written]
    specs, payloads = [spec for spec, _ in kept], [p for _, p in kept]
    i = next(k for k, spec in enumerate(specs) if spec[0] == "data.pkl")
    return [specs[i]] + specs[:i] + specs[i + 1 :], [payloads[i]] + payloads[:i] + payloads[i + 1 :]


@pytest.mark.parametrize("target", ["core-file", "buffer"])
@pytest.mark.parametrize("payload_kind", ["bytes", "address"])
def test_golden_bytes(tmp_path: Path, target: str, payload_kind: str) -> None:
    """ckptio's writer, given torch's pickle, torch's alignment (64) and torch's record order
    (data.pkl first), reproduces the file torch.save wrote byte for byte, except the 40-byte
    serialization_id and its CRC."""
    golden = tmp_path / "golden.pt"
    torch.save(_golden_object(), golden)
    torch_bytes = golden.read_bytes()
    with zipfile.ZipFile(golden) as zf:
        pkl = zf.read("golden/data.pkl")
        n = sum(1 for name in zf.namelist() if name.startswith("golden/data/"))
        payloads: list[Any] = [zf.read(f"golden/data/{k}") for k in range(n)]
    assert n == 4 and b"" in payloads
    keep_alive = []
    if payload_kind == "address":
        tensors = [
            torch.frombuffer(bytearray(p), dtype=torch.uint8) if p else torch.empty(0)
            for p in payloads
        ]
        keep_alive = tensors
        payloads = [(t.data_ptr(), t.numel()) for t in tensors]

    specs, record_payloads = _in_torch_order(
        *_writer.torch_records(pkl, payloads, data_alignment=64), torch_bytes
    )
    if target == "core-file":
        out = tmp_path / "golden2.pt"
        with _core.io.File.open(str(out), _core.io.FileMode.CREATE) as f:
            _writer.write_archive(f, "golden", specs, record_payloads, crc32=True)
        ours = out.read_bytes()
    else:
        buf = io.BytesIO()
        _writer.write_archive(buf, "golden", specs, record_payloads, crc32=True)
        ours = buf.getvalue()
    del keep_alive

    assert len(ours) == len(torch_bytes)
    with zipfile.ZipFile(io.BytesIO(ours)) as zf:
        our_sid = zf.read("golden/.data/serialization_id")
        assert zf.testzip() is None
    expected = _with_serialization_id(torch_bytes, our_sid)
    if ours != expected:
        first = next(i for i, (x, y) in enumerate(zip(ours, expected, strict=False)) if x != y)
        pytest.fail(
            f"first difference at byte {first}: ours {ours[first : first + 16]!r}, "
            f"torch {expected[first : first + 16]!r}"
        )


@_torch_config_option("save.compute_crc32")
def test_golden_bytes_without_crc(tmp_path: Path) -> None:
    """crc32=False: torch's own no-CRC file (compute_crc32=False) is reproduced exactly
    (the serialization_id aside, whose CRC is then 0 as well)."""
    golden = tmp_path / "golden.pt"
    with torch_config.patch("save.compute_crc32", False):
        torch.save(_golden_object(), golden)
    torch_bytes = golden.read_bytes()
    pkl = _raw(torch_bytes, "golden/data.pkl")
    payloads = [_raw(torch_bytes, f"golden/data/{k}") for k in range(4)]
    specs, record_payloads = _in_torch_order(
        *_writer.torch_records(pkl, payloads, data_alignment=64), torch_bytes
    )
    buf = io.BytesIO()
    _writer.write_archive(buf, "golden", specs, record_payloads, crc32=False)
    ours = buf.getvalue()
    rec = next(r for r in zip_records(ours) if r.name.endswith("serialization_id"))
    expected = bytearray(torch_bytes)
    expected[rec.data_offset : rec.data_offset + 40] = ours[rec.data_offset : rec.data_offset + 40]
    assert ours == bytes(expected)


@_torch_config_option("save.storage_alignment")
def test_save_matches_torch_at_page_alignment(tmp_path: Path) -> None:
    """torch 2.13 can page-align too (config.save.storage_alignment=4096): ckptio.save writes
    the same records, pickle and payloads, every data/* page-aligned in both files (offsets
    differ: torch pads the metadata records to 4096 too, ckptio to 64)."""
    obj = {"model": make_model().state_dict(), "x": torch.empty(0), "y": torch.ones(3)}
    ckptio.save(obj, tmp_path / "m.pt")
    with torch_config.patch("save.storage_alignment", 4096):
        torch.save(obj, tmp_path / "ref.pt")
    ours = {r.name.split("/", 1)[1]: r for r in zip_records(tmp_path / "m.pt")}
    theirs = {r.name.split("/", 1)[1]: r for r in zip_records(tmp_path / "ref.pt")}
    assert sorted(ours) == sorted(theirs)
    a, b = (tmp_path / "m.pt").read_bytes(), (tmp_path / "ref.pt").read_bytes()
    assert _raw(a, "m/data.pkl") == _raw(b, "ref/data.pkl")
    for name in ours:
        if name.startswith("data/"):
            assert _raw(a, f"m/{name}") == _raw(b, f"ref/{name}"), name
            assert ours[name].data_offset % 4096 == theirs[name].data_offset % 4096 == 0


def _pickle_parity_objects() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    base = torch.arange(30.0)
    with_state = torch.ones(2)
    with_state.note = "python state"  # type: ignore[attr-defined]
    return {
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "view": base.view(5, 6)[2:, 1:4],
        "base": base,
        "parameter": torch.nn.Parameter(torch.ones(3)),
        "requires_grad": torch.ones(2, requires_grad=True),
        **({"uint16": torch.zeros(3, dtype=torch.uint16)} if torch_can_save(torch.uint16) else {}),
        "float8": torch.zeros(2, dtype=torch.float8_e4m3fn),
        "conj": torch.ones(3, dtype=torch.complex64).conj(),
        "neg": torch.ones(2, dtype=torch.complex64).conj().imag,
        "with_state": with_state,
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(7),
    }


def test_pickle_is_torchs(tmp_path: Path) -> None:
    """ckptio's fast tensor reducer must emit exactly the pickle torch.save emits."""
    objs = _pickle_parity_objects()
    torch.save(objs, tmp_path / "t.pt")
    with ckptio.options(crc32=True):  # so zipfile can read it
        ckptio.save(objs, tmp_path / "c.pt")
    with zipfile.ZipFile(tmp_path / "t.pt") as zt, zipfile.ZipFile(tmp_path / "c.pt") as zc:
        assert zc.read("c/data.pkl") == zt.read("t/data.pkl")
