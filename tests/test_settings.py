"""ckptio's knobs: environment variables, set_options, the options() context manager, and
what the knobs may and may not change (files are identical whatever the thread count)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

import ckptio
from ckptio import settings

from conftest import assert_same, assert_same_sharing, make_model

_PRINT_OPTIONS = (
    "import dataclasses, json, ckptio; print(json.dumps(dataclasses.asdict(ckptio.get_options())))"
)


def _child_options(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CKPTIO_")}
    return subprocess.run(
        [sys.executable, "-c", _PRINT_OPTIONS],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_environment_variables() -> None:
    proc = _child_options(
        {
            "CKPTIO_THREADS": "3",
            "CKPTIO_REMOTE_PART_BYTES": "0x1000000",
            "CKPTIO_CHUNK_BYTES": "0x100000",
            "CKPTIO_DATA_ALIGNMENT": "512",
            "CKPTIO_CRC32": "yes",  # the former name of CKPTIO_WRITE_CRC32
            "CKPTIO_VERIFY": "on",
            "CKPTIO_DURABLE": "1",
            "CKPTIO_PREALLOCATE": "off",
            "CKPTIO_HUGE_PAGES": "false",
            "CKPTIO_OVERLAP_READS": "0",
            "CKPTIO_RECYCLE_MEMORY": "no",
            "CKPTIO_RECYCLE_MAX_BYTES": "0x40000000",
            "CKPTIO_STAGING_BUFFER_BYTES": "0x200000",
            "CKPTIO_STAGING_BUFFERS": "2",
            "CKPTIO_ASYNC_MAX_PENDING": "3",
            "CKPTIO_WRITE_CHUNK_BYTES": "0x100000",
            "CKPTIO_RECYCLE_IDLE_SECONDS": "2.5",
            "CKPTIO_REMOTE_INFLIGHT_BYTES": "0x4000000",
            "CKPTIO_REMOTE_CACHE_DIR": "/var/cache/ckptio",
        }
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "threads": 3,
        "remote_part_bytes": 16 << 20,
        "chunk_bytes": 1 << 20,
        "write_chunk_bytes": 1 << 20,
        "data_alignment": 512,
        "write_crc32": True,
        "verify": True,
        "durable": True,
        "preallocate": False,
        "huge_pages": False,
        "overlap_reads": False,
        "recycle_memory": False,
        "recycle_max_bytes": 1 << 30,
        "recycle_idle_seconds": 2.5,
        "staging_buffer_bytes": 2 << 20,
        "staging_buffers": 2,
        "async_max_pending": 3,
        "remote_inflight_bytes": 64 << 20,
        "remote_cache_dir": "/var/cache/ckptio",
    }


def test_environment_defaults() -> None:
    proc = _child_options({})
    assert proc.returncode == 0, proc.stderr
    opts = json.loads(proc.stdout)
    assert opts["threads"] >= 1
    assert {k: v for k, v in opts.items() if k != "threads"} == {
        "chunk_bytes": 8 << 20,
        "remote_part_bytes": 8 << 20,
        "write_chunk_bytes": 64 << 20,
        "data_alignment": 4096,
        "write_crc32": False,
        "verify": False,
        "durable": False,
        "preallocate": True,
        "huge_pages": not settings._host_takes_back_free_memory(),
        "overlap_reads": True,
        "recycle_memory": True,
        "recycle_max_bytes": 2 << 30,
        "recycle_idle_seconds": 10.0,
        "staging_buffer_bytes": 32 << 20,
        "staging_buffers": 4,
        "async_max_pending": 2,
        "remote_inflight_bytes": 128 << 20,
        "remote_cache_dir": None,
    }


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ("0110010100000000", True),  # this development VM's balloon: bit 5 set
        ("0110000100000000", False),  # a balloon without free page reporting
        ("01100", False),  # too short to have bit 5
        (None, False),  # no balloon at all
    ],
    ids=["reporting", "no-reporting", "short", "no-balloon"],
)
def test_huge_pages_default_follows_free_page_reporting(
    tmp_path: Path, features: Optional[str], expected: bool
) -> None:
    """A VM whose balloon reports free pages (VIRTIO_BALLOON_F_REPORTING, bit 5 of the
    device's feature string) gives huge pages back to the host: huge_pages defaults off."""
    drivers = tmp_path / "bus" / "virtio" / "drivers"
    (drivers / "virtio_net" / "virtio1").mkdir(parents=True)
    (drivers / "virtio_net" / "virtio1" / "features").write_text("1" * 64 + "\n")
    if features is not None:
        (drivers / "virtio_balloon" / "virtio0").mkdir(parents=True)
        (drivers / "virtio_balloon" / "virtio0" / "features").write_text(features + "\n")
    assert settings._host_takes_back_free_memory(str(tmp_path)) is expected
    (drivers / "virtio_balloon" / "virtio3" / "features").mkdir(parents=True)  # unreadable
    assert settings._host_takes_back_free_memory(str(tmp_path)) is expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CKPTIO_FSYNC": "1"}, True),
        ({"CKPTIO_FSYNC": "1", "CKPTIO_DURABLE": "0"}, False),
    ],
    ids=["former-name", "new-name-wins"],
)
def test_durable_environment_variable_and_its_former_name(
    env: dict[str, str], expected: bool
) -> None:
    proc = _child_options(env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["durable"] is expected


@pytest.mark.parametrize(
    ("name", "value"), [("CKPTIO_THREADS", "many"), ("CKPTIO_RECYCLE_MEMORY", "sometimes")]
)
def test_bad_environment_variable_names_the_variable(name: str, value: str) -> None:
    proc = _child_options({name: value})
    assert proc.returncode != 0
    assert name in proc.stderr and "ValueError" in proc.stderr


def test_options_context_restores() -> None:
    before = ckptio.get_options()
    with ckptio.options(threads=2, crc32=True) as inner:
        assert inner == ckptio.get_options()
        assert (inner.threads, inner.crc32) == (2, True)
        assert inner.data_alignment == before.data_alignment  # untouched knobs kept
        with ckptio.options(threads=5):
            assert ckptio.get_options().threads == 5
            assert ckptio.get_options().crc32 is True
        assert ckptio.get_options() == inner
    assert ckptio.get_options() == before


def test_options_context_restores_after_an_exception() -> None:
    before = ckptio.get_options()
    with pytest.raises(KeyError), ckptio.options(threads=7):
        raise KeyError("inside")
    assert ckptio.get_options() == before


def test_options_are_per_thread() -> None:
    seen: dict[str, int] = {}
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        inside.wait(timeout=10)
        seen["other"] = ckptio.get_options().threads
        release.set()

    worker = threading.Thread(target=other)
    worker.start()
    default_threads = ckptio.get_options().threads
    with ckptio.options(threads=default_threads + 3):
        inside.set()
        release.wait(timeout=10)
        seen["mine"] = ckptio.get_options().threads
    worker.join()
    assert seen == {"other": default_threads, "mine": default_threads + 3}


def test_set_options(restore_options: None) -> None:
    result = ckptio.set_options(threads=3, chunk_bytes=1 << 16)
    assert result == ckptio.get_options()
    assert (result.threads, result.chunk_bytes) == (3, 1 << 16)
    with ckptio.options(threads=1):
        ckptio.set_options(crc32=True)  # process-wide, but this block keeps its own options
        assert ckptio.get_options().crc32 is False
    assert ckptio.get_options().crc32 is True
    assert ckptio.get_options().threads == 3


@pytest.mark.parametrize(
    "changes",
    [
        {"threads": 0},
        {"chunk_bytes": 1},
        {"write_chunk_bytes": 4095},
        {"data_alignment": 1000},
        {"preallocate": None},
        {"staging_buffer_bytes": 4096},
        {"staging_buffers": 0},
        {"recycle_memory": "yes"},
        {"recycle_max_bytes": -1},
        {"recycle_max_bytes": True},
        {"recycle_idle_seconds": -1},
        {"recycle_idle_seconds": float("nan")},
        {"recycle_idle_seconds": "10"},
        {"bogus": True},
    ],
    ids=[
        "threads=0",
        "chunk_bytes=1",
        "write_chunk_bytes=4095",
        "data_alignment=1000",
        "preallocate=None",
        "staging_buffer_bytes=4096",
        "staging_buffers=0",
        "recycle_memory=str",
        "recycle_max_bytes=-1",
        "recycle_max_bytes=True",
        "recycle_idle_seconds=-1",
        "recycle_idle_seconds=nan",
        "recycle_idle_seconds=str",
        "unknown",
    ],
)
def test_set_options_validation(restore_options: None, changes: dict[str, Any]) -> None:
    before = ckptio.get_options()
    with pytest.raises((ValueError, TypeError)):
        ckptio.set_options(**changes)
    assert ckptio.get_options() == before


def test_options_are_frozen() -> None:
    opts = ckptio.get_options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.threads = 99  # type: ignore[misc]


# --------------------------------------------------------------- knobs do not change bytes
def _payload() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": make_model().state_dict(),
        "big": torch.randn(200_000, generator=g),
        "mid": torch.randn(3000, generator=g),
        "empty": torch.empty(0),
        "i": torch.arange(1000),
    }


