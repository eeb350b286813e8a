"""One small adapter per candidate: how it saves (its format's writer) and how it loads.

Every loader returns the loaded object; :func:`verify` compares it with the original. Peers
(safetensors, fastsafetensors, tensorizer, Run:ai model streamer) are used only when
importable; they read flat, unshared dicts of tensors (the workloads' ``flat`` variant).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

import ckptio

from .workloads import iter_tensors

__all__ = ["CANDIDATES", "FORMATS", "BenchmarkError", "Candidate", "Format", "verify"]


class BenchmarkError(RuntimeError):
    """A candidate returned a wrong result, or the benchmark cannot run as asked."""


@dataclass(frozen=True)
class Format:
    """A file format and the writer whose save time is reported for it."""

    name: str  # the save row's label
    ext: str
    save: Callable[[Any, str], None]
    flat: bool  # writes the workload's flat, unshared dict of tensors
    group: str  # formats of one group are read by the same loaders (FILE mode)
    requires: Optional[str] = None  # module that must be importable


@dataclass(frozen=True)
class Candidate:
    """A loader of one format."""

    name: str
    kind: str  # "copy" (reads into fresh memory), "mmap" (maps the file), "reuse" (in place)
    fmt: str  # key of FORMATS
    load: Callable[[str, Any], Any]  # (path, load_into target) -> loaded object
    requires: Optional[str] = None
    keeps_sharing: bool = False  # tied tensors come back tied
    check: Optional[Callable[[], Optional[str]]] = None  # None when usable, else why not

    def unavailable(self) -> Optional[str]:
        for mod in filter(None, (self.requires, FORMATS[self.fmt].requires)):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed (pip install 'ckptio[bench]')"
        return self.check() if self.check is not None else None


# ---------------------------------------------------------------------------- pickle 5
class _OutOfBandPickler(pickle.Pickler):
    """Pickles each tensor's bytes as a PickleBuffer, handed out of band (protocol 5)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_alive: list[torch.Tensor] = []

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter:
            t = obj.detach().contiguous()
            self.keep_alive.append(t)  # the raw view below does not own the memory
            nbytes = t.numel() * t.element_size()
            view = ckptio._core.io.raw_memoryview(t.data_ptr(), nbytes, False) if nbytes else b""
            return _from_buffer, (pickle.PickleBuffer(view), obj.dtype, tuple(obj.shape))
        return NotImplemented


def _from_buffer(buf: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = (
        torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    )
    return raw.view(dtype).reshape(shape)


def _save_pickle5(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=5)


def _load_pickle5(path: str, _target: Any) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)  # noqa: S301 - the benchmark's own file


def _save_pickle5_oob(obj: Any, path: str) -> None:
    import io

    buffers: list[pickle.PickleBuffer] = []
    data = io.BytesIO()
    pickler = _OutOfBandPickler(data, protocol=5, buffer_callback=buffers.append)
    pickler.dump(obj)
    views = [b.raw() for b in buffers]
    with open(path, "wb") as f:
        f.write(struct.pack("<QQ", data.tell(), len(views)))
        f.write(struct.pack(f"<{len(views)}Q", *(v.nbytes for v in views)))
        f.write(data.getbuffer())
        for v in views:
            f.write(v)


def _load_pickle5_oob(path: str, _target: Any) -> Any:
    with open(path, "rb", buffering=0) as f:
        n_pickle, n_buffers = struct.unpack("<QQ", f.read(16))
        sizes = struct.unpack(f"<{n_buffers}Q", f.read(8 * n_buffers))
        data = f.read(n_pickle)
        buffers = []
        for n in sizes:
            b = bytearray(n)
            view = memoryview(b)
            while view.nbytes:
                got = f.readinto(view)
                if not got:
                    raise BenchmarkError(f"{path}: truncated")
                view = view[got:]
            buffers.append(b)
    return pickle.loads(data, buffers=buffers)  # noqa: S301 - the benchmark's own file


# ----------------------------------------------------------------------------- peers
def _save_safetensors(flat: Any, path: str) -> None:
    from safetensors.torch import save_file

    save_file(flat, path)


def _load_safetensors(path: str, _target: Any) -> Any:
    from safetensors.torch import load_file

    return load_file(path)


def _load_safetensors_pread(path: str, _target: Any) -> Any:
    from safetensors.torch import load_file

    return load_file(path, backend="pread")  # type: ignore[call-arg]


def _safetensors_has_pread() -> Optional[str]:
    from safetensors.torch import load_file

    if "backend" in inspect.signature(load_file).parameters:
        return None
    return "this safetensors version has no backend='pread' (safetensors >= 0.8 has it)"


def _load_fastsafetensors(path: str, _target: Any) -> Any:
    from fastsafetensors import fastsafe_open

    # CPU without GPUDirect Storage: pread into a host buffer; tensors keep it alive.
    with fastsafe_open(path, framework="pt", device="cpu", nogds=True) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _save_tensorizer(flat: Any, path: str) -> None:
    from tensorizer import TensorSerializer

    s = TensorSerializer(path)
    s.write_state_dict(flat)
    s.close()


def _load_tensorizer(path: str, _target: Any) -> Any:
    from tensorizer import TensorDeserializer

    d = TensorDeserializer(path, device="cpu", lazy_load=False)
    out = dict(d)
    d.close()
    return out


def _load_runai(path: str, _target: Any) -> Any:
    from runai_model_streamer import SafetensorsStreamer

    with SafetensorsStreamer() as s:
        s.stream_file(path, device="cpu")
        return dict(s.get_tensors())


