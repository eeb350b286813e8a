"""The save pipeline: pickle bytes + payloads -> aligned records -> a File or a file object.

Every save goes through here: ``save`` and ``async_save`` (torch archives), the DCP writer
(an archive of its own records) and safetensors (a header and tensors, no zip container).

Payloads are what a record holds: a bytes-like object, an ``(address, nbytes)`` pair of host
memory the caller keeps alive, or a :class:`DevicePayload`, a storage in device memory that
streams out through the staging ring (_staging.py) instead of being copied whole to the host.

Destinations are a ``_core.io.File`` or a writable file object (_files.write_to picks and
prepares one: a path is written atomically):

- into a File, :class:`RecordWriter` hands each host payload to the C++ ArchiveWriter, whose
  workers write it (parallel ``pwrite``) while the caller goes on: a torch save adds each CPU
  storage as the pickler finds it (streaming, :func:`save_object`); device payloads are
  reserved and written at the end (:func:`write_payloads_at`);
- into a file object, the records are buffered until the end, then written in file order.

Record layouts (which records, their order and alignment) are _archive's; the bytes written
are the same whatever the destination.
"""

from __future__ import annotations

import array
import ctypes
import dataclasses
import sys
from typing import IO, Any, Sequence, Union

import torch

from . import _core, _staging, _verify
from ._align import ALIGNMENT
from ._archive import head_records, tail_records
from ._files import write_all
from ._pickler import dumps
from .settings import get_options

__all__ = [
    "DevicePayload",
    "Payload",
    "RecordWriter",
    "host_view",
    "payload_size",
    "save_object",
    "storage_payloads",
    "torch_records",
    "write_archive",
    "write_payloads_at",
    "write_placed",
    "write_torch_archive",
]


# ------------------------------------------------------------------------------- payloads
@dataclasses.dataclass(frozen=True)
class DevicePayload:
    """A record payload that lives in device memory and streams out through the ring."""

    storage: torch.UntypedStorage
    copier: _staging.Copier

    @property
    def nbytes(self) -> int:
        return int(self.storage.nbytes())


#: What a record holds (see the module docstring).
Payload = Union[bytes, bytearray, memoryview, "tuple[int, int]", DevicePayload]
Destination = Union[_core.io.File, IO[bytes]]


def payload_size(p: Any) -> int:
    """Bytes of a record's payload: a DevicePayload, an (address, nbytes) pair or a
    bytes-like object."""
    if isinstance(p, DevicePayload):
        return p.nbytes
    if isinstance(p, tuple):
        return int(p[1])
    return memoryview(p).nbytes


def storage_payloads(
    storages: Sequence[torch.UntypedStorage],
    copiers: dict[torch.device, _staging.Copier | None] | None = None,
) -> tuple[list[Any], list[Any]]:
    """The record payloads of storages being saved, and host copies that must stay alive
    meanwhile (the caller keeps `storages` alive too).

    CPU storages are written from their own memory ((address, nbytes) pairs); storages on a
    staged device (CUDA) become DevicePayloads, one copier per device, streamed through the
    ring; any other device is copied to the CPU whole. `copiers`: the copier of each device
    the caller already asked ``_staging.copier_for`` about (filled in as needed).
    """
    payloads: list[Any] = []
    keepalive: list[Any] = []  # host copies of storages of unstaged devices
    if copiers is None:
        copiers = {}
    cpu = torch.device("cpu")
    if cpu not in copiers:
        copiers[cpu] = _staging.copier_for(cpu)
    cpu_copier = copiers[cpu]  # None, unless a test stages CPU storages
    for storage in storages:
        device = storage.device
        if device.type == "cpu":  # the hot path: one test per storage
            if cpu_copier is None:
                payloads.append((storage.data_ptr(), storage.nbytes()))
                continue
            copier: _staging.Copier | None = cpu_copier
        else:
            if device not in copiers:
                copiers[device] = _staging.copier_for(device)
            copier = copiers[device]
        if copier is not None:
            payloads.append(DevicePayload(storage, copier))
            continue
        host = storage.cpu()
        keepalive.append(host)
        payloads.append((host.data_ptr(), host.nbytes()))
    return payloads, keepalive


