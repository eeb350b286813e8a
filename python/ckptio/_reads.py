"""The one read engine: a reader says which byte ranges of a file it needs and where each one
goes; a :class:`ReadBatch` reads them all, host memory in one parallel batch, device memory
through the pinned staging ring.

Every reader describes its reads this way: ``load`` (and safetensors' load) through the
StorageLoader, ``open``'s handles, ``load_into`` and the DCP reader. Where a storage goes is
decided beforehand, in one place (:class:`_placement.Placement`):

* **host memory** at an address the caller keeps alive (a fresh storage, the load's block of
  small storages, an existing CPU tensor): parallel ``pread`` in C++ with the GIL released
  (:func:`_files.read_into`);
* **device memory** through the pinned ring: the ring of a load's :class:`DeviceTarget`
  (one per device per load, or per open handle), or for existing device tensors the ring of
  their device (:func:`_staging.stream_to_device`);
* a **mapping** (``mmap=True``) needs no read: its storages are views of it.
"""

from __future__ import annotations

import array
from typing import Any

from . import _staging
from ._files import Source, read_into

__all__ = ["ReadBatch"]


class ReadBatch:
    """Reads of one source, gathered, then done by :meth:`run`."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._host = array.array("Q")  # (file offset, length, address) triples
        self._targets: dict[int, tuple[_staging.DeviceTarget, list[tuple[int, int, Any]]]] = {}
        self._devices: list[tuple[int, int, Any]] = []
        self._staged: dict[Any, bool] = {}  # by device: does it have a staging ring

    def stages(self, device: Any) -> bool:
        """Whether reads into existing memory on `device` go through the pinned ring
        (:meth:`to_device`: CUDA), asked once per device and batch."""
        staged = self._staged.get(device)
        if staged is None:
            staged = self._staged[device] = _staging.copier_for(device) is not None
        return staged

    def to_host(self, offset: int, nbytes: int, address: int) -> None:
        """`nbytes` at `offset` go to host memory at `address`."""
        self._host.extend((offset, nbytes, address))

    def to_host_many(self, triples: bytes) -> None:
        """Host reads already laid out as uint64 (offset, length, address) triples."""
        self._host.frombytes(triples)

    def to_target(self, target: _staging.DeviceTarget, offset: int, nbytes: int, dest: Any) -> None:
        """`nbytes` at `offset` go to the start of `dest` (memory `target` allocated, or a
        view of it) through `target`'s ring."""
        self._targets.setdefault(id(target), (target, []))[1].append((offset, nbytes, dest))

    def to_device(self, offset: int, nbytes: int, dest: Any) -> None:
        """`nbytes` at `offset` go to the start of `dest`, an existing contiguous tensor or
        storage on a staged device (CUDA), through that device's ring."""
        self._devices.append((offset, nbytes, dest))

    def __bool__(self) -> bool:
        return bool(self._host or self._targets or self._devices)

    def run(self) -> None:
        """Reads everything gathered (host first, then each device's ring) and empties the
        batch. When it returns, every byte is in place; for device memory the caller's
        current stream is ordered after the copies."""
        host, self._host = self._host, array.array("Q")
        targets, self._targets = self._targets, {}
        devices, self._devices = self._devices, []
        read_into(self.source, host)
        for target, requests in targets.values():
            target.load(self.source, requests)
        if devices:
            _staging.stream_to_device(self.source, devices)
