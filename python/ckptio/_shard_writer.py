"""Model directories: a state dict saved as shards and an index, as ``huggingface_hub`` and
``transformers`` write them, and swapped into place atomically.

The layout is huggingface_hub's (``save_torch_state_dict``), which transformers reads:

- safetensors: ``model-00001-of-00004.safetensors`` ... and ``model.safetensors.index.json``;
- torch: ``pytorch_model-00001-of-00004.bin`` ... and ``pytorch_model.bin.index.json``;
- one shard: ``model.safetensors`` or ``pytorch_model.bin``, and no index;
- the index: ``{"metadata": {"total_size": N, ...}, "weight_map": {name: file}}``.

Which tensor goes to which shard, the order of the index's entries and its ``total_size``
follow huggingface_hub's split rule (:func:`plan_directory`), so one state dict gives the same
files and the same index with either writer; tests/test_shard_save.py compares them. Each
shard is written by ckptio's own writers (torch zip files, or safetensors files byte-identical
to safetensors' own).

Everything is written into a hidden temporary directory beside the target, which then takes
the target's place in one step (:func:`save_directory`; docs/directories.md, "Atomicity").
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import _core, _safetensors, _verify
from ._files import atomic_file, stale_temp_names, temp_file_name, write_bytes, write_to

__all__ = [
    "DirectoryPlan",
    "INDEX_SUFFIX",
    "SAFETENSORS_PATTERN",
    "TORCH_PATTERN",
    "is_checkpoint_file_name",
    "parse_size",
    "plan_directory",
    "save_directory",
]

#: File name patterns, formatted with ``suffix="-00001-of-00004"`` (or ``""`` for one shard).
SAFETENSORS_PATTERN = "model{suffix}.safetensors"
TORCH_PATTERN = "pytorch_model{suffix}.bin"
#: The index is the one-shard name plus this suffix (``model.safetensors.index.json``).
INDEX_SUFFIX = ".index.json"

# huggingface_hub's units (parse_size_to_int: decimal, case-insensitive), and the binary units
# transformers accepts (convert_file_size_to_int) besides.
_DECIMAL_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
_BINARY_UNITS = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}

# Every file a directory save writes, in either format: an existing directory holding anything
# else is refused rather than replaced (its other files would be lost).
_CHECKPOINT_FILE = re.compile(
    r"(?:model(?:-\d{5}-of-\d{5})?\.safetensors|pytorch_model(?:-\d{5}-of-\d{5})?\.bin)"
    r"(?:\.index\.json)?"
    r"|" + re.escape(_verify.MANIFEST_NAME)
)


def is_checkpoint_file_name(name: str) -> bool:
    """Whether `name` is a file a directory save writes (a shard or an index, either format)."""
    return _CHECKPOINT_FILE.fullmatch(name) is not None


def parse_size(size: int | str) -> int:
    """Bytes of a ``max_shard_size``: an int, or a string as huggingface_hub parses it (a
    number, decimal point allowed, and a unit TB, GB, MB or KB, powers of 10, case-insensitive:
    ``"5GB"`` is 5 * 10**9, ``"1.5MB"`` 1_500_000), or with a binary unit TiB, GiB, MiB or KiB
    (powers of 2, as transformers accepts: ``"10KiB"`` is 10240). Must come to at least 1.

    Example::

        >>> parse_size("5GB"), parse_size("500MB"), parse_size("10KiB"), parse_size(4096)
        (5000000000, 500000000, 10240, 4096)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(
            f"max_shard_size must be an int (bytes) or a str such as '5GB', got "
            f"{type(size).__name__}"
        )
    if isinstance(size, int):
        value = size
    else:
        text = size.strip()
        upper = text.upper()
        if upper[-3:] in _BINARY_UNITS:
            number, multiplier = text[:-3], _BINARY_UNITS[upper[-3:]]
        elif upper[-2:] in _DECIMAL_UNITS:
            number, multiplier = text[:-2], _DECIMAL_UNITS[upper[-2:]]
        else:
            raise ValueError(
                f"max_shard_size {size!r} has no known unit: write a number and one of TB, GB, "
                "MB, KB (powers of 10) or TiB, GiB, MiB, KiB (powers of 2), e.g. '5GB'"
            )
        try:
            amount = float(number.strip())
        except ValueError:
            raise ValueError(
                f"max_shard_size {size!r}: {number.strip()!r} is not a number (e.g. '5GB', '1.5GB')"
            ) from None
        if not math.isfinite(amount):
            raise ValueError(f"max_shard_size {size!r} is not a finite size")
        value = int(amount * multiplier)
    if value < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {size!r}")
    return value


