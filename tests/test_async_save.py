"""ckptio.async_save: same file as save, a snapshot at return, ordered per target, errors on
result(), bounded reusable staging buffers, pending saves finished at interpreter exit."""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import ckptio
from ckptio import _async as async_module

from conftest import (
    assert_same,
    assert_same_sharing,
    make_model,
    same_values,
    trained_optimizer,
)


def _payload() -> dict[str, Any]:
    model, opt = trained_optimizer("adamw")
    base = torch.arange(60.0).reshape(6, 10)
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "views": {"base": base, "window": base[2:, 1:4], "row": base[3]},
        "half": torch.randn(7).half(),
        "empty": torch.empty(0),
        "meta": torch.empty(3, device="meta"),
        "step": 12,
        "note": "text",
    }


class Gate:
    """Holds every background write through `async_module.<function>` until opened,
    recording the order writes start (by the name of the target, argument `target` of the
    call)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, function: str, target: int) -> None:
        self.open = threading.Event()
        self.started: list[str] = []
        real = getattr(async_module, function)

        def gated(*args: Any) -> None:
            f = args[target]
            self.started.append(Path(f).name if isinstance(f, (str, os.PathLike)) else repr(f))
            assert self.open.wait(60), "the gate was never opened"
            real(*args)

        monkeypatch.setattr(async_module, function, gated)


def _gate(monkeypatch: pytest.MonkeyPatch, function: str, target: int) -> Iterator[Gate]:
    g = Gate(monkeypatch, function, target)
    try:
        yield g
    finally:
        g.open.set()
        assert ckptio.wait_all(60)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """File writes held (write_to(f, write, durable))."""
    yield from _gate(monkeypatch, "write_to", 0)


@pytest.mark.parametrize("target", ["path", "buffer"])
def test_writes_the_same_bytes_as_save(tmp_path: Path, target: str) -> None:
    obj = _payload()
    if target == "path":
        (tmp_path / "sync").mkdir()
        ckptio.save(obj, tmp_path / "sync" / "ckpt.pt")
        ckptio.async_save(obj, tmp_path / "ckpt.pt").result(timeout=60)
        assert (tmp_path / "sync" / "ckpt.pt").read_bytes() == (tmp_path / "ckpt.pt").read_bytes()
        loaded = torch.load(tmp_path / "ckpt.pt")
    else:
        a, b = io.BytesIO(), io.BytesIO()
        ckptio.save(obj, a)
        ckptio.async_save(obj, b).result(timeout=60)
        assert a.getvalue() == b.getvalue()
        loaded = torch.load(io.BytesIO(b.getvalue()))
    assert loaded.pop("meta").is_meta
    del obj["meta"]
    assert_same(obj, loaded)
    assert_same_sharing(obj, loaded)


def test_options_of_the_caller_apply(tmp_path: Path) -> None:
    obj = {"w": torch.randn(100)}
    with ckptio.options(data_alignment=512, crc32=True):
        (tmp_path / "sync").mkdir()
        ckptio.save(obj, tmp_path / "sync" / "ckpt.pt")
        future = ckptio.async_save(obj, tmp_path / "ckpt.pt")
    future.result(timeout=60)
    assert (tmp_path / "sync" / "ckpt.pt").read_bytes() == (tmp_path / "ckpt.pt").read_bytes()


def test_caller_may_mutate_and_free_after_return(tmp_path: Path, gate: Gate) -> None:
    model = make_model()
    state = {"model": model.state_dict(), "step": 1, "history": [1.0, 2.0]}
    expected = pickle.loads(pickle.dumps(state))  # deep copy of the values at call time
    future = ckptio.async_save(state, tmp_path / "ckpt.pt")
    with torch.no_grad():  # the write has not started: the snapshot must carry old values
        for p in model.parameters():
            p.add_(1.0)
    state["step"] = 2
    state["history"].append(3.0)
    del state, model
    gate.open.set()
    assert future.result(timeout=60) is None
    assert_same(expected, torch.load(tmp_path / "ckpt.pt"))


def test_write_errors_surface_on_result(tmp_path: Path) -> None:
    future = ckptio.async_save({"w": torch.ones(3)}, tmp_path / "missing" / "ckpt.pt")
    with pytest.raises(FileNotFoundError) as info:
        future.result(timeout=60)
    assert info.value.errno == errno.ENOENT


def test_snapshot_errors_raise_at_the_call(tmp_path: Path) -> None:
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ckptio.async_save({"f": lambda x: x}, tmp_path / "ckpt.pt")
    with pytest.raises(TypeError):
        ckptio.async_save({}, 42)  # type: ignore[arg-type]
    assert ckptio.wait_all(60)
    assert list(tmp_path.iterdir()) == []


def test_same_target_in_call_order_other_targets_overlap(tmp_path: Path, gate: Gate) -> None:
    with ckptio.options(async_max_pending=4):
        first = ckptio.async_save({"g": 1}, tmp_path / "same.pt")
        second = ckptio.async_save({"g": 2}, tmp_path / "same.pt")
        third = ckptio.async_save({"g": 3}, tmp_path / "same.pt")
        other = ckptio.async_save({"g": 9}, tmp_path / "other.pt")
    deadline = time.monotonic() + 30
    while len(gate.started) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    # The first save to same.pt and the one to other.pt write at once; the rest wait.
    assert sorted(gate.started) == ["other.pt", "same.pt"]
    assert not second.done() and not third.done()
    gate.open.set()
    for f in (first, second, third, other):
        f.result(timeout=60)
    assert gate.started.count("same.pt") == 3
    assert torch.load(tmp_path / "same.pt") == {"g": 3}
    assert torch.load(tmp_path / "other.pt") == {"g": 9}


def test_in_flight_saves_are_bounded(tmp_path: Path, gate: Gate) -> None:
    with ckptio.options(async_max_pending=1):
        first = ckptio.async_save({"w": torch.ones(10)}, tmp_path / "a.pt")
        returned = threading.Event()

        def second_call() -> None:
            with ckptio.options(async_max_pending=1):
                ckptio.async_save({"w": torch.zeros(10)}, tmp_path / "b.pt").result(60)
            returned.set()

        t = threading.Thread(target=second_call)
        t.start()
        assert not returned.wait(0.3), "a second save started while the first was in flight"
        gate.open.set()
        first.result(timeout=60)
        t.join(60)
        assert returned.is_set()


def test_staging_buffers_are_reused(tmp_path: Path) -> None:
    scheduler = async_module._scheduler
    scheduler.clear()
    obj = {"w": torch.randn(1000), "v": torch.randn(10)}
    allocated, reused = scheduler.buffers_allocated, scheduler.buffers_reused
    for i in range(5):
        ckptio.async_save(obj, tmp_path / f"{i}.pt").result(timeout=60)
    assert scheduler.buffers_allocated - allocated == 1
    assert scheduler.buffers_reused - reused == 4
    smaller = {"w": torch.randn(10)}
    ckptio.async_save(smaller, tmp_path / "small.pt").result(timeout=60)
    assert scheduler.buffers_allocated - allocated == 1  # a big buffer serves a small save
    assert all(not b.pinned for b in scheduler._idle)  # CPU tensors: no pinned memory
    assert len(scheduler._idle) <= ckptio.get_options().async_max_pending


def test_legacy_format_is_saved_at_the_call(tmp_path: Path) -> None:
    obj = {"w": torch.arange(5.0)}
    pending = ckptio.async_save({"w": torch.zeros(3)}, tmp_path / "old.pt")
    future = ckptio.async_save(obj, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert future.done() and pending.done()  # after the pending save to the same path
    assert_same(obj, torch.load(tmp_path / "old.pt"))


def test_pending_saves_complete_at_interpreter_exit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, torch, ckptio
        ckptio.async_save({"w": torch.arange(4 << 20)}, sys.argv[1])
        ckptio.async_save({"w": 1}, sys.argv[2])  # fails: the directory does not exist
        """
    )
    good, bad = tmp_path / "ckpt.pt", tmp_path / "missing" / "x.pt"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(good), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.load(good)["w"], torch.arange(4 << 20))
    assert "async_save to" in proc.stderr and "FileNotFoundError" in proc.stderr
    assert str(bad) in proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_are_staged_in_pinned_memory(tmp_path: Path, gate: Gate) -> None:
    cpu = {"w": torch.randn(1 << 20), "b": torch.arange(10), "host": torch.ones(4)}
    obj = {k: v.cuda() if k != "host" else v for k, v in cpu.items()}
    future = ckptio.async_save(obj, tmp_path / "ckpt.pt")
    obj["w"].mul_(2)  # after return: must not reach the file
    del obj["b"]
    gate.open.set()
    future.result(timeout=60)
    loaded = torch.load(tmp_path / "ckpt.pt")
    assert loaded["w"].is_cuda and torch.equal(loaded["w"].cpu(), cpu["w"])
    assert torch.equal(loaded["b"].cpu(), cpu["b"]) and torch.equal(loaded["host"], cpu["host"])
    assert any(b.pinned for b in async_module._scheduler._idle)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_snapshot_waits_for_its_copies_not_for_other_streams(tmp_path: Path) -> None:
    """Kernels queued on the current stream before the call are in the file; work on another
    stream of the job is not waited for (no torch.cuda.synchronize)."""
    x = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(200_000_000)  # the current stream is busy ...
    x.add_(1.0)  # ... and this write is queued behind it: it must be saved
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        torch.cuda._sleep(4_000_000_000)  # a long job on another stream (seconds)
    future = ckptio.async_save({"x": x}, tmp_path / "x.pt")
    assert not other.query()  # async_save returned while the other stream still runs
    x.add_(1.0)  # after the return: not in the file
    future.result(timeout=60)
    other.synchronize()
    assert torch.equal(torch.load(tmp_path / "x.pt")["x"].cpu(), torch.ones(1 << 20))


