"""ckptio.dcp.Writer / Reader under torch.distributed.checkpoint: two real gloo ranks save a
sharded state dict, which loads back with two ranks (resharded) and with one process, equal
to the original and to what the stock FileSystemWriter/Reader give."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import _dcp_worker
import ckptio
import ckptio.dcp

from conftest import assert_same

# torch's own warnings, in each supported torch's words: a single-process save or load
# (torch 2.5: "torch.distributed is unavailable...", later "is disabled, unavailable..."), and
# the stock FileSystemWriter's tensor.storage() (torch 2.5 to 2.9).
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is (disabled, )?unavailable or uninitialized:UserWarning",
    "ignore:.*overwriting since:UserWarning",
    "ignore:TypedStorage is deprecated:UserWarning:torch.distributed.checkpoint.filesystem",
)


@pytest.fixture(scope="module")
def saved_by_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dcp")
    context = mp.start_processes(
        _dcp_worker.run, args=(2, str(directory)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail("the two gloo ranks did not finish within 240 s (a hang?)")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    return directory


def _load_one_process(reader: Any) -> dict[str, Any]:
    target = _dcp_worker.empty_like_state()
    dcp.load(target, storage_reader=reader)
    return target


def _contiguous(value: Any) -> Any:
    return value.contiguous() if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("name", ["ckptio", "async"])
def test_two_ranks_save_load_resharded_on_two_ranks(saved_by_two_ranks: Path, name: str) -> None:
    expected = _dcp_worker.full_state()
    ours = torch.load(saved_by_two_ranks / f"loaded2-{name}.pt")
    stock = torch.load(saved_by_two_ranks / "loaded2-stock.pt")
    # The layout of a gathered tensor is DTensor.full_tensor()'s (torch 2.5 to 2.9 gather an
    # uneven shard through a padded buffer: strides (4, 1) for a 5x3 tensor). The stock reader's
    # result is the oracle for it, the original state for the values.
    assert_same(stock, ours)
    assert_same(expected, {k: _contiguous(v) for k, v in ours.items()})


@pytest.mark.parametrize("name", ["ckptio", "async"])
def test_two_ranks_save_load_on_one_process(saved_by_two_ranks: Path, name: str) -> None:
    ours = _load_one_process(ckptio.dcp.Reader(saved_by_two_ranks / name))
    stock = _load_one_process(FileSystemReader(saved_by_two_ranks / "stock"))
    assert_same(_dcp_worker.full_state(), ours)
    assert_same(stock, ours)


def test_layout_one_aligned_file_per_rank(saved_by_two_ranks: Path) -> None:
    names = sorted(os.listdir(saved_by_two_ranks / "ckptio"))
    assert names == [".metadata", "__0_0.ckptio", "__1_0.ckptio"]
    metadata = ckptio.dcp.Reader(saved_by_two_ranks / "ckptio").read_metadata()
    for info in metadata.storage_data.values():
        assert isinstance(info, ckptio.dcp.StorageInfo)
        if info.dtype is not None:
            assert info.offset % ckptio.dcp.TENSOR_ALIGNMENT == 0


def test_single_process_round_trip_model_and_optimizer(tmp_path: Path) -> None:
    from conftest import trained_optimizer

    model, opt = trained_optimizer("adamw", steps=2)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3}
    dcp.save(state, storage_writer=ckptio.dcp.Writer(tmp_path / "ours"))
    fresh_model, fresh_opt = trained_optimizer("adamw", steps=0)
    fresh_opt_state = fresh_opt.state_dict()
    target = {"model": fresh_model.state_dict(), "optim": fresh_opt_state, "epoch": 0}
    dcp.load(target, storage_reader=ckptio.dcp.Reader(tmp_path / "ours"))
    assert_same(state["model"], target["model"])
    assert target["epoch"] == 3


class _Planner:
    """The two LoadPlanner calls Reader.read_data makes for tensors."""

    def __init__(self, targets: dict[tuple[int, ...], torch.Tensor]) -> None:
        self.targets = targets
        self.committed: list[tuple[int, ...]] = []

    def resolve_tensor(self, item: Any) -> torch.Tensor:
        return self.targets[tuple(item.storage_offsets)]

    def commit_tensor(self, item: Any, tensor: torch.Tensor) -> None:
        self.committed.append(tuple(item.storage_offsets))


def _read_boxes(
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    full: torch.Tensor,
    boxes: dict[tuple[int, int], tuple[int, int]],
) -> tuple[Any, dict[tuple[int, int], torch.Tensor], _Planner, list[tuple[int, int]], list]:
    """Saves `full` as "t", then reads each box (offsets: lengths) of it into a tensor of its
    own through the Reader. Returns the stored chunk's StorageInfo, the filled targets, the
    planner, the (offset, length) of every read and the File.read_into calls."""
    dcp.save({"t": full}, storage_writer=ckptio.dcp.Writer(directory))
    reader = ckptio.dcp.Reader(directory)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    (index,) = metadata.storage_data
    reads: list[tuple[int, int]] = []
    calls = _core_file_read_into(monkeypatch, reads)
    targets = {o: torch.full(n, -1).to(full.dtype) for o, n in boxes.items()}
    items = [
        ReadItem(
            type=LoadItemType.TENSOR,
            dest_index=MetadataIndex("t"),
            dest_offsets=torch.Size([0, 0]),
            storage_index=index,
            storage_offsets=torch.Size(o),
            lengths=torch.Size(n),
        )
        for o, n in boxes.items()
    ]
    planner = _Planner(targets)
    reader.read_data(LoadPlan(items), planner).wait()  # type: ignore[arg-type]
    return metadata.storage_data[index], targets, planner, reads, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resharded_reads_touch_only_the_covering_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """A row block is one exact byte range read in place; a column block reads the range
    from its first to its last element and is copied out of it."""
    full = torch.arange(64 * 32).reshape(64, 32).to(dtype)
    boxes = {(32, 0): (16, 32), (0, 8): (64, 8)}
    info, targets, planner, reads, real = _read_boxes(tmp_path, monkeypatch, full, boxes)
    size = dtype.itemsize
    assert real  # the batch went through File.read_into
    assert sorted(reads) == sorted(
        [
            (info.offset + 32 * 32 * size, 16 * 32 * size),  # rows 32..47, exactly
            (info.offset + 8 * size, (63 * 32 + 15 - 8 + 1) * size),  # covering range
        ]
    )
    assert torch.equal(targets[(32, 0)], full[32:48])
    assert torch.equal(targets[(0, 8)], full[:, 8:16])
    assert sorted(planner.committed) == sorted(boxes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_staged_device_targets_read_through_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_ring: list[Any], dtype: torch.dtype
) -> None:
    """Targets on a staged device (CUDA on a GPU host; the CPU stands in through the
    copier_for hook) are filled through the pinned ring, not host memory + copy_: a row
    block straight into the target, a column block into a span on the device that the box
    is copied out of; the bytes are the same as for host targets."""
    full = torch.arange(64 * 32).reshape(64, 32).to(dtype)
    boxes = {(32, 0): (16, 32), (0, 8): (64, 8), (5, 3): (0, 4)}
    info, targets, planner, reads, _ = _read_boxes(tmp_path, monkeypatch, full, boxes)
    size = dtype.itemsize
    # The same byte ranges as for host targets, read into the ring's pinned slots.
    assert sorted(reads) == sorted(
        [
            (info.offset + 32 * 32 * size, 16 * 32 * size),
            (info.offset + 8 * size, (63 * 32 + 15 - 8 + 1) * size),
        ]
    )
    assert sum(c.allocated for c in cpu_ring) > 0  # the ring's slots were used
    assert torch.equal(targets[(32, 0)], full[32:48])
    assert torch.equal(targets[(0, 8)], full[:, 8:16])
    assert targets[(5, 3)].shape == (0, 4)
    assert sorted(planner.committed) == sorted(boxes)


def test_staged_device_tensors_are_written_through_the_ring(
    tmp_path: Path, cpu_ring: list[Any]
) -> None:
    """Tensors on a staged device (CUDA on a GPU host; the CPU stands in through the
    copier_for hook) stream out through the pinned ring, views and all, and the checkpoint
    loads back to the same values."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=g)
    state = {
        "w": base,
        "view": base[5:9, 2:7],  # not contiguous, and an offset into a larger storage
        "tail": base.reshape(-1)[1000:],  # contiguous, at an offset
        "bf16": torch.randn(77, generator=g).to(torch.bfloat16),
        "empty": torch.empty(0, 4),
        "step": 7,
    }
    dcp.save(state, storage_writer=ckptio.dcp.Writer(tmp_path / "ours"))
    assert sum(c.allocated for c in cpu_ring) > 0  # the ring carried the bytes
    target = {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()
    }
    dcp.load(target, storage_reader=ckptio.dcp.Reader(tmp_path / "ours"))
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(target[k], v), k
    assert target["step"] == 7


