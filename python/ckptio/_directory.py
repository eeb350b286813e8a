"""Model directories on the read side: which files a directory (or an ``*.index.json``) names,
checked before any tensor is read, and how their tensors merge into one state dict.

A directory is read through its index (``model.safetensors.index.json``,
``pytorch_model.bin.index.json`` or another ``*.index.json``), whose ``weight_map`` names each
tensor's shard; without an index, through its one weights file (``model.safetensors``,
``pytorch_model.bin``...). :func:`resolve` finds and checks that, and :func:`merge` checks the
shards' tensors against it:

* every shard the index names exists (an error names the missing file);
* every tensor a shard holds is listed for that shard, and every listed tensor is in its shard
  (an error names the tensor and both files);
* ``metadata.total_size``, where given, is the bytes of the tensors the shards hold, counted
  either tensor by tensor or storage by storage (huggingface_hub counts storages), so a
  truncated or swapped-out shard is caught.

Nothing is returned, partially or otherwise, before all of it holds.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, TypeGuard

import torch

from . import _core, _remote
from ._shard_writer import INDEX_SUFFIX, SAFETENSORS_PATTERN, TORCH_PATTERN
from ._util import DuplicateKeyError, json_without_duplicates
from .errors import CheckpointError

__all__ = ["Layout", "is_directory_path", "merge", "resolve"]

#: Largest index file read (the biggest public indexes are a few MB).
MAX_INDEX_BYTES = 64 << 20
# Single weights files, most preferred first (transformers prefers safetensors).
_SINGLE_FILES = (SAFETENSORS_PATTERN.format(suffix=""), TORCH_PATTERN.format(suffix=""))
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Layout:
    """What a model directory holds. `root` is a local directory or the URL of one (``s3://``,
    ``http(s)://``, ending with ``/``)."""

    root: str  # the directory
    index: str | None  # path (or URL) of the index, None for a lone weights file
    shards: list[str]  # shard file names relative to root, in the index's order
    weight_map: dict[str, str] | None  # tensor name -> shard file name (None: no index)
    total_size: int | None
    storage_options: Mapping[str, Any] | None = None  # a remote directory's (docs/remote.md)
    cache_dir: str | os.PathLike[str] | None = None  # its shards' local cache (None: setting)

    def path(self, shard: str) -> str:
        return self.root + shard if self.remote else os.path.join(self.root, shard)

    @property
    def name(self) -> str:
        return self.index or self.root

    @property
    def remote(self) -> bool:
        return _remote.is_url(self.root)

    def open(self, shard: str, mode: Any = None) -> Any:
        """Shard `shard` as a source: a ``_core.io.File`` (`mode`, default read-only) or, in
        object storage, a ``_remote.RemoteSource`` (or, with a local cache in force, the File
        of its cached copy), where a shard the index names that is not there is a
        CheckpointError naming both (as :func:`resolve` finds a local one)."""
        mode = mode or _core.io.FileMode.READ
        if not self.remote:
            return _core.io.File.open(self.path(shard), mode)
        from ._remote._cache import resolve as cached

        url = self.path(shard)
        try:
            local, _ = cached(url, self.storage_options, self.cache_dir, "load", False)
            if local != url:
                return _core.io.File.open(local, mode)
            return _remote.open_source(url, self.storage_options)
        except FileNotFoundError:
            if self.index is None:
                raise
            raise CheckpointError(
                f"{self.index}: shard {shard!r} is missing from {self.root}"
            ) from None

    def open_all(self, mode: Any = None) -> list[Any]:
        """Every shard, opened as :meth:`open` does, in the index's order; remote ones
        concurrently (each opening is a round trip). On an error none stays open."""
        if not self.remote or len(self.shards) < 2:
            opened: list[Any] = []
            try:
                for shard in self.shards:
                    opened.append(self.open(shard, mode))
            except BaseException:
                for source in opened:
                    source.close()
                raise
            return opened
        with cf.ThreadPoolExecutor(min(16, len(self.shards))) as pool:
            futures = [pool.submit(self.open, shard) for shard in self.shards]
            cf.wait(futures)
        failed = [f for f in futures if f.exception() is not None]
        if failed:
            for f in futures:
                if f.exception() is None:
                    f.result().close()
            failed[0].result()  # the first failure in the index's order
        return [f.result() for f in futures]


def is_directory_path(f: Any) -> TypeGuard[str | bytes | os.PathLike[str]]:
    """True if `f` names a model directory or an index file (a local path, or a URL ending
    with ``/`` or ``.index.json``), which :func:`resolve` reads."""
    if _remote.is_url(f):
        return _remote.is_directory_url(f)
    if not isinstance(f, (str, bytes, os.PathLike)):
        return False
    path = os.fsdecode(f)
    return path.endswith(INDEX_SUFFIX) or os.path.isdir(path)


def resolve(
    f: str | bytes | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Layout:
    """The layout of the directory or index file `f` (a path or a URL), checked: the index
    parses, names only files inside the directory, and (locally) every one exists; a remote
    shard's absence is found when it is opened. `storage_options` and `cache_dir` apply to
    URLs only (docs/remote.md)."""
    if _remote.is_url(f):
        return dataclasses.replace(_resolve_url(str(f), storage_options), cache_dir=cache_dir)
    if storage_options is not None or cache_dir is not None:
        raise ValueError(
            f"storage_options and cache_dir apply to s3:// and http(s):// URLs, not to {f!r}"
        )
    path = os.fsdecode(f)
    if not os.path.isdir(path):
        with open(path, "rb") as file:
            raw = file.read(MAX_INDEX_BYTES + 1)
        return _parse_index(path, os.path.dirname(os.path.abspath(path)), raw, None)
    names = [n for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n))]
    index, single = _choose(path, names)
    if index is not None:
        return resolve(os.path.join(path, index))
    return Layout(path, None, [single], None, None)