def test_snapshot_copies_are_awaited_through_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """_wait_for_copies records one blocking event on each device's current stream (where
    the snapshot's copies were issued) and waits for those, never for the whole device."""
    log: list[Any] = []

    class FakeEvent:
        def __init__(self, **kwargs: Any) -> None:
            log.append(("event", kwargs))

        def record(self, stream: Any) -> None:
            log.append(("record", stream))

        def synchronize(self) -> None:
            log.append(("synchronize",))

    def synchronize(*args: Any) -> None:
        raise AssertionError("torch.cuda.synchronize waits for every stream")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    async_module._wait_for_copies(set(devices))
    events = [e for e in log if e[0] == "event"]
    assert events == [("event", {"blocking": True})] * 2
    assert sorted(e[1] for e in log if e[0] == "record") == ["stream of cuda:0", "stream of cuda:1"]
    assert log[-2:] == [("synchronize",)] * 2  # every event recorded before the first wait


def test_a_failed_snapshot_waits_for_its_copies_before_releasing_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies queued before a failure must not land in a buffer the next save may get."""
    order: list[str] = []

    def snapshot(*args: Any) -> Any:
        order.append("copies queued")
        raise RuntimeError("copy failed part way")

    def wait(devices: Any, *, quiet: bool = False) -> None:
        order.append(f"waited (quiet={quiet})")

    real_release = async_module._scheduler.release

    def release(buffer: Any, limit: int) -> None:
        order.append("buffer released")
        real_release(buffer, limit)

    monkeypatch.setattr(async_module, "_snapshot", snapshot)
    monkeypatch.setattr(async_module, "_wait_for_copies", wait)
    monkeypatch.setattr(async_module._scheduler, "release", release)
    with pytest.raises(RuntimeError, match="part way"):
        ckptio.async_save({"w": torch.ones(1000)}, tmp_path / "x.pt")
    assert order == ["copies queued", "waited (quiet=True)", "buffer released"]
    assert async_module._scheduler._in_flight == 0


def test_a_save_that_cannot_be_scheduled_releases_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As after interpreter shutdown began: async_save raises, and nothing stays pending."""

    class Closed:
        def submit(self, fn: Any) -> None:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(async_module._scheduler, "_executor", Closed())
    with ckptio.options(async_max_pending=1):
        for _ in range(3):  # would block on the second call if the slot leaked
            with pytest.raises(RuntimeError, match="cannot schedule"):
                ckptio.async_save({"w": torch.ones(3)}, tmp_path / "ckpt.pt")
    assert ckptio.wait_all(5)
    assert async_module._scheduler._in_flight == 0