def _core_file_read_into(monkeypatch: pytest.MonkeyPatch, reads: list[tuple[int, int]]) -> list:
    """Records the (offset, length) of every read the reader batches."""
    from ckptio import _core

    calls: list = []
    real_open = _core.io.File.open

    class Spy:
        def __init__(self, file: Any) -> None:
            self.file = file

        def __getattr__(self, name: str) -> Any:
            return getattr(self.file, name)

        def __enter__(self) -> Spy:
            self.file.__enter__()
            return self

        def __exit__(self, *args: Any) -> None:
            self.file.__exit__(*args)

        def read_into(self, requests: Any, threads: int, chunk: int, base: int = 0) -> None:
            calls.append(1)
            flat = list(requests)
            reads.extend((flat[i], flat[i + 1]) for i in range(0, len(flat), 3))
            self.file.read_into(requests, threads, chunk, base)

    monkeypatch.setattr(
        ckptio.dcp._core.io,
        "File",
        type("F", (), {"open": staticmethod(lambda p, m: Spy(real_open(p, m)))}),
    )
    return calls


def test_byte_items_are_not_unpickled_with_arbitrary_globals(tmp_path: Path) -> None:
    """A byte item whose pickle calls os.system must not run on load (weights-only)."""
    dcp.save({"t": torch.ones(2), "x": {"a": 1}}, storage_writer=ckptio.dcp.Writer(tmp_path))
    reader = ckptio.dcp.Reader(tmp_path)
    metadata = reader.read_metadata()
    byte_info = next(i for i in metadata.storage_data.values() if i.dtype is None)
    evil = io.BytesIO()
    torch.save({"boom": _Evil()}, evil)
    data = bytearray((tmp_path / byte_info.relative_path).read_bytes())
    # Rewrite the item in place only if it fits; else append and point the metadata at it.
    offset = len(data)
    data += evil.getvalue()
    (tmp_path / byte_info.relative_path).write_bytes(bytes(data))
    new_info = ckptio.dcp.StorageInfo(byte_info.relative_path, offset, len(evil.getvalue()))
    for k, v in metadata.storage_data.items():
        if v is byte_info:
            metadata.storage_data[k] = new_info
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    target = {"t": torch.zeros(2), "x": {"a": 0}}
    _Evil.ran = False
    with pytest.raises(CheckpointException, match="does not load weights-only"):
        dcp.load(target, storage_reader=ckptio.dcp.Reader(tmp_path))
    assert not _Evil.ran