@pytest.fixture(scope="module")
def reference_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, bytes]:
    out = {}
    for crc in (False, True):
        path = tmp_path_factory.mktemp("ref") / "ckpt.pt"
        with ckptio.options(threads=1, crc32=crc):
            ckptio.save(_payload(), path)
        out[crc] = path.read_bytes()
    return out


@pytest.mark.parametrize("crc32", [False, True], ids=["crc-off", "crc-on"])
@pytest.mark.parametrize("chunk_bytes", [4096, 8 << 20], ids=["chunk4k", "chunk8M"])
@pytest.mark.parametrize("threads", [1, 2, 4, 8], ids=lambda t: f"threads{t}")
def test_thread_count_does_not_change_the_file(
    tmp_path: Path, reference_bytes: dict[bool, bytes], threads: int, chunk_bytes: int, crc32: bool
) -> None:
    path = tmp_path / "ckpt.pt"
    with ckptio.options(threads=threads, write_chunk_bytes=chunk_bytes, crc32=crc32):
        ckptio.save(_payload(), path)
    assert path.read_bytes() == reference_bytes[crc32]


@pytest.mark.parametrize("preallocate", [False, True], ids=["no-prealloc", "prealloc"])
@pytest.mark.parametrize("durable", [False, True], ids=["not-durable", "durable"])
def test_durability_knobs_do_not_change_the_file(
    tmp_path: Path, reference_bytes: dict[bool, bytes], preallocate: bool, durable: bool
) -> None:
    path = tmp_path / "ckpt.pt"
    with ckptio.options(preallocate=preallocate, durable=durable):
        ckptio.save(_payload(), path)
    assert path.read_bytes() == reference_bytes[False]


@pytest.mark.parametrize("threads", [1, 4], ids=lambda t: f"threads{t}")
@pytest.mark.parametrize("chunk_bytes", [4096, 8 << 20], ids=["chunk4k", "chunk8M"])
@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
def test_thread_count_does_not_change_what_loads(
    tmp_path: Path, threads: int, chunk_bytes: int, mmap: bool
) -> None:
    path = tmp_path / "ckpt.pt"
    obj = _payload()
    torch.save(obj, path)
    with ckptio.options(threads=threads, chunk_bytes=chunk_bytes):
        loaded = ckptio.load(path, mmap=mmap)
    assert_same(obj, loaded)
    assert_same_sharing(obj, loaded)


def test_buffer_target_ignores_thread_count(reference_bytes: dict[bool, bytes]) -> None:
    """A file object is written sequentially: the thread count cannot change its bytes."""
    outs = []
    for threads in (1, 4):
        buf = io.BytesIO()
        with ckptio.options(threads=threads):
            ckptio.save(_payload(), buf)
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]
    assert_same(_payload(), torch.load(io.BytesIO(outs[0])))
