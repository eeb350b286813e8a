"""The ``ckptio`` command line (also ``python -m ckptio``).

Commands::

    ckptio inspect PATH [--json]          what a checkpoint file or model directory holds,
                                          without reading tensor data
    ckptio convert IN OUT [--to FORMAT]   torch (zip or legacy) -> safetensors or ckptio's layout;
        [--max-shard-size SIZE]           directories <-> files, torch <-> safetensors shards,
                                          resharding (docs/directories.md)
    ckptio verify FILE [--json]           container, pickle (never executed) and CRC-32 checks
    ckptio bench [ARGS ...]               the benchmark (ckptio.benchmark), its own --help

Exit codes: 0 success; 1 ``verify`` found a problem; 2 a bad argument or a file that cannot be
read (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from typing import Any, NoReturn, Sequence

from ._util import contiguous_strides

__all__ = ["main"]

PROG = "ckptio"
#: Files at least this large get a progress bar (when stderr is a terminal).
PROGRESS_MIN_BYTES = 16 << 20
#: convert reads tensors in batches of about this many bytes (one parallel read each).
BATCH_BYTES = 256 << 20
_TORCH_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")


class UsageError(Exception):
    """A bad argument or unreadable input: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of usage + message; --help has the usage.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="Inspect, convert, verify and benchmark PyTorch checkpoints "
        "(torch zip files and safetensors).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "inspect",
        help="list what a checkpoint file or model directory holds (no tensor data is read)",
        description="Format, data alignment, counts, total bytes, a table of tensors (name, "
        "dtype, shape, bytes) and the non-tensor entries of a checkpoint. Reads only the "
        "container's directory and header (torch: data.pkl, never executed). A legacy "
        "(pre-1.6) file has no directory: it is loaded weights-only onto the meta device "
        "(no tensor data in memory). A TorchScript archive: its records only. A model "
        "directory (or its *.index.json): its layout, totals and one row per shard (file, "
        "format, tensors, bytes).",
    )
    p.add_argument("file", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")

    p = sub.add_parser(
        "convert",
        help="convert torch zip <-> safetensors, files <-> model directories, or reshard",
        description="Converts IN to OUT. The output format comes from --to, else from OUT's "
        "extension (.safetensors -> safetensors; .pt, .pth, .bin, .ckpt -> torch). torch -> "
        "torch rewrites any torch file (zip or legacy) in ckptio's page-aligned layout, keeping "
        "the saved object exactly (structure, sharing, views) as ckptio.load reads it. To "
        "safetensors: the tensors of IN under their dotted names; tensors that shared memory "
        "are stored as separate copies. Tensors are read onto the CPU (--map-location). IN may "
        "be a model directory (or its *.index.json): its tensors, in the index's order. With "
        "--max-shard-size, OUT is a model directory of shards and an index (huggingface_hub's "
        "layout), in the format --to names, else IN's; tensors sharing memory are kept as "
        "huggingface_hub keeps them (docs/directories.md).",
    )
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--to", choices=("torch", "safetensors"), help="output format")
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="write OUT as a model directory of shards of at most SIZE (bytes, or e.g. 5GB, "
        "500MB, 10KiB); reshards a directory IN",
    )
    p.add_argument(
        "--drop-non-tensors",
        action="store_true",
        help="to safetensors: leave out non-tensor entries instead of refusing the file",
    )
    p.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="to safetensors: a __metadata__ entry (repeatable; adds to IN's metadata)",
    )
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="read IN with weights_only=False (runs code from the file; only for files you trust)",
    )
    p.add_argument(
        "--map-location",
        default="cpu",
        metavar="DEVICE",
        help="where IN's tensors are read to, as load's map_location: a device (cpu, cuda, "
        "cuda:1) or 'none' (where each was saved, which needs that device); default cpu, "
        "so a file saved on a GPU converts on any host",
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")

    p = sub.add_parser(
        "verify",
        help="check a checkpoint's structure and checksums (exit 0 ok, 1 problem)",
        description="Checks the container (every offset, size and count), the pickle "
        "(well-formed; unpickled with placeholder storages by the weights-only unpickler, "
        "so no code from the file runs and no tensor data is read; every tensor fits its "
        "storage and every storage its record) and the zip CRC-32 of every record where the "
        "file has them (ckptio writes CRCs only with crc32=True; a file whose CRCs are all "
        "zero has none). For safetensors: the header (strictly) and that the tensors tile "
        "the data section. For a legacy (pre-1.6) torch file: its pickles (pre-scanned, "
        "never executed), that every storage record the pickle references is there with the "
        "size it implies, and a weights-only load onto the CPU. For a TorchScript archive: "
        "the container, data.pkl's opcodes and CRCs (its code and constants are not "
        "checked). No tensor is restored on a GPU. Exit code 0 when all is well, 1 when a "
        "check fails.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")

    sub.add_parser(
        "bench",
        help="compare ckptio with torch (and safetensors) on files or synthetic workloads",
        description="Runs ckptio.benchmark; `ckptio bench --help` shows its options.",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "bench":
        return _bench(args_list[1:])
    parser = _build_parser()
    args = parser.parse_args(args_list)
    try:
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "verify":
            return _verify(args)
        raise AssertionError(args.command)  # pragma: no cover
    except UsageError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        # `ckptio inspect big.pt | head`: the reader left; not an error worth a message.
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except Exception as e:
        return _fail(_describe(e))


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    text = str(e).strip().splitlines()
    return f"{text[0] if text else type(e).__name__}"


# ------------------------------------------------------------------------------------ bench
def _bench(argv: list[str]) -> int:
    try:
        from .benchmark import main as bench_main  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        return _fail(f"the benchmark is not available in this installation ({e})")
    return int(bench_main(argv) or 0)


# ---------------------------------------------------------------------------------- inspect
def _open(path: str, map_location: Any = None) -> Any:
    from ._open import open as open_checkpoint

    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a checkpoint file")
    return open_checkpoint(path, map_location)


def _source_format(path: str) -> tuple[str, bytes]:
    """(kind, first bytes) of the file at `path`, told apart by its bytes: "safetensors",
    "torch" (a zip file), "torchscript" (a zip file with constants.pkl), "legacy" (a pickle:
    torch's pre-1.6 format) or "unknown"."""
    from . import _core, _safetensors
    from ._archive import ArchiveReader
    from .errors import CheckpointError

    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a checkpoint file")
    with _core.io.File.open(path, _core.io.FileMode.READ) as f:
        head = f.pread(0, min(9, f.size))
        if _safetensors.looks_like_safetensors(head, f.size):
            return "safetensors", head
        if _core.zip.looks_like_zip(head[:4]):
            try:
                archive = ArchiveReader(f)
            except CheckpointError:
                return "torch", head  # a broken zip: the reader proper reports it
            return ("torchscript" if archive.has("constants.pkl") else "torch"), head
    return ("legacy" if head[:1] == b"\x80" else "unknown"), head


def _not_a_checkpoint(path: str, head: bytes) -> str:
    return (
        f"{path}: neither a torch checkpoint (zip or legacy) nor a safetensors file "
        f"(it starts with {head!r})"
    )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _alignment(offsets: Sequence[int]) -> int | None:
    """The largest power of two (up to 1 MiB) dividing every offset."""
    if not offsets:
        return None
    a = 1 << 20
    for o in offsets:
        if o:
            a = min(a, o & -o)
    return a


def _summary(handle: Any, path: str) -> dict[str, Any]:
    infos = handle.infos()
    storages: dict[str, int] = {}
    for i in infos:
        end = (i.storage_offset + _span(i.shape, i.stride)) * i.dtype.itemsize
        storages[i.storage] = max(storages.get(i.storage, 0), end)
    if handle.format == "torch":
        archive = handle.archive
        data = [archive.record(n) for n in archive.records if n.startswith("data/")]
        storage_bytes = sum(r.size for r in data)
        offsets = [r.data_offset for r in data if r.size]
        fmt = f"torch zip (archive '{handle.archive.prefix.rstrip('/')}')"
    else:
        storage_bytes = sum(storages.values())
        offsets = [i.file_offset for i in infos if i.nbytes]
        fmt = "safetensors"
    alignment = _alignment(offsets)
    return {
        "file": path,
        "format": handle.format,
        "format_detail": fmt,
        "file_bytes": os.path.getsize(path),
        "data_alignment": alignment,
        "tensor_count": len(infos),
        "storage_count": len(storages) if handle.format == "torch" else len(infos),
        "tensor_bytes": sum(i.nbytes for i in infos),
        "storage_bytes": storage_bytes,
        "metadata": handle.metadata,
        "tensors": [
            {
                "name": i.name,
                "path": [p if isinstance(p, (str, int)) else repr(p) for p in i.path],
                "dtype": _dtype_name(i.dtype),
                "shape": list(i.shape),
                "nbytes": i.nbytes,
                "storage": i.storage,
                "contiguous": i.stride == contiguous_strides(i.shape),
            }
            for i in infos
        ],
        "non_tensors": {name: _short_repr(v) for name, v in handle.non_tensors.items()},
    }


def _span(shape: Sequence[int], stride: Sequence[int]) -> int:
    if not all(shape):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _globals(path: str, kind: str) -> dict[str, list[str]] | None:
    """The globals the object pickle of a torch file (a zip file's data.pkl, a legacy file's
    fourth pickle) names and those the weights-only allowlist lacks (pre-scan only, nothing
    imported), or None for other files."""
    from ._unpickler import unsafe_globals

    if kind == "legacy":
        from ._legacy import check_legacy

        with open(path, "rb") as fh:
            data = fh.read()
        obj = check_legacy(data, path)[3]
        needed, lacking, blocked = unsafe_globals(data[obj.start : obj.end], weights_only=False)
        return {"needed": needed, "lacking": lacking, "blocked": blocked}
    if kind != "torch":
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(names) != 1:
                return None
            data = z.read(names[0])
    except (OSError, zipfile.BadZipFile):
        return None
    needed, lacking, blocked = unsafe_globals(data, weights_only=False)
    return {"needed": needed, "lacking": lacking, "blocked": blocked}


def _globals_lines(found: dict[str, list[str]]) -> list[str]:
    lines = [f"globals:         {len(found['needed'])}: {', '.join(found['needed']) or '-'}"]
    lacking = ", ".join(found["lacking"]) or "- (weights_only=True loads it)"
    lines.append(f"not allowlisted: {lacking}")
    allowable = [g for g in found["lacking"] if g not in found["blocked"]]
    if allowable:
        lines.append(
            f"  allow with:    torch.serialization.add_safe_globals([{', '.join(allowable)}])"
        )
    return lines


def _legacy_summary(path: str) -> dict[str, Any]:
    """inspect's summary of a legacy file. The format has no directory to read: the file is
    loaded weights-only onto the meta device (shapes and dtypes, no tensor data in memory)."""
    import torch

    from ._util import walk_leaves
    from .serialization import load

    loaded = load(path, map_location="meta", weights_only=True)
    storages: dict[int, tuple[str, int]] = {}
    tensors: list[dict[str, Any]] = []
    non_tensors = {}
    for key_path, value in walk_leaves(loaded):
        name = ".".join(str(p) for p in key_path)
        if not (isinstance(value, torch.Tensor) and value.layout == torch.strided):
            non_tensors[name] = _short_repr(value)
            continue
        storage = value.untyped_storage()
        key, _ = storages.setdefault(storage._cdata, (str(len(storages)), storage.nbytes()))
        tensors.append(
            {
                "name": name,
                "path": [p if isinstance(p, (str, int)) else repr(p) for p in key_path],
                "dtype": _dtype_name(value.dtype),
                "shape": list(value.shape),
                "nbytes": value.numel() * value.element_size(),
                "storage": key,
                "contiguous": value.is_contiguous(),
            }
        )
    info = {
        "file": path,
        "format": "legacy",
        "format_detail": "legacy torch file (pre-1.6 format)",
        "file_bytes": os.path.getsize(path),
        "data_alignment": None,
        "tensor_count": len(tensors),
        "storage_count": len(storages),
        "tensor_bytes": sum(t["nbytes"] for t in tensors),
        "storage_bytes": sum(n for _, n in storages.values()),
        "metadata": {},
        "tensors": tensors,
        "non_tensors": non_tensors,
    }
    return info


def _torchscript_summary(path: str) -> dict[str, Any]:
    """inspect's summary of a TorchScript archive: its data records (its tensors are known
    only to torch.jit.load, which runs the archive's code)."""
    from . import _core
    from ._archive import ArchiveReader

    with _core.io.File.open(path, _core.io.FileMode.READ) as f:
        archive = ArchiveReader(f)
        data = [archive.record(n) for n in archive.records if n.startswith("data/")]
        prefix = archive.prefix.rstrip("/")
    return {
        "file": path,
        "format": "torchscript",
        "format_detail": f"TorchScript archive '{prefix}' (torch.jit.save; tensors are not "
        "listed: open it with torch.jit.load)",
        "file_bytes": os.path.getsize(path),
        "data_alignment": _alignment([r.data_offset for r in data if r.size]),
        "tensor_count": None,
        "storage_count": len(data),
        "tensor_bytes": None,
        "storage_bytes": sum(r.size for r in data),
        "metadata": {},
        "tensors": [],
        "non_tensors": {},
    }


def _is_model_directory(path: str) -> bool:
    """A directory, or an index file naming a directory's shards (``*.index.json``)."""
    from ._directory import is_directory_path

    return is_directory_path(path) and os.path.exists(path)


def _directory_summary(path: str) -> dict[str, Any]:
    """inspect's summary of a model directory: its layout and, per shard, its format, tensor
    count and bytes (each shard's header or data.pkl only)."""
    from ._directory import resolve

    layout = resolve(path)
    metadata: dict[str, Any] = {}
    if layout.index is not None:
        with open(layout.index, encoding="utf-8") as f:
            meta = json.load(f).get("metadata")
        metadata = {k: v for k, v in (meta or {}).items() if k != "total_size"}
    shards = []
    for name in layout.shards:
        shard_path = layout.path(name)
        kind, head = _source_format(shard_path)
        if kind == "legacy":
            info = _legacy_summary(shard_path)
        elif kind in ("torch", "safetensors"):
            with _open(shard_path) as handle:
                info = _summary(handle, shard_path)
        else:
            raise UsageError(_not_a_checkpoint(shard_path, head))
        shards.append(
            {
                "file": name,
                "format": info["format"],
                "tensors": info["tensor_count"],
                "tensor_bytes": info["tensor_bytes"],
                "file_bytes": info["file_bytes"],
            }
        )
    formats = sorted({s["format"] for s in shards})
    return {
        "directory": layout.root,
        "index": os.path.basename(layout.index) if layout.index else None,
        "format": formats[0] if len(formats) == 1 else "mixed (" + ", ".join(formats) + ")",
        "shard_count": len(shards),
        "tensor_count": sum(s["tensors"] for s in shards),
        "tensor_bytes": sum(s["tensor_bytes"] for s in shards),
        "total_size": layout.total_size,
        "file_bytes": sum(s["file_bytes"] for s in shards),
        "metadata": metadata,
        "shards": shards,
    }


def _inspect_directory(args: argparse.Namespace) -> int:
    info = _directory_summary(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    total = info["total_size"]
    lines = [
        f"directory:       {info['directory']}",
        f"index:           {info['index'] or '- (one weights file)'}",
        f"shards:          {info['shard_count']} ({info['format']})",
        f"tensors:         {info['tensor_count']}",
        f"tensor bytes:    {info['tensor_bytes']} ({_human(info['tensor_bytes'])})",
        f"total_size:      {total if total is not None else '-'}",
        f"file bytes:      {info['file_bytes']} ({_human(info['file_bytes'])})",
    ]
    for k, v in info["metadata"].items():
        lines.append(f"metadata:        {k} = {_short_repr(v)}")
    print("\n".join(lines))
    rows = [
        (s["file"], s["format"], str(s["tensors"]), str(s["tensor_bytes"]), str(s["file_bytes"]))
        for s in info["shards"]
    ]
    print()
    _print_table(("file", "format", "tensors", "tensor bytes", "file bytes"), rows, left=2)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .errors import UnsafeGlobalError

    if _is_model_directory(args.file):
        return _inspect_directory(args)
    kind, head = _source_format(args.file)
    found = _globals(args.file, kind)
    try:
        if kind == "legacy":
            info = _legacy_summary(args.file)
        elif kind == "torchscript":
            info = _torchscript_summary(args.file)
        elif kind == "unknown":
            raise UsageError(_not_a_checkpoint(args.file, head))
        else:
            with _open(args.file) as handle:
                info = _summary(handle, args.file)
    except UnsafeGlobalError:
        if found is None:
            raise
        # The listing needs the weights-only rules: show what the file needs, then fail.
        if args.json:
            print(json.dumps({"file": args.file, "globals": found}, indent=2))
        else:
            print("\n".join([f"file:            {args.file}", *_globals_lines(found)]))
        raise
    if found is not None:
        info["globals"] = found
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    align = info["data_alignment"]
    lines = [
        f"file:            {info['file']}",
        f"format:          {info['format_detail']}",
        f"size:            {info['file_bytes']} bytes ({_human(info['file_bytes'])})",
        f"data alignment:  {align if align is not None else '-'}"
        + (" (page-aligned)" if align is not None and align >= 4096 else ""),
        f"tensors:         {info['tensor_count']} in {info['storage_count']} storages"
        if info["tensor_count"] is not None
        else f"tensors:         not listed; {info['storage_count']} storages",
        f"tensor bytes:    {info['tensor_bytes']} ({_human(info['tensor_bytes'])}); "
        f"storage bytes {info['storage_bytes']}"
        if info["tensor_bytes"] is not None
        else f"storage bytes:   {info['storage_bytes']} ({_human(info['storage_bytes'])})",
        f"non-tensors:     {len(info['non_tensors'])}",
    ]
    if found is not None:
        lines += _globals_lines(found)
    for k, v in info["metadata"].items():
        lines.append(f"metadata:        {k} = {_short_repr(v)}")
    print("\n".join(lines))
    rows = [
        (
            t["name"] or "<root>",
            t["dtype"],
            "[" + ", ".join(map(str, t["shape"])) + "]",
            str(t["nbytes"]),
        )
        for t in info["tensors"]
    ]
    if rows:
        print()
        _print_table(("name", "dtype", "shape", "bytes"), rows, left=3)
    if info["non_tensors"]:
        print("\nnon-tensor entries:")
        for name, value in info["non_tensors"].items():
            print(f"  {name or '<root>'} = {value}")
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> None:
    """`rows` under `header` in columns two spaces apart: the first `left` columns flush left
    (names), the others flush right (numbers)."""
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        print(
            "  ".join(
                f"{cell:<{w}}" if c < left else f"{cell:>{w}}"
                for c, (cell, w) in enumerate(zip(r, widths, strict=True))
            )
        )


# ---------------------------------------------------------------------------------- convert
class _Progress:
    """tqdm on stderr when it is a terminal, the work is large and tqdm is installed; else
    silent."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and total >= PROGRESS_MIN_BYTES and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(
                total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False
            )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def describe(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _output_format(args: argparse.Namespace) -> str:
    if args.to:
        return str(args.to)
    ext = os.path.splitext(args.output)[1].lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext in _TORCH_EXTENSIONS:
        return "torch"
    raise UsageError(
        f"cannot tell the output format from {args.output!r}; name it .safetensors or .pt, "
        "or pass --to torch|safetensors"
    )


def _parse_metadata(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _map_location(value: str) -> Any:
    """--map-location's value as load's map_location."""
    import torch

    if value.lower() == "none":
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--map-location takes a device (cpu, cuda, cuda:1) or none, got {value!r}"
        ) from None
    if device.type == "meta":
        raise UsageError("--map-location meta would leave no tensor data to write")
    return value


def _convert(args: argparse.Namespace) -> int:
    if args.max_shard_size is not None or _is_model_directory(args.input):
        return _convert_directory(args)
    target = _output_format(args)
    extra_metadata = _parse_metadata(args.metadata)
    if extra_metadata and target != "safetensors":
        raise UsageError("--metadata applies only to safetensors output")
    map_location = _map_location(args.map_location)
    if os.path.isdir(args.output):
        raise UsageError(
            f"{args.output} is a directory; name the output file, or pass --max-shard-size to "
            "write a model directory"
        )
    source, _ = _source_format(args.input)
    if source == "torchscript":
        raise UsageError(
            f"{args.input} is a TorchScript archive (torch.jit.save), not a checkpoint saved "
            "with torch.save: open it with torch.jit.load"
        )
    if source == "safetensors" or (
        source == "torch" and target == "safetensors" and not args.unsafe
    ):
        # Tensor by tensor through ckptio.open, in batches (weights-only by construction).
        _convert_tensors(args, target, extra_metadata, map_location)
    else:
        # The whole object, as ckptio.load reads it (legacy files, --unsafe, torch -> torch).
        _convert_object(args, source, target, extra_metadata, map_location)
    return 0


def _max_shard_size(value: str) -> int:
    """--max-shard-size's value in bytes: plain digits, or a size such as 5GB or 10KiB."""
    from ._shard_writer import parse_size

    text = value.strip()
    try:
        return parse_size(int(text) if text.isdigit() else text)
    except ValueError as e:
        raise UsageError(f"--max-shard-size: {e}") from None


def _convert_directory(args: argparse.Namespace) -> int:
    """convert with a model directory on either side: IN (a directory, an index or a file) is
    loaded whole, as ckptio.load reads it (mapped where it can be), its tensors taken under
    their dotted names, and saved as a directory (--max-shard-size) or one file."""
    from ._directory import resolve
    from .serialization import load, save

    to_directory = args.max_shard_size is not None
    max_shard_size = _max_shard_size(args.max_shard_size) if to_directory else None
    if not to_directory and os.path.isdir(args.output):
        raise UsageError(
            f"{args.output} is a directory; name the output file, or pass --max-shard-size to "
            "write a model directory"
        )
    if _is_model_directory(args.input):
        layout = resolve(args.input)
        files = [layout.path(s) for s in layout.shards]
    else:
        files = [args.input]
    kinds = {_source_format(f)[0] for f in files}
    if "torchscript" in kinds:
        raise UsageError(
            f"{args.input} is or holds a TorchScript archive (torch.jit.save), not a checkpoint "
            "saved with torch.save: open it with torch.jit.load"
        )
    source = "safetensors" if kinds == {"safetensors"} else "torch"
    if args.to:
        target = str(args.to)
    else:
        target = source if to_directory else _output_format(args)
    extra_metadata = _parse_metadata(args.metadata)
    if extra_metadata and target != "safetensors":
        raise UsageError("--metadata applies only to safetensors output")
    map_location = _map_location(args.map_location)
    total = sum(os.path.getsize(f) for f in files)
    progress = _Progress(total, "reading", not args.no_progress)
    try:
        # Zip and safetensors files are mapped (no copy in memory); legacy ones cannot be.
        obj = load(
            args.input,
            map_location=map_location,
            weights_only=not args.unsafe,
            mmap=kinds <= {"torch", "safetensors"},
        )
        progress.update(total)
        progress.describe("writing")
        tensors = _tensors_of(obj, args, contiguous=not to_directory and target == "safetensors")
        metadata = extra_metadata or None
        if to_directory:
            save(
                tensors,
                args.output,
                max_shard_size=max_shard_size,
                format=target,
                metadata=metadata,
            )
        elif target == "safetensors":
            save(tensors, args.output, format="safetensors", metadata=metadata, clone_shared=True)
        else:
            save(tensors, args.output)
    finally:
        progress.close()
    return 0


def _convert_object(
    args: argparse.Namespace,
    source: str,
    target: str,
    extra_metadata: dict[str, str],
    map_location: Any,
) -> None:
    from .serialization import load, save

    total = os.path.getsize(args.input)
    progress = _Progress(total, "converting", not args.no_progress)
    try:
        # A zip file is mapped (no copy in memory); a legacy one cannot be.
        obj = load(
            args.input,
            map_location=map_location,
            weights_only=not args.unsafe,
            mmap=source == "torch",
        )
        if target == "torch":
            save(obj, args.output)
        else:
            tensors = _tensors_of(obj, args)
            save(
                tensors,
                args.output,
                format="safetensors",
                metadata=extra_metadata or None,
                clone_shared=True,
            )
        progress.update(total)
    finally:
        progress.close()


def _tensors_of(obj: Any, args: argparse.Namespace, contiguous: bool = True) -> dict[str, Any]:
    """The tensors of a loaded object under their dotted names (as ckptio.open names them),
    each contiguous (for a safetensors file) unless `contiguous` is False."""
    import torch

    from ._util import walk_leaves

    tensors: dict[str, Any] = {}
    non_tensors: list[str] = []
    ambiguous = False
    for path, value in walk_leaves(obj):
        name = ".".join(str(p) for p in path)
        if isinstance(value, torch.Tensor) and value.layout == torch.strided:
            ambiguous = ambiguous or name in tensors
            tensors[name] = value.detach().contiguous() if contiguous else value.detach()
        else:
            non_tensors.append(name)
    if non_tensors and not args.drop_non_tensors:
        _refuse_non_tensors(args.input, non_tensors)
    if ambiguous:
        _refuse_ambiguous(args.input)
    return tensors


def _refuse_non_tensors(path: str, names: Sequence[str]) -> NoReturn:
    shown = ", ".join(repr(n) for n in list(names)[:5])
    raise UsageError(
        f"{path} holds non-tensor entries ({shown}{', ...' if len(names) > 5 else ''}), which "
        "safetensors cannot store; pass --drop-non-tensors to leave them out"
    )


def _refuse_ambiguous(path: str) -> NoReturn:
    raise UsageError(
        f"{path}: some dotted tensor names are ambiguous; cannot name them uniquely in the output"
    )


def _convert_tensors(
    args: argparse.Namespace, target: str, extra_metadata: dict[str, str], map_location: Any
) -> None:
    from .serialization import save

    with _open(args.input, map_location) as handle:
        total = sum(i.nbytes for i in handle.infos())
        progress = _Progress(total, "reading", not args.no_progress)
        try:
            if target == "safetensors" and handle.non_tensors and not args.drop_non_tensors:
                _refuse_non_tensors(args.input, list(handle.non_tensors))
            names = handle.keys()
            if len(names) != len(handle):
                _refuse_ambiguous(args.input)
            tensors: dict[str, Any] = {}
            for batch in _batches(handle, names):
                got = handle.get_tensors(batch)
                for name in batch:
                    t = got[name].detach()
                    tensors[name] = t.contiguous() if target == "safetensors" else got[name]
                progress.update(sum(handle.info(n).nbytes for n in batch))
            progress.describe("writing")
            if target == "safetensors":
                metadata = {**handle.metadata, **extra_metadata}
                save(tensors, args.output, format="safetensors", metadata=metadata or None)
            else:
                save(tensors, args.output)
        finally:
            progress.close()


def _batches(handle: Any, names: list[str]) -> list[list[str]]:
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in names:
        current.append(name)
        size += handle.info(name).nbytes
        if size >= BATCH_BYTES:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


# ----------------------------------------------------------------------------------- verify
def _verify(args: argparse.Namespace) -> int:
    """verify: a file's structure and checksums (CRC-32 of torch zip records, a manifest of
    whole-file digests beside a safetensors file), or a model directory's manifest and every
    shard. The bytes are checked by the same C++ path as ``load(..., verify=True)``."""
    path = args.file
    if not os.path.exists(path):
        raise UsageError(f"No such file or directory: {path}")
    checks: list[dict[str, Any]] = []
    ok = True

    def record(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and passed
        checks.append({"check": name, "ok": passed, "detail": detail})

    if os.path.isdir(path) or path.endswith(".index.json"):
        fmt = _verify_directory(path, record, not args.no_progress)
    else:
        fmt = _verify_file(path, record, not args.no_progress)
    if args.json:
        print(json.dumps({"file": path, "format": fmt, "ok": ok, "checks": checks}, indent=2))
    else:
        for c in checks:
            print(f"{c['check']:<10} {'ok' if c['ok'] else 'FAILED':<7} {c['detail']}")
        print(f"{path}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _verify_file(path: str, record: Any, show_progress: bool) -> str:
    """The checks of one checkpoint file, reported through `record`; returns its format."""
    from . import _core
    from ._verify import MANIFEST_SUFFIX
    from .errors import CheckpointError, UnsafeGlobalError

    fmt = "unknown"
    try:
        kind, head = _source_format(path)
        if kind == "legacy":
            fmt = kind
            _verify_legacy(path, record)
        elif kind == "torchscript":
            fmt = kind
            _verify_torchscript(path, record, show_progress)
        elif kind == "unknown":
            record("structure", False, _not_a_checkpoint(path, head))
        else:
            with _open(path) as handle:
                fmt = handle.format
                if fmt == "safetensors":
                    record(
                        "header",
                        True,
                        f"{len(handle)} tensors tile the data section exactly",
                    )
                    if not os.path.exists(path + MANIFEST_SUFFIX):
                        record(
                            "checksums",
                            True,
                            "none in the safetensors format (no "
                            f"{os.path.basename(path)}{MANIFEST_SUFFIX} manifest)",
                        )
                else:
                    records = handle.archive.records
                    compressed = [n for n, (_, _, method) in records.items() if method != 0]
                    if compressed:
                        record("container", False, f"compressed records: {', '.join(compressed)}")
                    else:
                        record("container", True, f"zip with {len(records)} stored records")
                    _check_opcodes(handle.archive, record)
                    record(
                        "pickle",
                        True,
                        f"{len(handle)} tensors in {len({i.storage for i in handle.infos()})} "
                        f"storages, {len(handle.non_tensors)} non-tensor entries; every tensor "
                        "fits its storage",
                    )
                    _check_crcs(path, handle.archive, record, show_progress)
    except UnsafeGlobalError as e:
        fmt = "torch"
        from ._archive import ArchiveReader

        with _core.io.File.open(path, _core.io.FileMode.READ) as f:
            archive = ArchiveReader(f)
            record("container", True, f"zip with {len(archive.records)} stored records")
            if _check_opcodes(archive, record):
                record(
                    "pickle",
                    True,
                    f"not unpickled: it needs weights_only=False ({_describe(e)})",
                )
            _check_crcs(path, archive, record, show_progress)
    except CheckpointError as e:
        record("structure", False, _describe(e))
    if os.path.exists(path + MANIFEST_SUFFIX):
        _check_manifest(path, record)
    return fmt


def _verify_directory(path: str, record: Any, show_progress: bool) -> str:
    """verify for a model directory (or its index): its manifest, if it has one, then every
    shard as a file, each check's detail prefixed by the shard's name."""
    from . import _directory
    from ._verify import MANIFEST_NAME
    from .errors import CheckpointError

    try:
        layout = _directory.resolve(path)
    except CheckpointError as e:
        record("structure", False, _describe(e))
        return "directory"
    if os.path.exists(os.path.join(layout.root, MANIFEST_NAME)):
        _check_manifest(layout.root, record)
    else:
        record("manifest", True, f"none ({MANIFEST_NAME} absent: whole files not checked)")
    for shard in layout.shards:

        def shard_record(name: str, passed: bool, detail: str, shard: str = shard) -> None:
            record(name, passed, f"{shard}: {detail}")

        _verify_file(layout.path(shard), shard_record, show_progress)
    return "directory"


def _check_manifest(path: str, record: Any) -> None:
    """The manifest check of a directory or a file (_verify.check_manifest)."""
    from ._verify import check_manifest, manifest_path
    from .errors import CheckpointError

    name = os.path.basename(manifest_path(path))
    try:
        n = check_manifest(path)
    except CheckpointError as e:
        record("manifest", False, _describe(e))
    else:
        record("manifest", True, f"size and CRC-32 of {n} files match {name}")


#: The first two pickles of a legacy file: torch's magic number and protocol version.


def _verify_legacy(path: str, record: Any) -> None:
    """verify for a legacy (pre-1.6) file: its pickles, its storage records and a
    weights-only load. The format has no checksums."""
    from ._legacy import check_legacy, check_legacy_records
    from .errors import CheckpointError, UnsafeGlobalError
    from .serialization import load

    with open(path, "rb") as fh:
        data = fh.read()
    try:
        pickles = check_legacy(data, path)
        detail = check_legacy_records(data, pickles, path)
    except CheckpointError as e:
        record("structure", False, _describe(e))
        return
    record(
        "pickles",
        True,
        "5 well-formed pickles (pre-scanned; the object replayed with inert globals, "
        "nothing run): magic number, protocol 1001, sys info, object, storage keys",
    )
    record("storages", True, detail)
    try:
        # On the CPU whatever device the file names: verify never needs the saved device.
        obj = load(path, map_location="cpu", weights_only=True)
    except UnsafeGlobalError as e:
        record("load", True, f"not loaded: it needs weights_only=False ({_describe(e)})")
    except CheckpointError as e:
        record("load", False, _describe(e))
    else:
        count, nbytes = _count_tensors(obj)
        record("load", True, f"weights-only load onto the CPU: {count} tensors, {nbytes} bytes")
    record("checksums", True, "none in the legacy format")


def _count_tensors(obj: Any) -> tuple[int, int]:
    import torch

    from ._util import walk_leaves

    tensors = [v for _, v in walk_leaves(obj) if isinstance(v, torch.Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


def _verify_torchscript(path: str, record: Any, show_progress: bool) -> None:
    """verify for a TorchScript archive: the container, data.pkl's opcodes and the CRCs.
    torch.jit.save compresses the code records (zip's deflate); torch reads them so."""
    from . import _core
    from ._archive import ArchiveReader

    with _core.io.File.open(path, _core.io.FileMode.READ) as f:
        archive = ArchiveReader(f)
        record(
            "format",
            True,
            "a TorchScript archive (torch.jit.save): its code and constants are not checked; "
            "open it with torch.jit.load",
        )
        records = archive.records
        compressed = sum(1 for _, _, method in records.values() if method != 0)
        record("container", True, f"zip with {len(records)} records ({compressed} compressed)")
        _check_opcodes(archive, record)
    progress = _Progress(os.path.getsize(path), "checking CRCs", show_progress)
    try:
        # zipfile decompresses each record and compares its CRC-32 (all of them: torch
        # writes real ones).
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        progress.update(os.path.getsize(path))
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:
        record("checksums", False, f"cannot read the records: {e}")
        return
    finally:
        progress.close()
    if bad is not None:
        record("checksums", False, f"CRC-32 mismatch in {bad}")
    else:
        record("checksums", True, f"CRC-32 of all {len(records)} records match")


def _check_opcodes(archive: Any, record: Any) -> bool:
    """Walks data.pkl's opcodes (pickletools decodes them, runs nothing): every opcode and
    argument complete, ending with STOP."""
    import pickletools

    data = archive.read("data.pkl")
    last = None
    try:
        for opcode, _arg, pos in pickletools.genops(data):
            last = (opcode.name, pos)
    except Exception as e:  # genops raises ValueError and friends on malformed input
        record("opcodes", False, f"data.pkl is not a well-formed pickle: {e}")
        return False
    if last is None or last[0] != "STOP" or last[1] != len(data) - 1:
        record("opcodes", False, "data.pkl has bytes after its STOP opcode")
        return False
    record("opcodes", True, f"data.pkl: {len(data)} bytes of well-formed pickle")
    return True


def _check_crcs(path: str, archive: Any, record: Any, show_progress: bool) -> None:
    """Compares the CRC-32 each zip entry declares with its bytes, read in parallel by the
    C++ core (the checker of ``load(..., verify=True)``). A file whose non-empty records all
    declare 0 recorded no CRCs (ckptio's default), which is not a failure."""
    from . import _core
    from ._verify import RecordChecker, recorded

    source = archive.source
    prefix, records, crcs = _core.zip.read_zip_directory(source, 1, True)
    if not recorded(records, crcs):
        record("checksums", True, "not recorded (all zero: written without write_crc32)")
        return
    checker = RecordChecker(path, prefix, records, crcs)
    progress = _Progress(checker.data_bytes, "checking CRCs", show_progress)
    try:
        mismatched = [prefix + n for n in checker.check_all(source, progress.update)]
    finally:
        progress.close()
    if mismatched:
        shown = ", ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else "")
        record("checksums", False, f"CRC-32 mismatch in {len(mismatched)} records: {shown}")
    else:
        record("checksums", True, f"CRC-32 of all {checker.record_count} records match")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