# ------------------------------------------------------------------------ model directories
def _directory_state() -> dict[str, torch.Tensor]:
    """Tied, non-contiguous, 0-d and empty tensors, some 2 KB: several shards at 2000 bytes."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(32, 16, generator=g)
    return {
        "embed.weight": emb,
        "layers.0.weight": torch.randn(16, 16, generator=g),
        "layers.1.weight": torch.randn(30, 20, generator=g).t(),  # non-contiguous
        "step": torch.tensor(7),
        "scale": torch.tensor(0.5),
        "empty": torch.empty(0),
        "empty2d": torch.zeros(0, 3),
        "lm_head.weight": emb,  # tied: kept once (safetensors), shared in one shard (torch)
        "norm.weight": torch.randn(16, generator=g).half(),
    }


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def directory_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """Directory writes held (save_directory(state_dict, path, ...))."""
    yield from _gate(monkeypatch, "save_directory", 1)


INDEX = {"safetensors": "model.safetensors.index.json", "torch": "pytorch_model.bin.index.json"}


@pytest.mark.parametrize("limit", [2000, "5GB"], ids=["sharded", "one-shard"])
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_directory_is_what_save_writes(tmp_path: Path, fmt: str, limit: Any) -> None:
    """The same files as save, byte for byte (shards and index: tied tensors kept once, as
    save keeps them), which ckptio and huggingface_hub's loader read as the state dict."""
    pytest.importorskip("huggingface_hub")
    from test_shard_save import hub_read  # the oracle's reader of a directory

    sd = _directory_state()
    metadata = {"origin": "test"} if fmt == "safetensors" else None
    ckptio.save(sd, tmp_path / "sync", max_shard_size=limit, format=fmt, metadata=metadata)
    future = ckptio.async_save(
        sd, tmp_path / "async", max_shard_size=limit, format=fmt, metadata=metadata
    )
    assert future.result(timeout=60) is None
    expected = _files(tmp_path / "sync")
    assert _files(tmp_path / "async") == expected
    assert sorted(os.listdir(tmp_path)) == ["async", "sync"]  # no temporary directory left
    if limit == 2000:
        assert len(expected) > 3
        weight_map = json.loads(expected[INDEX[fmt]])["weight_map"]
        assert ("lm_head.weight" in weight_map) == (fmt == "torch")  # safetensors: kept once
    else:
        assert len(expected) == 1
    kept = {k: v for k, v in sd.items() if fmt == "torch" or k != "lm_head.weight"}
    got = ckptio.load(tmp_path / "async")
    theirs = hub_read(tmp_path / "async")
    assert sorted(got) == sorted(theirs) == sorted(kept)
    for k, v in kept.items():
        assert same_values(got[k], v) and same_values(theirs[k], v), k
    if fmt == "torch":  # the tied pair still shares one storage
        assert got["lm_head.weight"].untyped_storage().data_ptr() == (
            got["embed.weight"].untyped_storage().data_ptr()
        )


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_directory_holds_the_values_at_the_call(
    tmp_path: Path, fmt: str, directory_gate: Gate
) -> None:
    """The tensors are modified in place (and freed) right after async_save returns, before
    the write starts: the directory holds the values of the call."""
    sd = _directory_state()
    expected = copy.deepcopy(sd)  # keeps the tie and the strides
    ckptio.save(expected, tmp_path / "sync", max_shard_size=2000, format=fmt)
    future = ckptio.async_save(sd, tmp_path / "async", max_shard_size=2000, format=fmt)
    for v in sd.values():
        v.add_(1)
    sd["layers.0.weight"].set_(torch.zeros(2))  # another storage now
    sd.clear()
    assert not future.done()
    directory_gate.open.set()
    future.result(timeout=60)
    assert _files(tmp_path / "async") == _files(tmp_path / "sync")
    got = ckptio.load(tmp_path / "async")
    assert all(same_values(got[k], expected[k]) for k in got)