# ------------------------------------------------------------------------------------- plan
@dataclass
class DirectoryPlan:
    """What a directory save writes: shard files in order (file name -> its tensors, in index
    order), the index (None for a single file) and each safetensors shard's metadata."""

    format: str
    shards: dict[str, dict[str, torch.Tensor]]
    weight_map: dict[str, str]
    total_size: int
    index_name: str | None
    index_metadata: dict[str, Any] = field(default_factory=dict)
    file_metadata: dict[str, str] | None = None

    def index_bytes(self) -> bytes:
        """The index file's bytes, as huggingface_hub writes them (``json.dump``, indent 2)."""
        index = {"metadata": self.index_metadata, "weight_map": self.weight_map}
        return json.dumps(index, indent=2).encode("utf-8")


def plan_directory(
    state_dict: Any,
    max_shard_size: int,
    format: str,
    metadata: Mapping[str, str] | None = None,
) -> DirectoryPlan:
    """Splits `state_dict` into shards as ``huggingface_hub.save_torch_state_dict`` does.

    - Keys in order; a shard is closed when the next tensor would take it over
      `max_shard_size`; a tensor larger than that gets a shard of its own. Sizes are each
      storage's bytes (``untyped_storage().nbytes()``), counted once per storage, and their sum
      is the index's ``total_size``; tensors sharing a storage join the shard of the first.
    - safetensors: tensors sharing memory are kept once: of each group, the alphabetically
      first name whose tensor covers its whole storage is kept and each other name is recorded
      in the metadata as ``{dropped: kept}``; a tensor viewing only part of its storage is
      refused, as huggingface_hub refuses it. Non-contiguous tensors are stored contiguous.
      Each shard's metadata is ``{"format": "pt"}``; a single file's also holds the dropped
      names and `metadata`; with several shards those go into the index's ``metadata``.
    - An empty state dict gives one empty shard (huggingface_hub writes no file at all).

    Raises TypeError for a state dict that is not a flat dict of str -> tensor, ValueError for
    tensors safetensors cannot store (checked for every shard before anything is written).
    """
    if format not in ("torch", "safetensors"):
        raise ValueError(f"format must be 'torch' or 'safetensors', got {format!r}")
    tensors = _check_state_dict(state_dict, format)
    if metadata is not None:
        if format != "safetensors":
            raise ValueError("metadata applies only to format='safetensors'")
        if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise TypeError("metadata must be a dict of str -> str")
        if "total_size" in metadata:
            raise ValueError("'total_size' is the index's own metadata entry; use another key")
    extra: dict[str, str] = dict(metadata or {})
    if format == "safetensors":
        pattern = SAFETENSORS_PATTERN
        for kept, dropped in _tied_names(tensors).items():
            for name in dropped:
                extra.setdefault(name, kept)  # the caller's own entry wins, as in the hub
                del tensors[name]
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    else:
        pattern = TORCH_PATTERN
    shard_list, total_size = _split(tensors, max_shard_size)
    count = len(shard_list)
    if count <= 1:
        name = pattern.format(suffix="")
        shards = {name: shard_list[0] if shard_list else {}}
        index_name = None
    else:
        shards = {
            pattern.format(suffix=f"-{i + 1:05d}-of-{count:05d}"): shard
            for i, shard in enumerate(shard_list)
        }
        index_name = pattern.format(suffix="") + INDEX_SUFFIX
    plan = DirectoryPlan(
        format=format,
        shards=shards,
        weight_map={key: name for name, shard in shards.items() for key in shard},
        total_size=total_size,
        index_name=index_name,
        index_metadata={"total_size": total_size, **extra},
    )
    if format == "safetensors":
        plan.file_metadata = {"format": "pt", **(extra if index_name is None else {})}
    return plan