def _load_into(path: str, target: Any) -> Any:
    ckptio.load_into(target, path)
    return target


FORMATS: dict[str, Format] = {
    "ckptio": Format("ckptio.save", ".pt", ckptio.save, False, "torchzip"),
    "torch": Format("torch.save", ".pt", torch.save, False, "torchzip"),
    "pickle5": Format("pickle5.dump", ".pkl", _save_pickle5, False, "pickle5"),
    "pickle5-oob": Format("pickle5 oob.dump", ".pkl5", _save_pickle5_oob, False, "pickle5-oob"),
    "safetensors": Format(
        "safetensors.save_file",
        ".safetensors",
        _save_safetensors,
        True,
        "safetensors",
        "safetensors",
    ),
    "tensorizer": Format(
        "tensorizer.serialize", ".tensors", _save_tensorizer, True, "tensorizer", "tensorizer"
    ),
}

_ALL = [
    Candidate("ckptio", "copy", "ckptio", lambda p, _t: ckptio.load(p), keeps_sharing=True),
    Candidate(
        "ckptio mmap",
        "mmap",
        "ckptio",
        lambda p, _t: ckptio.load(p, mmap=True),
        keeps_sharing=True,
    ),
    Candidate("ckptio load_into", "reuse", "ckptio", _load_into, keeps_sharing=True),
    # ckptio reading the file stock torch.save wrote (64-byte records, no index of its own).
    Candidate(
        "ckptio, torch's file", "copy", "torch", lambda p, _t: ckptio.load(p), keeps_sharing=True
    ),
    Candidate(
        "ckptio mmap, torch's file",
        "mmap",
        "torch",
        lambda p, _t: ckptio.load(p, mmap=True),
        keeps_sharing=True,
    ),
    Candidate(
        "torch", "copy", "torch", lambda p, _t: torch.load(p, weights_only=True), keeps_sharing=True
    ),
    Candidate(
        "torch mmap",
        "mmap",
        "torch",
        lambda p, _t: torch.load(p, mmap=True, weights_only=True),
        keeps_sharing=True,
    ),
    Candidate("pickle5", "copy", "pickle5", _load_pickle5, keeps_sharing=True),
    Candidate("pickle5 oob", "copy", "pickle5-oob", _load_pickle5_oob, keeps_sharing=True),
    Candidate("safetensors", "mmap", "safetensors", _load_safetensors),
    Candidate(
        "safetensors pread",
        "copy",
        "safetensors",
        _load_safetensors_pread,
        check=_safetensors_has_pread,
    ),
    Candidate("fastsafetensors", "copy", "safetensors", _load_fastsafetensors, "fastsafetensors"),
    Candidate("tensorizer", "copy", "tensorizer", _load_tensorizer),
    Candidate("runai streamer", "copy", "safetensors", _load_runai, "runai_model_streamer"),
]
CANDIDATES: dict[str, Candidate] = {c.name: c for c in _ALL}


# ------------------------------------------------------------------------ correctness
def _same(a: Any, b: Any, where: str, ordered: bool) -> None:
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor):
            raise BenchmarkError(f"{where}: expected a tensor, got {type(a).__name__}")
        if a.dtype != b.dtype or a.shape != b.shape:
            raise BenchmarkError(
                f"{where}: {a.dtype} {tuple(a.shape)} instead of {b.dtype} {tuple(b.shape)}"
            )
        if not torch.equal(a.detach().cpu(), b.detach()):
            raise BenchmarkError(f"{where}: the values differ from the original")
    elif isinstance(b, dict):
        if not isinstance(a, dict) or (
            list(a.keys()) != list(b.keys()) if ordered else a.keys() != b.keys()
        ):
            got = list(a.keys())[:5] if isinstance(a, dict) else type(a).__name__
            raise BenchmarkError(f"{where}: keys {got}... instead of {list(b.keys())[:5]}...")
        for k in b:
            _same(a[k], b[k], f"{where}[{k!r}]", ordered)
    elif isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or len(a) != len(b):
            raise BenchmarkError(f"{where}: a sequence of another length or type")
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]", ordered)
    elif a != b:
        raise BenchmarkError(f"{where}: {a!r:.60} instead of {b!r:.60}")


def verify(
    name: str,
    loaded: Any,
    original: Any,
    tied: Optional[tuple[str, str]] = None,
    *,
    ordered: bool = False,
) -> None:
    """Raises BenchmarkError unless `loaded` equals `original` (values, dtypes, shapes, keys,
    and their order when `ordered`; and the `tied` pair shares memory when given)."""
    _same(loaded, original, name, ordered)
    if tied is not None:
        a, b = loaded[tied[0]], loaded[tied[1]]
        if a.data_ptr() != b.data_ptr():
            raise BenchmarkError(f"{name}: {tied[0]} and {tied[1]} are no longer tied")


def zeros_like_tree(obj: Any) -> Any:
    """A structure like `obj` with fresh, zero-filled (so pre-faulted) tensors; sharing kept."""
    memo: dict[int, torch.Tensor] = {}

    def go(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            if id(o) not in memo:
                memo[id(o)] = torch.zeros(o.shape, dtype=o.dtype)
            return memo[id(o)]
        if isinstance(o, dict):
            return {k: go(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(go(v) for v in o)
        return o

    return go(obj)


def storage_bytes(obj: Any) -> int:
    return sum(
        {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in iter_tensors(obj)
        }.values()
    )


def file_size(path: str) -> int:
    return os.stat(path).st_size