def tensor_payload(
    t: torch.Tensor, copiers: dict[torch.device, _staging.Copier | None]
) -> tuple[Payload, torch.Tensor]:
    """The payload of a contiguous tensor's bytes, and the tensor to keep alive until they
    are written: CPU memory is written in place; a staged device's (CUDA) streams through the
    ring, from a storage holding exactly the tensor's bytes (a view is cloned on its device);
    any other device is copied to the CPU. `copiers`: as for :func:`storage_payloads`."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return b"", t
    device = t.device
    if device not in copiers:
        copiers[device] = _staging.copier_for(device)
    copier = copiers[device]
    if copier is not None:
        storage = t.untyped_storage()
        if t.storage_offset() or storage.nbytes() != nbytes:
            t = t.clone()
            storage = t.untyped_storage()
        return DevicePayload(storage, copier), t
    if device.type != "cpu":
        t = t.cpu()
    return (t.data_ptr(), nbytes), t


def host_view(payload: Payload) -> memoryview:
    """The bytes of a host payload (a DevicePayload has none: copy it to the CPU first)."""
    if isinstance(payload, DevicePayload):
        raise TypeError("a device payload has no host view; copy it to the CPU first")
    if isinstance(payload, tuple):
        address, nbytes = payload
        return _core.io.raw_memoryview(address, nbytes) if nbytes else memoryview(b"")
    return memoryview(payload).cast("B")


def write_payloads_at(
    file: _core.io.File, placed: Sequence[tuple[Any, int, Any]], *, crc32: bool
) -> dict[Any, int]:
    """Writes each (key, file offset, payload) of `placed`: DevicePayloads stream through
    their copier's ring (one pass per copier), host payloads go out in one parallel write.
    The payloads of records an archive writer reserved (ArchiveWriter.reserve) are written
    this way. With `crc32`, returns the CRC-32 of each key's payload, computed from the
    buffers as they are written (host payloads by the writing threads, piece by piece;
    device payloads on the pinned slots)."""
    opts = get_options()
    crcs: dict[Any, int] = {}
    by_copier: dict[int, tuple[_staging.Copier, list[tuple[int, int, Any]]]] = {}
    host = array.array("Q")
    host_keys: list[Any] = []  # the key of each request of `host`
    keepalive: list[Any] = []  # writable copies of bytes payloads, alive until the write
    for key, offset, p in placed:
        if isinstance(p, DevicePayload):
            if p.nbytes:
                entry = by_copier.setdefault(id(p.copier), (p.copier, []))
                entry[1].append((offset, p.nbytes, (key, entry[0].bind(p.storage))))
            elif crc32:
                crcs[key] = 0
            continue
        if isinstance(p, tuple):
            address, size = p
        else:
            copy = bytearray(p)  # small (headers, metadata): an address of its own
            keepalive.append(copy)
            size = len(copy)
            address = ctypes.addressof((ctypes.c_char * size).from_buffer(copy)) if size else 0
        if size:
            host.extend((offset, size, address))
            host_keys.append(key)
        elif crc32:
            crcs[key] = 0
    buffer_bytes, buffers, threads, chunk = _staging.ring_knobs()
    for copier, requests in by_copier.values():
        fills = _staging.plan_fills(requests, buffer_bytes)
        # Targets are (key, bound target): the copier sees the bound target, the key names
        # the CRC.
        for fill in fills:
            fill.keys = [t[0] for _, _, t, _ in fill.segments]
            fill.segments = [(h, m, t[1], o) for h, m, t, o in fill.segments]
        crcs.update(
            _staging.stream_out(
                file,
                fills,
                copier,
                buffers=buffers,
                threads=threads,
                chunk_bytes=chunk,
                crc32=crc32,
            )
        )
    if len(host):
        found = file.write_from(host, opts.threads, opts.write_chunk_bytes, crc32)
        if found is not None:
            crcs.update(zip(host_keys, found, strict=True))
    del keepalive
    return crcs


# ------------------------------------------------------------------------------- records
class RecordWriter:
    """The records of one zip archive (``<archive_name>/<name>``, each starting on its
    alignment) into a destination, in the order they are added.

    Into a File, each host payload is handed to the C++ ArchiveWriter as it is added (its
    workers write it while the caller goes on; the caller keeps (address, nbytes) memory
    alive until :meth:`finish` or :meth:`abandon` returns) and device payloads are reserved,
    then streamed out by :meth:`finish`. Into a file object, records are written in file
    order by :meth:`finish`. Used as a context manager, an exception abandons the archive.

    `crc32` records each record's CRC-32 in the archive (else zeros). `file_crc32` asks for
    the CRC-32 of the whole file (:attr:`file_crc`, set by :meth:`finish`), combined from the
    CRCs of every byte region written (headers, padding, payloads computed by the writing
    threads as they go out, descriptors, central directory), whether or not `crc32` records
    them: the digest a manifest lists (_verify.manifest_entry), with no second pass.
    """

    def __init__(
        self, destination: Destination, archive_name: str, *, crc32: bool, file_crc32: bool = False
    ) -> None:
        if (crc32 or file_crc32) and not _core.zip.crc32_available():
            raise RuntimeError("ckptio was built without zlib: CRC-32 is unavailable")
        self.destination = destination
        self.archive_name = archive_name
        self.crc32 = crc32
        self.file_crc32 = file_crc32
        #: The whole file's CRC-32 once :meth:`finish` has returned (`file_crc32` only).
        self.file_crc: int | None = None
        self._writer: _core.zip.ArchiveWriter | None = None
        self._reserved: list[tuple[int, Payload]] = []
        self._specs: list[tuple[str, int, int]] = []  # (name, size, alignment), in order
        self._payloads: list[Payload] = []  # a file object's, until finish
        if isinstance(destination, _core.io.File):
            opts = get_options()
            self._writer = _core.zip.ArchiveWriter(
                destination,
                archive_name,
                opts.threads,
                opts.write_chunk_bytes,
                crc32,
                opts.preallocate,
                file_crc32,
            )

    @property
    def streaming(self) -> bool:
        """Whether records are written as they are added (into a File)."""
        return self._writer is not None

    def add(self, name: str, alignment: int, payload: Payload, size: int | None = None) -> None:
        """Adds the record `name` holding `payload` (of `size` bytes, when the caller knows)."""
        writer = self._writer
        if writer is None:
            size = payload_size(payload) if size is None else size
            self._specs.append((name, size, alignment))
            self._payloads.append(payload)
        elif isinstance(payload, DevicePayload):
            self._reserved.append((writer.reserve(name, alignment, payload.nbytes), payload))
        elif isinstance(payload, tuple):
            writer.add(name, alignment, payload[0], payload[1])
        else:
            writer.add_bytes(name, alignment, payload)

    def add_all(self, specs: Sequence[tuple[str, int, int]], payloads: Sequence[Payload]) -> None:
        """Adds records whose payloads all exist: (name, size, alignment) specs, one payload
        each."""
        for (name, size, alignment), p in zip(specs, payloads, strict=True):
            self.add(name, alignment, p, size)

    def sink(self, alignment: int, direct: frozenset[str]) -> tuple[Any, int, frozenset[str]]:
        """The pickler's sink (_pickler.dumps): each storage it finds becomes the next record
        ``data/<key>``, added from its memory when its location is in `direct`, else reserved
        (then hand its payload to :meth:`fill_reserved`). Into a File only."""
        if self._writer is None:
            raise TypeError("only a File destination takes records while pickling")
        return (self._writer, alignment, direct)

    def reserved_by_sink(self) -> list[int]:
        """The indices of the records the sink reserved, in order."""
        assert self._writer is not None
        taken = {i for i, _ in self._reserved}
        return [i for i in self._writer.reserved() if i not in taken]

    def fill_reserved(self, indices: Sequence[int], payloads: Sequence[Payload]) -> None:
        """The payloads of records the sink reserved (`indices`, as reserved_by_sink)."""
        self._reserved += zip(indices, payloads, strict=True)

    def finish(self) -> list[int]:
        """Writes what is left (device payloads; a file object's records) and the end of
        the archive; returns each record's data offset."""
        writer = self._writer
        if writer is None:
            return self._write_sequentially()
        placed = [(i, writer.data_offset(i), p) for i, p in self._reserved]
        crcs = write_payloads_at(
            self.destination,  # type: ignore[arg-type]
            placed,
            crc32=self.crc32 or self.file_crc32,
        )
        offsets = [writer.data_offset(i) for i in range(len(writer))]
        writer.finish(sorted(crcs.items()))
        if self.file_crc32:
            self.file_crc = writer.file_crc32()
        return offsets

    def abandon(self) -> None:
        """Stops the writes in flight (none is running once this returns)."""
        if self._writer is not None:
            self._writer.abandon()

    def _write_sequentially(self) -> list[int]:
        target: Any = self.destination
        layout = _core.zip.plan_archive(self.archive_name, self._specs)
        crcs = []
        file_crc = 0

        def put(data: bytes | memoryview) -> None:
            nonlocal file_crc
            write_all(target, data)
            if self.file_crc32:
                file_crc = _core.zip.crc32(data, file_crc)

        for i, payload in enumerate(self._payloads):
            if isinstance(payload, DevicePayload):
                host = payload.storage.cpu()  # one storage on the host at a time
                view = host_view((host.data_ptr(), host.nbytes()))
            else:
                view = host_view(payload)
            put(layout.local_header(i))
            put(view)
            crc = _core.zip.crc32(view) if self.crc32 else 0
            crcs.append(crc)
            put(layout.data_descriptor(i, crc))
        put(layout.central_directory(crcs))
        if self.file_crc32:
            self.file_crc = file_crc
        return list(layout.data_offsets)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, kind: Any, *_: object) -> None:
        if kind is not None:
            self.abandon()