def _check_state_dict(state_dict: Any, format: str) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "a directory save (max_shard_size given) takes a flat dict of str -> torch.Tensor, "
            f"got {type(state_dict).__name__}"
        )
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in state_dict.items()
        if not isinstance(k, str) or not isinstance(v, torch.Tensor)
    ]
    if bad:
        raise TypeError(
            f"a directory save (max_shard_size given, format={format!r}) takes only "
            f"str -> torch.Tensor entries, as its index maps each name to a shard; these are "
            f"not: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}. Save other objects "
            "to a file of their own"
        )
    return dict(state_dict)


def _storage_size(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def _storage_id(t: torch.Tensor) -> tuple[torch.device, int, int] | None:
    """huggingface_hub's identity of a tensor's storage (None: a meta tensor, whose sharing
    cannot be told)."""
    if t.device.type == "meta":
        return None
    return t.device, t.untyped_storage().data_ptr(), _storage_size(t)


def _split(tensors: dict[str, torch.Tensor], limit: int) -> tuple[list[dict[str, Any]], int]:
    """huggingface_hub's split (split_state_dict_into_shards_factory): the shards, in order,
    and the total size."""
    first_of_storage: dict[Any, list[str]] = {}
    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    current_size = 0
    total = 0
    for key, t in tensors.items():
        sid = _storage_id(t)
        if sid is not None:
            if sid in first_of_storage:
                first_of_storage[sid].append(key)  # joins the first one's shard below
                continue
            first_of_storage[sid] = [key]
        size = _storage_size(t)
        if size > limit:
            total += size
            shards.append({key: t})
            continue
        if current_size + size > limit:
            shards.append(current)
            current, current_size = {}, 0
        current[key] = t
        current_size += size
        total += size
    if current:
        shards.append(current)
    for keys in first_of_storage.values():
        for shard in shards:
            if keys[0] in shard:
                for key in keys:
                    shard[key] = tensors[key]
                break
    return shards, total


def _end_address(t: torch.Tensor) -> int:
    """One past the last byte `t` reaches (huggingface_hub's _end_ptr, which is defined for
    contiguous tensors only, extended to any strides)."""
    if t.numel() == 0:
        return int(t.data_ptr())
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return int(t.data_ptr()) + (last + 1) * t.element_size()


def _covers_storage(t: torch.Tensor) -> bool:
    return (
        t.data_ptr() == t.untyped_storage().data_ptr()
        and t.numel() * t.element_size() == _storage_size(t)
    )


def _tied_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """{kept name: [dropped names]} for the tensors sharing memory, chosen as huggingface_hub
    (and safetensors' save_model) chooses them; raises ValueError for a tensor that views part
    of its storage with no tensor covering the whole of it."""
    by_storage: dict[tuple[Any, int, int], set[str]] = {}
    for k, t in tensors.items():
        ptr, size = t.untyped_storage().data_ptr(), _storage_size(t)
        if t.device.type != "meta" and ptr != 0 and size != 0:
            by_storage.setdefault((t.device, ptr, size), set()).add(k)
    groups: list[set[str]] = []
    for names in by_storage.values():
        if len(names) < 2:
            groups.append(names)
            continue
        # Overlapping tensors, by address; huggingface_hub compares each with the one before
        # it only (not with the furthest end so far): the same grouping, for the same result.
        areas = sorted((tensors[n].data_ptr(), _end_address(tensors[n]), n) for n in names)
        _, last_stop, last_name = areas[0]
        groups.append({last_name})
        for start, stop, name in areas[1:]:
            if start >= last_stop:
                groups.append({name})
            else:
                groups[-1].add(name)
            last_stop = stop
    out: dict[str, list[str]] = {}
    partial: list[str] = []
    for group in groups:
        complete = sorted(n for n in group if _covers_storage(tensors[n]))
        if not complete:
            partial.extend(sorted(group))
            continue
        keep = complete[0]
        dropped = [n for n in sorted(group) if n != keep]
        if dropped:
            out[keep] = dropped
    if partial:
        shown = ", ".join(repr(n) for n in partial[:10]) + (" ..." if len(partial) > 10 else "")
        raise ValueError(
            f"cannot save as safetensors shards: {shown} view only part of their storage, and no "
            "tensor of the state dict covers the whole of it (huggingface_hub refuses these "
            "too: the storage's other bytes would be lost or stored twice). Save a copy of "
            "each, e.g. {k: v.clone() for k, v in state_dict.items()}, or use format='torch'"
        )
    return out


# ------------------------------------------------------------------------------------ write
def save_directory(
    state_dict: Any,
    path: Any,
    max_shard_size: int | str,
    format: str,
    metadata: Mapping[str, str] | None,
    clone_shared: bool,
    durable: bool,
    manifest: bool,
    save_torch_shard: Callable[[dict[str, torch.Tensor], str, bool], int | None],
) -> None:
    """Saves `state_dict` as a model directory at `path` (see :func:`plan_directory`).

    The shards and the index are written into a hidden temporary directory beside `path`
    (``.<name>.ckptio-<host>-<pid>-<random>.tmp``); with `durable`, each file is fsynced and
    so is the temporary directory. Then it takes `path`'s place: a new `path` by a rename; an
    existing checkpoint directory by an atomic exchange of the two names (``renameat2``
    ``RENAME_EXCHANGE``), after which the old one is removed. Where the file system cannot
    exchange, the old directory is renamed aside and the new one renamed in: between those two
    renames `path` does not exist. An exception removes the temporary directory and leaves
    `path` as it was; a kill leaves the temporary directory, which the next save to `path`
    removes once its writer is dead.

    With `manifest`, :data:`_verify.MANIFEST_NAME` lists the size and CRC-32 of every file
    written (shards and index), written into the temporary directory before the swap. Each
    CRC comes from the write itself (the writers combine the CRCs of the buffers they write,
    :class:`_writer.RecordWriter`, :func:`_writer.write_placed`; the index's from its bytes):
    no file is read back, except a torch shard in the legacy format, which torch writes.

    `save_torch_shard(tensors, file, file_crc32)` writes one torch-format shard (serialization's
    torch save with the caller's pickling arguments) and, when `file_crc32` is true, returns
    the file's CRC-32 computed as it was written (None when it cannot: torch's legacy format).
    `clone_shared` must be False (it is a file save's option).

    Refuses, before writing anything: a `path` that exists and is not a directory
    (NotADirectoryError), a directory holding anything but the shards and index files a
    directory save writes (FileExistsError: its files are never deleted), and a directory the
    caller may not write into (PermissionError).
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(
            f"a save with max_shard_size writes a directory: f must be a path, got {type(path)!r}"
        )
    if clone_shared:
        raise ValueError(
            "clone_shared does not apply to a directory save: tensors sharing memory are kept "
            "once, as huggingface_hub keeps them (docs/directories.md)"
        )
    limit = parse_size(max_shard_size)
    plan = plan_directory(state_dict, limit, format, metadata)
    layouts = {}
    if plan.format == "safetensors":
        # Every shard is checked (dtypes, layouts) before the first byte is written.
        for name, tensors in plan.shards.items():
            layouts[name] = _safetensors.plan(tensors, plan.file_metadata)
    shown = os.fsdecode(path)
    target, mode = _directory_target(shown)
    parent, base = os.path.split(target)
    _remove_stale_directories(parent, base)
    tmp = os.path.join(parent, temp_file_name(base, os.getpid()))
    try:
        os.mkdir(tmp, 0o777)  # the umask applies, as for a plain mkdir
    except OSError as e:  # report the caller's path, not the temporary name
        raise type(e)(e.errno, e.strerror, shown) from None
    try:
        entries = []  # the manifest's, file by file
        for name, tensors in plan.shards.items():
            file = os.path.join(tmp, name)
            if plan.format == "safetensors":
                write = functools.partial(
                    _write_safetensors, layout=layouts[name], file_crc32=manifest
                )
                crc = write_to(file, write, durable)
            else:
                crc = save_torch_shard(tensors, file, manifest)
            if manifest:
                if crc is None:  # written by torch (legacy format): read it back
                    entries.append(_verify.manifest_entry(name, *_verify.file_crc32(file)))
                else:
                    entries.append(_verify.manifest_entry(name, os.path.getsize(file), crc))
        if plan.index_name is not None:
            data = plan.index_bytes()
            with atomic_file(os.path.join(tmp, plan.index_name), durable) as index:
                write_bytes(index, data)
            if manifest:
                entries.append(
                    _verify.manifest_entry(plan.index_name, len(data), _core.zip.crc32(data))
                )
        if manifest:
            _verify.write_manifest(tmp, entries)
        if mode is not None:
            os.chmod(tmp, mode)  # a replaced directory keeps its permissions
        old = _swap_into_place(tmp, target, exists=mode is not None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if durable:
        _core.io.sync_directory(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_safetensors(target: Any, layout: _safetensors.Plan, file_crc32: bool) -> int | None:
    return _safetensors.write(target, layout, file_crc32=file_crc32)


def _directory_target(path: str) -> tuple[str, int | None]:
    """(the absolute path the directory lands at, the permission bits of the directory there
    or None when there is none), after the refusals save_directory lists. A symlink is
    followed, as a file save follows one."""
    target = os.path.abspath(path)  # also drops a trailing slash, which would hide a link
    if os.path.islink(target):
        target = os.path.realpath(target)
    if os.path.dirname(target) == target:
        raise IsADirectoryError(errno.EISDIR, "cannot replace a file system root", path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target, None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(
            errno.ENOTDIR,
            "exists and is not a directory; a save with max_shard_size writes a directory "
            "(save without max_shard_size to write one file)",
            path,
        )
    foreign = sorted(
        n
        for n in os.listdir(target)
        if not is_checkpoint_file_name(n) or not os.path.isfile(os.path.join(target, n))
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            errno.EEXIST,
            f"the directory holds files a checkpoint save does not write ({shown}); a save "
            "replaces the whole directory and never deletes other files: save into a "
            "directory of its own, or move them",
            path,
        )
    if not os.access(target, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return target, stat.S_IMODE(st.st_mode)


def _swap_into_place(tmp: str, target: str, exists: bool) -> str | None:
    """Puts the complete directory `tmp` at `target`; returns where the directory it replaced
    now is (to be removed), or None."""
    if not exists:
        os.rename(tmp, target)
        return None
    try:
        exchanged = _core.io.exchange_paths(tmp, target)
    except FileNotFoundError:  # removed since it was checked
        os.rename(tmp, target)
        return None
    if exchanged:
        return tmp
    # The file system cannot exchange two names: rename the old directory aside, then the new
    # one in. Between the two renames the target does not exist.
    parent, base = os.path.split(target)
    aside = os.path.join(parent, temp_file_name(base, os.getpid()))
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    return aside


def _remove_stale_directories(parent: str, base: str) -> list[str]:
    """Removes the temporary directories of saves to `base` whose writer, a process of this
    host, is dead (killed mid-save, or between the swap and the removal of the replaced
    directory); returns their names. Best effort: errors are ignored."""
    removed: list[str] = []
    for name in stale_temp_names(parent, base):
        full = os.path.join(parent, name)
        if _is_real_directory(full):
            shutil.rmtree(full, ignore_errors=True)
            removed.append(name)
    return removed


def _is_real_directory(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)
