"""Crash safety: a saver SIGKILLed at random moments, a file-size limit, a full disk.

The target path must always hold the previous complete checkpoint or the new complete one;
temporary files must be recognisable (host and pid in the name) and removed by the next save
once their writer is dead; a write that fails (EFBIG, ENOSPC) must raise OSError with the
errno, keep the previous checkpoint and leave no temporary file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio import _core, _files

from conftest import assert_same

WORKER = Path(__file__).with_name("_crash_worker.py")
TEMP = re.compile(r"^\.ckpt\.pt\.ckptio-[0-9a-f]{8}-(\d+)-[0-9a-f]{8}\.tmp$")


def test_sigkill_at_random_moments_keeps_a_complete_checkpoint(tmp_path: Path) -> None:
    cfg = {
        "directory": str(tmp_path),
        "numel": 1 << 19,  # 4 tensors of 2 MiB
        "seed": 7,
        "seconds": 15,
        "max_iterations": 300,
    }
    proc = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    iterations = report["iterations"]
    assert len(iterations) >= 30, f"only {len(iterations)} iterations ran"
    bad = [it for it in iterations if it["outcome"] == 2]
    assert not bad, f"torn or unloadable checkpoint after a kill: {bad[:3]}\n{proc.stderr}"
    killed_pids = {it["pid"] for it in iterations if it["killed"]}
    for it in iterations:
        for name in it["temps"]:
            match = TEMP.match(name)
            assert match, f"unexpected file {name!r} beside the checkpoint"
            assert int(match.group(1)) in killed_pids, f"{name} belongs to no killed saver"
    outcomes = [it["outcome"] for it in iterations]
    # The kills landed both before and after the rename, and some while the file was written.
    assert 0 in outcomes and 1 in outcomes, outcomes
    assert any(it["temps"] for it in iterations), "no kill landed while a temp file existed"
    final = report["final"]
    assert final["exit"] == 0 and final["outcome"] == 1
    assert final["listing"] == ["ckpt.pt"], "stale temporary files were not removed"


def test_stale_temp_files_of_live_or_foreign_writers_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = _files.temp_file_name("ckpt.pt", os.getpid())
    stale = _files.temp_file_name("ckpt.pt", dead.pid)
    other_host = f".ckpt.pt.ckptio-00000000-{dead.pid}-0123abcd.tmp"
    other_target = _files.temp_file_name("other.pt", dead.pid)
    for name in (mine, stale, other_host, other_target):
        (tmp_path / name).write_bytes(b"partial")
    ckptio.save({"w": torch.ones(3)}, target)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert stale not in left  # its writer is dead: removed
    assert sorted([mine, other_host, other_target, "ckpt.pt"]) == left
    assert_same({"w": torch.ones(3)}, torch.load(target))


_LIMITED_SAVE = textwrap.dedent(
    """
    import errno, json, os, resource, signal, sys, torch, ckptio
    path, limit, preallocate = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        with ckptio.options(preallocate=preallocate):
            ckptio.save({"generation": 2, "w": torch.ones(4 << 20)}, path)
    except OSError as e:
        print(json.dumps({"errno": e.errno, "type": type(e).__name__, "message": str(e)}))
    else:
        print(json.dumps({"errno": None}))
    """
)


@pytest.mark.parametrize("preallocate", [True, False], ids=["prealloc", "no-prealloc"])
def test_file_size_limit_raises_efbig_and_keeps_previous(tmp_path: Path, preallocate: bool) -> None:
    target = tmp_path / "ckpt.pt"
    previous = {"generation": 1, "w": torch.arange(1000.0)}
    ckptio.save(previous, target)
    before = target.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED_SAVE, str(target), str(1 << 20), str(int(preallocate))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["errno"] == errno.EFBIG, result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert target.read_bytes() == before
    assert_same(previous, ckptio.load(target))


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a user namespace")
@pytest.mark.parametrize("preallocate", [True, False], ids=["prealloc", "no-prealloc"])
def test_full_disk_raises_enospc_and_keeps_previous(tmp_path: Path, preallocate: bool) -> None:
    """A 4 MiB tmpfs (private to a user+mount namespace) holds the previous checkpoint; a
    16 MiB save into it fails with ENOSPC."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    script = textwrap.dedent(
        """
        import json, os, sys, torch, ckptio
        d, preallocate = sys.argv[1], sys.argv[2] == "1"
        path = os.path.join(d, "ckpt.pt")
        previous = {"generation": 1, "w": torch.arange(1000.0)}
        ckptio.save(previous, path)
        before = open(path, "rb").read()
        try:
            with ckptio.options(preallocate=preallocate):
                ckptio.save({"generation": 2, "w": torch.ones(4 << 20)}, path)
            err = None
        except OSError as e:
            err = e.errno
        same = open(path, "rb").read() == before
        loaded = ckptio.load(path)
        ok = loaded["generation"] == 1 and torch.equal(loaded["w"], previous["w"])
        print(json.dumps({"errno": err, "same": same, "ok": ok, "listing": sorted(os.listdir(d))}))
        """
    )
    command = (
        f"mount -t tmpfs -o size=4m tmpfs {mount_point} && "
        f"exec {sys.executable} -c '{script}' {mount_point} {int(preallocate)}"
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {"errno": errno.ENOSPC, "same": True, "ok": True, "listing": ["ckpt.pt"]}


@pytest.mark.parametrize("durable", [False, True], ids=["not-durable", "durable"])
def test_durable_fsyncs_the_file_then_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    events: list[str] = []
    real_sync = _core.io.File.sync
    real_sync_directory = _core.io.sync_directory

    def file_sync(self: Any) -> None:
        events.append(f"file:{'tmp' if self.name.endswith('.tmp') else self.name}")
        real_sync(self)

    def sync_directory(path: str) -> None:
        assert os.path.samefile(path, tmp_path)
        events.append(f"dir:{'renamed' if (tmp_path / 'ckpt.pt').exists() else 'absent'}")
        real_sync_directory(path)

    monkeypatch.setattr(_core.io.File, "sync", file_sync)
    monkeypatch.setattr(_core.io, "sync_directory", sync_directory)
    with ckptio.options(durable=durable):
        ckptio.save({"w": torch.ones(100)}, tmp_path / "ckpt.pt")
    # The data reaches the disk before the rename, the directory entry after it.
    assert events == (["file:tmp", "dir:renamed"] if durable else [])
    assert torch.equal(torch.load(tmp_path / "ckpt.pt")["w"], torch.ones(100))