class _Evil:
    ran = False

    def __reduce__(self) -> Any:
        return (_mark_ran, ())


def _mark_ran() -> None:  # pragma: no cover - must never run
    _Evil.ran = True


def test_metadata_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    dcp.save({"t": torch.ones(2)}, storage_writer=ckptio.dcp.Writer(tmp_path))
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(ckptio.CheckpointError, match="refusing"):
        ckptio.dcp.Reader(tmp_path).read_metadata()
    assert not _Evil.ran


def test_stock_checkpoint_loads_through_the_reader(tmp_path: Path) -> None:
    state = {"t": torch.randn(3, 4), "x": {"a": 1, "b": [2.5]}}
    dcp.save(state, storage_writer=FileSystemWriter(tmp_path))
    ours = {"t": torch.zeros(3, 4), "x": {"a": 0, "b": [0.0]}}
    dcp.load(ours, storage_reader=ckptio.dcp.Reader(tmp_path))
    assert_same(state, ours)


def test_stock_checkpoint_byte_items_are_loaded_weights_only(tmp_path: Path) -> None:
    dcp.save({"t": torch.ones(2), "x": _Evil()}, storage_writer=FileSystemWriter(tmp_path))
    _Evil.ran = False
    with pytest.raises(CheckpointException, match="does not load weights-only"):
        dcp.load({"t": torch.zeros(2), "x": None}, storage_reader=ckptio.dcp.Reader(tmp_path))
    assert not _Evil.ran


def test_failed_overwrite_leaves_no_stale_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dcp.save({"t": torch.ones(4)}, storage_writer=ckptio.dcp.Writer(tmp_path))
    assert (tmp_path / ".metadata").exists()

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckptio.dcp, "write_archive", full_disk)
    with pytest.raises(CheckpointException, match="No space left"):
        dcp.save({"t": torch.zeros(4)}, storage_writer=ckptio.dcp.Writer(tmp_path))
    assert not (tmp_path / ".metadata").exists()  # visibly incomplete, not half old


def test_ckptio_dcp_is_imported_on_first_use() -> None:
    """``import ckptio`` does not pay for torch.distributed.checkpoint; ``ckptio.dcp`` does."""
    code = (
        "import sys, ckptio\n"
        "assert 'ckptio.dcp' not in sys.modules\n"
        "assert 'torch.distributed.checkpoint' not in sys.modules\n"
        "assert ckptio.dcp.Writer.__name__ == 'Writer'\n"
        "assert 'ckptio.dcp' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "value",
    [
        torch.tensor(3.5),
        torch.empty(0, 4),
        torch.tensor([True, False, True]),
        torch.randn(3, 2, dtype=torch.complex64),
        torch.arange(12, dtype=torch.int16).reshape(3, 4).t(),  # not contiguous when saved
        torch.randn(2, 3, 4).to(torch.float8_e4m3fn),
    ],
    ids=["scalar", "empty", "bool", "complex", "transposed", "float8"],
)
def test_single_process_round_trip_of_unusual_tensors(tmp_path: Path, value: torch.Tensor) -> None:
    dcp.save({"v": value, "n": 1}, storage_writer=ckptio.dcp.Writer(tmp_path / "ours"))
    dcp.save({"v": value, "n": 1}, storage_writer=FileSystemWriter(tmp_path / "stock"))
    ours = {"v": torch.zeros_like(value), "n": 0}
    stock = {"v": torch.zeros_like(value), "n": 0}
    dcp.load(ours, storage_reader=ckptio.dcp.Reader(tmp_path / "ours"))
    dcp.load(stock, storage_reader=FileSystemReader(tmp_path / "stock"))
    assert ours["n"] == 1

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    assert torch.equal(raw(ours["v"]), raw(value))
    assert_same(stock, ours)
