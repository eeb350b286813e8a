"""Rank processes of tests/test_dcp.py (torch.multiprocessing spawn, gloo on the CPU).

Each rank saves a sharded state dict with ckptio.dcp.Writer (sync and dcp.async_save) and
with the stock FileSystemWriter, then loads each checkpoint back into a state dict sharded
differently (resharding 2 -> 2) and rank 0 writes the gathered results for the test.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import ckptio.dcp


def full_state() -> dict[str, Any]:
    """The checkpoint's content as plain tensors and values (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(8, 6, generator=g),
        "emb": torch.randn(10, 4, generator=g).to(torch.bfloat16),
        "odd": torch.randn(5, 3, generator=g),  # 5 rows over 2 ranks: uneven shards
        "b": torch.arange(5, dtype=torch.int64),
        "step": 7,
        "extra": {"lr": 0.125, "names": ["a", "b"], "betas": (0.9, 0.999)},
    }


def empty_like_state() -> dict[str, Any]:
    full = full_state()
    return {
        "w": torch.zeros_like(full["w"]),
        "emb": torch.zeros_like(full["emb"]),
        "odd": torch.zeros_like(full["odd"]),
        "b": torch.zeros_like(full["b"]),
        "step": 0,
        "extra": {"lr": 0.0, "names": [], "betas": (0.0, 0.0)},
    }


def _shard(state: dict[str, Any], mesh: Any, placements: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    for key, placement in placements.items():
        out[key] = distribute_tensor(state[key], mesh, [placement])
    return out


def gathered(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def run(rank: int, world: int, directory: str) -> None:
    faulthandler.enable()  # a crash prints every thread's Python stack to the test's stderr
    _save_and_load(rank, world, directory)
    # Done: leave without finalizing the interpreter. torch's gloo worker threads may still be
    # releasing a finished collective's tensors when the interpreter finalizes; that release
    # takes the GIL, Python ends such a thread with pthread_exit, and the unwind reaches a
    # noexcept frame: std::terminate, SIGABRT ("terminate called without an active
    # exception"), in 4 of ~170 runs with two runs side by side on the 2-core development
    # machine, in torch's code after all of ours has run
    # (core dump: c10d::ProcessGroupGloo::runLoop -> ~AsyncAllgatherCoalescedWork ->
    # TensorImpl::decref_pyobject -> gil_scoped_acquire during Py_FinalizeEx). A failure
    # above still raises, and spawn reports its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _save_and_load(rank: int, world: int, directory: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(directory, 'rendezvous')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        mesh = init_device_mesh("cpu", (world,))
        saved = _shard(full_state(), mesh, {"w": Shard(0), "emb": Shard(1), "odd": Shard(0)})
        dcp.save(saved, storage_writer=ckptio.dcp.Writer(os.path.join(directory, "ckptio")))
        dcp.save(saved, storage_writer=FileSystemWriter(os.path.join(directory, "stock")))
        future = dcp.async_save(
            saved, storage_writer=ckptio.dcp.Writer(os.path.join(directory, "async"))
        )
        future.result(timeout=60)
        dist.barrier()
        readers = {
            "ckptio": ckptio.dcp.Reader(os.path.join(directory, "ckptio")),
            "stock": FileSystemReader(os.path.join(directory, "stock")),
            "async": ckptio.dcp.Reader(os.path.join(directory, "async")),
        }
        for name, reader in readers.items():
            # Sharded differently from the save: every rank needs pieces of both files.
            target = _shard(
                empty_like_state(), mesh, {"w": Shard(1), "emb": Shard(0), "odd": Shard(1)}
            )
            dcp.load(target, storage_reader=reader)
            result = gathered(target)
            if rank == 0:
                torch.save(result, os.path.join(directory, f"loaded2-{name}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