def _resolve_url(url: str, storage_options: Mapping[str, Any] | None) -> Layout:
    """:func:`resolve` for a directory URL (``.../``) or an index's URL: an S3 directory is
    listed; an HTTP one, which has no listing, is asked for the index names and weights files
    transformers writes, in its order of preference."""
    if url.endswith(INDEX_SUFFIX):
        try:
            raw = _remote.read_whole(url, storage_options, MAX_INDEX_BYTES)
        except ValueError:
            raise CheckpointError(f"{url}: an index larger than {MAX_INDEX_BYTES} bytes") from None
        return _parse_index(url, url[: url.rindex("/") + 1], raw, storage_options)
    names = _remote.list_names(url, storage_options)
    if names is None:  # HTTP: the first of the usual names that exists
        for candidate in [s + INDEX_SUFFIX for s in _SINGLE_FILES] + list(_SINGLE_FILES):
            try:
                _remote.open_source(url + candidate, storage_options).close()
            except FileNotFoundError:
                continue
            names = [candidate]
            break
        else:
            raise FileNotFoundError(
                errno.ENOENT,
                "not a model directory: none of "
                + ", ".join([s + INDEX_SUFFIX for s in _SINGLE_FILES] + list(_SINGLE_FILES))
                + " is there (an HTTP server lists no directory: pass the index's or the "
                "file's URL)",
                url,
            )
    index, single = _choose(url, names)
    if index is not None:
        return _resolve_url(url + index, storage_options)
    return Layout(url, None, [single], None, None, storage_options)


def _choose(root: str, names: list[str]) -> tuple[str | None, str]:
    """(index, "") or (None, weights file): what to read of the directory `root` holding
    the files `names` (sorted): its one index (safetensors' preferred), else its one weights
    file (transformers' names preferred)."""
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX) and not n.startswith(".")]
    for kind in (".safetensors" + INDEX_SUFFIX, INDEX_SUFFIX):
        found = [n for n in indexes if n.endswith(kind)]
        preferred = [n for n in found if n in {s + INDEX_SUFFIX for s in _SINGLE_FILES}]
        if len(preferred) == 1 or len(found) == 1:
            return (preferred or found)[0], ""
        if found:
            raise CheckpointError(
                f"{root}: the directory has several indexes ({', '.join(found)}); pass the "
                "path of the one to load"
            )
    weights = [n for n in names if n.endswith(_WEIGHT_SUFFIXES) and not n.startswith(".")]
    single = [n for n in _SINGLE_FILES if n in weights] or weights
    if len(single) == 1 or (single and single[0] in _SINGLE_FILES):
        return None, single[0]
    if not weights:
        # What torch.load raises for any directory, with what ckptio looked for.
        raise IsADirectoryError(
            errno.EISDIR,
            f"Is a directory, and not a model directory: no *{INDEX_SUFFIX} index and no "
            f"weights file ({', '.join('*' + s for s in _WEIGHT_SUFFIXES)})",
            root,
        )
    raise CheckpointError(
        f"{root}: the directory has no index and several weights files "
        f"({', '.join(weights[:8])}{' ...' if len(weights) > 8 else ''}); pass one of them"
    )