def write_archive(
    destination: Destination,
    archive_name: str,
    specs: Sequence[tuple[str, int, int]],
    payloads: Sequence[Payload],
    *,
    crc32: bool,
) -> list[int]:
    """Writes an archive of records whose payloads all exist ((name, size, alignment) specs,
    one payload each) into a File or a file object; returns each record's data offset."""
    with RecordWriter(destination, archive_name, crc32=crc32) as records:
        records.add_all(specs, payloads)
        return records.finish()


# -------------------------------------------------------------------------- torch archives
def torch_records(
    pickle_bytes: bytes,
    storages: Sequence[Payload],
    *,
    data_alignment: int,
    byteorder: str | None = sys.byteorder,
) -> tuple[list[tuple[str, int, int]], list[Payload]]:
    """The records of a torch archive, in file order, as (name, size, alignment) + payloads."""
    head = head_records(data_alignment, byteorder)
    specs = [(n, len(p), ALIGNMENT) for n, p in head]
    payloads: list[Payload] = [p for _, p in head]
    # One pass, no call per storage: 20,000 small storages make this loop show.
    specs += [
        ("data/" + str(key), p[1] if type(p) is tuple else payload_size(p), data_alignment)
        for key, p in enumerate(storages)
    ]
    payloads += storages
    for n, p in tail_records(head, len(storages), pickle_bytes):
        specs.append((n, len(p), ALIGNMENT))
        payloads.append(p)
    return specs, payloads