def test_directory_saves_to_one_directory_complete_in_call_order(
    tmp_path: Path, directory_gate: Gate
) -> None:
    d = tmp_path / "d"
    first_state = {"w": torch.zeros(600), "v": torch.zeros(600)}
    second_state = {"w": torch.ones(600), "v": torch.ones(600)}
    with ckptio.options(async_max_pending=4):
        first = ckptio.async_save(first_state, d, max_shard_size=2000)
        second = ckptio.async_save(second_state, f"{d}/", max_shard_size=2000)  # same realpath
        other = ckptio.async_save(first_state, tmp_path / "other", max_shard_size=2000)
    deadline = time.monotonic() + 30
    while len(directory_gate.started) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert sorted(directory_gate.started) == ["d", "other"]  # the second save to d waits
    assert not second.done()
    directory_gate.open.set()
    for f in (first, second, other):
        f.result(timeout=60)
    assert directory_gate.started.count("d") == 2
    got = ckptio.load(d)
    assert torch.equal(got["w"], torch.ones(600)) and torch.equal(got["v"], torch.ones(600))
    assert async_module._scheduler._in_flight == 0  # every staging buffer went back


def test_directory_saves_in_flight_are_bounded(tmp_path: Path, directory_gate: Gate) -> None:
    with ckptio.options(async_max_pending=1):
        first = ckptio.async_save({"w": torch.ones(10)}, tmp_path / "a", max_shard_size="1GB")
        returned = threading.Event()

        def second_call() -> None:
            with ckptio.options(async_max_pending=1):
                ckptio.async_save({"w": torch.ones(10)}, tmp_path / "b", max_shard_size="1GB")
            returned.set()

        t = threading.Thread(target=second_call)
        t.start()
        assert not returned.wait(0.3), "a second save started while the first was in flight"
        directory_gate.open.set()
        first.result(timeout=60)
        t.join(60)
        assert returned.is_set()


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_directory_manifest(tmp_path: Path, fmt: str) -> None:
    from ckptio import _verify

    sd = {f"w{i}": torch.randn(40, 30 + i) for i in range(6)}
    future = ckptio.async_save(sd, tmp_path / "m", max_shard_size=12_000, format=fmt, manifest=True)
    future.result(timeout=60)
    listed = json.loads((tmp_path / "m" / _verify.MANIFEST_NAME).read_text())["files"]
    assert sorted(listed) == sorted(n for n in _files(tmp_path / "m") if n != _verify.MANIFEST_NAME)
    got = ckptio.load(tmp_path / "m", verify=True)
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_directory_refusals_raise_at_the_call(tmp_path: Path) -> None:
    """What save refuses before writing raises from async_save itself, with save's errors;
    nothing is written and nothing stays in flight."""
    d = tmp_path / "d"
    sd = {"w": torch.ones(2)}
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"obj": {"w": torch.ones(2), "step": 3}}, TypeError, r"'step' \(int\)"),
        ({"obj": [torch.ones(1)]}, TypeError, "flat dict of str -> torch.Tensor, got list"),
        ({"format": "npz"}, ValueError, "format must be 'torch' or 'safetensors'"),
        ({"format": "safetensors", "clone_shared": True}, ValueError, "clone_shared does not"),
        ({"metadata": {"a": "b"}}, ValueError, "metadata applies only to format='safetensors'"),
        ({"format": "safetensors", "metadata": {"total_size": "1"}}, ValueError, "'total_size'"),
        ({"max_shard_size": "5G"}, ValueError, "has no known unit"),
        ({"max_shard_size": 0}, ValueError, "at least 1 byte"),
        ({"f": "s3://bucket/dir"}, NotImplementedError, "not supported yet"),
        ({"f": io.BytesIO()}, TypeError, "f must be a path"),
        (
            {"obj": {"c": torch.ones(2, dtype=torch.complex128)}, "format": "safetensors"},
            ValueError,
            "which safetensors cannot store",
        ),
        (
            {"obj": dict(zip("ab", torch.ones(8).chunk(2), strict=True)), "format": "safetensors"},
            ValueError,
            "view only part of their storage",
        ),
    ]
    for case, error, fragment in cases:
        args = {"obj": sd, "f": d, "max_shard_size": "1GB", **case}
        with pytest.raises(error, match=fragment):
            ckptio.async_save(args.pop("obj"), args.pop("f"), **args)
    with pytest.raises(ValueError, match="manifest applies to a directory save"):
        ckptio.async_save(sd, tmp_path / "a.pt", manifest=True)
    assert ckptio.wait_all(60)
    assert os.listdir(tmp_path) == []
    assert async_module._scheduler._in_flight == 0


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_a_failed_directory_write_keeps_the_previous_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    d = tmp_path / "d"
    ckptio.save(_directory_state(), d, max_shard_size=2000, format=fmt)
    before = _files(d)
    calls: list[int] = []
    # The second shard's write fails: safetensors shards are written by save_directory, torch
    # shards from the pickles async_save made.
    if fmt == "safetensors":
        module, name = ckptio._safetensors, "write"
    else:
        module, name = async_module, "write_torch_archive"
    real = getattr(module, name)

    def write_then_fail(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, write_then_fail)
    state = {k: v + 1 for k, v in _directory_state().items()}
    future = ckptio.async_save(state, d, max_shard_size=2000, format=fmt)
    with pytest.raises(OSError, match="No space left"):
        future.result(timeout=60)
    assert len(calls) == 2
    assert _files(d) == before
    assert os.listdir(tmp_path) == ["d"]  # the temporary directory is gone
    assert async_module._scheduler._in_flight == 0
    monkeypatch.setattr(module, name, real)  # the next save goes through
    ckptio.async_save(state, d, max_shard_size=2000, format=fmt).result(timeout=60)
    assert torch.equal(ckptio.load(d)["layers.0.weight"], state["layers.0.weight"])


