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
import concurrent.futures as cf
from typing import Any

from . import _core, _staging
from ._files import Source, read_into, read_many
from ._verify import checker_of

__all__ = ["ReadBatch"]

_NATIVE_SOURCES = (_core.io.File, _core.io.BufferSource)
#: Remote objects read at once by one batch (each with its own GETs in flight).
REMOTE_AT_ONCE = 4


class ReadBatch:
    """Reads gathered from one source or several (the shards of a model directory), then
    done by :meth:`run` as one plan."""

    def __init__(self, source: Source) -> None:
        self.source = source  # where reads go that name no source of their own
        self._host: dict[
            int, tuple[Source, array.array]
        ] = {}  # by source: (offset, length, address)
        self._targets: dict[
            int, tuple[_staging.DeviceTarget, list[tuple[Source, int, int, Any]]]
        ] = {}
        self._devices: list[tuple[Source, int, int, Any]] = []
        self._staged: dict[Any, bool] = {}  # by device: does it have a staging ring

    def stages(self, device: Any) -> bool:
        """Whether reads into existing memory on `device` go through the pinned ring
        (:meth:`to_device`: CUDA), asked once per device and batch."""
        staged = self._staged.get(device)
        if staged is None:
            staged = self._staged[device] = _staging.copier_for(device) is not None
        return staged

    def _host_of(self, source: Source | None) -> array.array:
        source = self.source if source is None else source
        entry = self._host.get(id(source))
        if entry is None:
            entry = self._host[id(source)] = (source, array.array("Q"))
        return entry[1]

    def to_host(self, offset: int, nbytes: int, address: int, source: Source | None = None) -> None:
        """`nbytes` at `offset` of `source` (by default the batch's) go to host memory at
        `address`."""
        self._host_of(source).extend((offset, nbytes, address))

    def to_host_many(self, triples: bytes, source: Source | None = None) -> None:
        """Host reads of `source` (by default the batch's) already laid out as uint64
        (offset, length, address) triples."""
        self._host_of(source).frombytes(triples)

    def to_target(
        self,
        target: _staging.DeviceTarget,
        offset: int,
        nbytes: int,
        dest: Any,
        source: Source | None = None,
    ) -> None:
        """`nbytes` at `offset` go to the start of `dest` (memory `target` allocated, or a
        view of it) through `target`'s ring."""
        source = self.source if source is None else source
        self._targets.setdefault(id(target), (target, []))[1].append((source, offset, nbytes, dest))

    def to_device(self, offset: int, nbytes: int, dest: Any, source: Source | None = None) -> None:
        """`nbytes` at `offset` go to the start of `dest`, an existing contiguous tensor or
        storage on a staged device (CUDA), through that device's ring."""
        self._devices.append((self.source if source is None else source, offset, nbytes, dest))

    def absorb(self, other: ReadBatch) -> None:
        """Takes over every read `other` gathered (from its sources), leaving it empty: the
        reads of several loaders become one plan."""
        for key, (source, triples) in other._host.items():
            mine = self._host.get(key)
            if mine is None:
                self._host[key] = (source, triples)
            else:
                mine[1].extend(triples)
        for key, (target, requests) in other._targets.items():
            self._targets.setdefault(key, (target, []))[1].extend(requests)
        self._devices.extend(other._devices)
        other._host, other._targets, other._devices = {}, {}, []

    def __bool__(self) -> bool:
        return any(len(t) for _, t in self._host.values()) or bool(self._targets or self._devices)

    def run(self) -> None:
        """Reads everything gathered (host memory of every source in one parallel plan, then
        each device's ring) and empties the batch. When it returns, every byte is in place;
        for device memory the caller's current stream is ordered after the copies."""
        host, self._host = self._host, {}
        targets, self._targets = self._targets, {}
        devices, self._devices = self._devices, []
        batches = [(source, triples) for source, triples in host.values() if len(triples)]
        # A source of its own kind (a remote object: _remote) reads its share itself; the
        # C++ sources (File, BufferSource) go in one plan.
        native = [b for b in batches if isinstance(b[0], _NATIVE_SOURCES)]
        remote = [b for b in batches if not isinstance(b[0], _NATIVE_SOURCES)]
        if len(remote) == 1:
            read_into(*remote[0])
        elif remote:
            # Several remote objects (a directory's shards): read side by side, each by its
            # own concurrent GETs, so one object's last GETs do not leave the link idle.
            with cf.ThreadPoolExecutor(min(len(remote), REMOTE_AT_ONCE)) as pool:
                for future in [pool.submit(read_into, *batch) for batch in remote]:
                    future.result()  # the first failure in the batch's order
        if len(native) == 1:
            read_into(*native[0])
        elif native:
            read_many(native)
        for target, requests in targets.values():
            for source, group in _by_source(requests):
                target.load(source, group)
        for source, group in _by_source(devices):
            _staging.stream_to_device(source, group)
        if targets or devices:
            # verify: records streamed through a ring in pieces are checked once complete
            for source, _ in _by_source([r for _, rs in targets.values() for r in rs] + devices):
                checker = checker_of(source)
                if checker is not None:
                    checker.settle(source)


def _by_source(
    requests: list[tuple[Source, int, int, Any]],
) -> list[tuple[Source, list[tuple[int, int, Any]]]]:
    """(source, [(offset, length, dest)...]) per source, in first-seen order."""
    groups: dict[int, tuple[Source, list[tuple[int, int, Any]]]] = {}
    for source, offset, nbytes, dest in requests:
        groups.setdefault(id(source), (source, []))[1].append((offset, nbytes, dest))
    return list(groups.values())