def write_torch_archive(
    destination: Destination,
    archive_name: str,
    pickle_bytes: bytes,
    storages: Sequence[Payload],
    *,
    byteorder: str | None = sys.byteorder,
    file_crc32: bool = False,
) -> int | None:
    """Writes the torch archive of a pickle and the payloads of its storages (in key order)
    under the calling thread's options (data_alignment, crc32). With `file_crc32`, returns the
    CRC-32 of the whole file, computed as it is written (:class:`RecordWriter`); else None."""
    opts = get_options()
    specs, payloads = torch_records(
        pickle_bytes, storages, data_alignment=opts.data_alignment, byteorder=byteorder
    )
    with RecordWriter(
        destination, archive_name, crc32=opts.write_crc32, file_crc32=file_crc32
    ) as records:
        records.add_all(specs, payloads)
        records.finish()
        return records.file_crc


def save_object(
    destination: Destination,
    archive_name: str,
    obj: Any,
    pickle_module: Any,
    protocol: int,
    *,
    byteorder: str | None,
    file_crc32: bool = False,
) -> int | None:
    """Pickles `obj` into a new torch archive in `destination`, as torch.save would.

    Into a File, each CPU storage is written while the pickler goes on (the ArchiveWriter's
    workers); storages elsewhere (a GPU's) are reserved, then streamed out through the
    staging ring once the pickle is complete. Into a file object, the archive is written
    once the pickle is complete, one storage at a time. With `file_crc32`, returns the
    CRC-32 of the whole file, computed as it is written (:class:`RecordWriter`); else None."""
    opts = get_options()
    if not isinstance(destination, _core.io.File):
        pickle_bytes, found = dumps(obj, pickle_module, protocol)
        payloads, keepalive = storage_payloads(found)
        crc = write_torch_archive(
            destination,
            archive_name,
            pickle_bytes,
            payloads,
            byteorder=byteorder,
            file_crc32=file_crc32,
        )
        del keepalive  # payload addresses stayed valid until here
        return crc
    # Held here, not only inside dumps: the storages the writer is reading must outlive an
    # exception from the pickler until abandon() returns.
    storages: list[torch.UntypedStorage] = []
    with RecordWriter(
        destination, archive_name, crc32=opts.write_crc32, file_crc32=file_crc32
    ) as records:
        head = head_records(opts.data_alignment, byteorder)
        for name, data in head:
            records.add(name, ALIGNMENT, data)
        # A test may stage CPU storages through the ring too: then none is written directly.
        cpu = torch.device("cpu")
        copiers = {cpu: _staging.copier_for(cpu)}
        direct = frozenset() if copiers[cpu] else frozenset({"cpu"})
        sink = records.sink(opts.data_alignment, direct)
        pickle_bytes, _ = dumps(obj, pickle_module, protocol, sink, storages)
        first = len(head)
        reserved = records.reserved_by_sink()
        payloads, keepalive = storage_payloads([storages[i - first] for i in reserved], copiers)
        records.fill_reserved(reserved, payloads)
        for name, data in tail_records(head, len(storages), pickle_bytes):
            records.add(name, ALIGNMENT, data)
        records.finish()
        del keepalive  # host copies of storages on devices without a ring
        return records.file_crc