def test_a_safetensors_file_is_written_from_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without max_shard_size, format='safetensors' writes one file, byte for byte save's, of
    the values at the call (the tensors are zeroed before the write may start)."""
    opened = threading.Event()
    real_save = async_module.save

    def gated(*args: Any, **kwargs: Any) -> None:
        assert opened.wait(60), "the gate was never opened"
        real_save(*args, **kwargs)

    monkeypatch.setattr(async_module, "save", gated)
    sd = {k: v.contiguous() for k, v in _directory_state().items() if k != "lm_head.weight"}
    (tmp_path / "sync").mkdir()
    ckptio.save(sd, tmp_path / "sync" / "m.safetensors", format="safetensors", metadata={"a": "b"})
    future = ckptio.async_save(
        sd, tmp_path / "m.safetensors", format="safetensors", metadata={"a": "b"}
    )
    for v in sd.values():
        v.zero_()
    opened.set()
    future.result(timeout=60)
    assert (tmp_path / "m.safetensors").read_bytes() == (
        tmp_path / "sync" / "m.safetensors"
    ).read_bytes()
    w = torch.ones(4)
    with pytest.raises(ValueError, match="share memory"):
        ckptio.async_save({"a": w, "b": w}, tmp_path / "tied.safetensors", format="safetensors")
    assert not (tmp_path / "tied.safetensors").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_cuda_directory_is_staged_in_pinned_memory(
    tmp_path: Path, fmt: str, directory_gate: Gate
) -> None:
    sd = {k: v.cuda() for k, v in _directory_state().items()}
    sd["lm_head.weight"] = sd["embed.weight"]
    ckptio.save(sd, tmp_path / "sync", max_shard_size=2000, format=fmt)
    future = ckptio.async_save(sd, tmp_path / "async", max_shard_size=2000, format=fmt)
    for v in sd.values():
        v.zero_()
    directory_gate.open.set()
    future.result(timeout=60)
    assert _files(tmp_path / "async") == _files(tmp_path / "sync")
    assert any(b.pinned for b in async_module._scheduler._idle)