def _parse_index(
    path: str, root: str, raw: bytes, storage_options: Mapping[str, Any] | None
) -> Layout:
    """The layout the index `path` (its bytes `raw`, in the directory `root`) describes."""
    if len(raw) > MAX_INDEX_BYTES:
        raise CheckpointError(f"{path}: an index larger than {MAX_INDEX_BYTES} bytes")
    try:
        index = json_without_duplicates(raw)
    except DuplicateKeyError as e:
        raise CheckpointError(f"{path}: {e} (a tensor listed in two shards?)") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a JSON index: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f'{path}: an index needs a "weight_map" object of name -> file name')
    metadata = index.get("metadata") or {}
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if isinstance(total, float) and total.is_integer():
        total = int(total)
    if total is not None and (type(total) is not int or total < 0):
        raise CheckpointError(f"{path}: metadata.total_size is {total!r}, not a byte count")
    shards: dict[str, None] = {}
    for shard in weight_map.values():
        shards.setdefault(shard, None)
    remote = _remote.is_url(root)
    for shard in shards:
        parts = shard.replace("\\", "/").split("/")
        # In a URL, also no scheme, query, fragment or escape that could leave the directory.
        odd = remote and (":" in parts[0] or any(c in shard for c in "?#%"))
        if not shard or os.path.isabs(shard) or ".." in parts or odd:
            raise CheckpointError(
                f"{path}: shard {shard!r} is not a file name inside the index's directory"
            )
        if not remote and not os.path.isfile(os.path.join(root, shard)):
            raise CheckpointError(f"{path}: shard {shard!r} is missing from {root}")
    return Layout(root, path, list(shards), weight_map, total, storage_options)


def shard_tensors(layout: Layout, shard: str, loaded: Any) -> Mapping[str, Any]:
    """`loaded` (what shard `shard` holds), checked to be a flat name -> tensor mapping."""
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) for k in loaded):
        raise CheckpointError(
            f"{layout.path(shard)}: a shard must hold a dict of name -> tensor, not "
            f"{type(loaded).__name__}"
        )
    return loaded


def check_shard_names(layout: Layout, shard: str, names: Iterable[str]) -> None:
    """Raises unless `names` (the tensors shard `shard` holds) are exactly the index's
    entries for that shard."""
    if layout.weight_map is None:
        return
    names = list(names)
    held = set(names)
    for name in names:
        listed = layout.weight_map.get(name)
        if listed != shard:
            where = f"lists it in {listed!r}" if listed else "does not list it"
            raise CheckpointError(
                f"{layout.path(shard)}: holds tensor {name!r}, but the index {layout.index} {where}"
            )
    for name, listed in layout.weight_map.items():
        if listed == shard and name not in held:
            raise CheckpointError(
                f"{layout.index}: lists tensor {name!r} in {shard!r}, which does not hold it"
            )


def merge(layout: Layout, shards: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The tensors of every shard (each checked by :func:`check_shard_names`) as one dict in
    the index's order (a lone file's own order), once the total size is checked."""
    if layout.weight_map is None:
        return dict(shards[0][1])
    by_shard = dict(shards)
    out = {name: by_shard[shard][name] for name, shard in layout.weight_map.items()}
    if layout.total_size is not None:
        _check_total(layout, shards)
    return out


def _check_total(layout: Layout, shards: list[tuple[str, Mapping[str, Any]]]) -> None:
    by_tensor = 0
    by_storage = 0
    for _, tensors in shards:
        seen: set[int] = set()  # storages, by their C++ object (meta ones have no address)
        for t in tensors.values():
            if not isinstance(t, torch.Tensor):
                continue
            by_tensor += t.numel() * t.element_size()
            storage = t.untyped_storage()
            if storage._cdata not in seen:
                seen.add(storage._cdata)
                by_storage += storage.nbytes()
    if layout.total_size not in (by_tensor, by_storage):
        raise CheckpointError(
            f"{layout.index}: metadata.total_size is {layout.total_size} bytes, but the shards "
            f"hold {by_tensor} bytes of tensors ({by_storage} in distinct storages)"
        )