# ------------------------------------------------------------------------- placed layouts
def write_placed(
    destination: Destination,
    placed: Sequence[tuple[int, Payload]],
    total_size: int,
    *,
    file_crc32: bool = False,
) -> int | None:
    """Writes a file laid out by the caller (no zip container: safetensors): each (file
    offset, payload) of `placed`, in file order and back to back from offset 0, `total_size`
    bytes in all. Into a File: one parallel write (device payloads through the ring), the
    file preallocated when the options say so; into a file object: sequential writes.

    With `file_crc32`, returns the CRC-32 of the whole file, combined from the CRCs of the
    payloads computed as they are written (:func:`write_payloads_at`): the digest a manifest
    records (_verify.manifest_entry); else None."""
    if isinstance(destination, _core.io.File):
        if get_options().preallocate:
            destination.preallocate(total_size)
        crcs = write_payloads_at(
            destination, [(i, o, p) for i, (o, p) in enumerate(placed)], crc32=file_crc32
        )
        if not file_crc32:
            return None
        return _verify.combine((crcs.get(i, 0), payload_size(p)) for i, (_, p) in enumerate(placed))
    at = 0
    crc = 0
    for offset, payload in placed:
        if offset != at:
            raise ValueError(f"write_placed: a payload at {offset}, expected {at}")
        size = payload_size(payload)
        if isinstance(payload, DevicePayload):
            host = payload.storage.cpu()
            view = host_view((host.data_ptr(), host.nbytes()))
        elif size:
            view = host_view(payload)
        else:
            continue
        write_all(destination, view)
        if file_crc32:
            crc = _core.zip.crc32(view, crc)
        at += size
    return crc if file_crc32 else None
