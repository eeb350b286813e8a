"""The ``ckptio`` command line (also ``python -m ckptio``).

Commands::

    ckptio inspect FILE [--json]          what a checkpoint holds, without reading tensor data
    ckptio convert IN OUT [--to FORMAT]   torch zip <-> safetensors; torch -> ckptio's layout
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
        help="list what a checkpoint holds (no tensor data is read)",
        description="Format, data alignment, counts, total bytes, a table of tensors (name, "
        "dtype, shape, bytes) and the non-tensor entries of a checkpoint. Reads only the "
        "container's directory and header (torch: data.pkl, never executed).",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")

    p = sub.add_parser(
        "convert",
        help="convert torch zip <-> safetensors, or a torch file to ckptio's layout",
        description="Converts IN to OUT. The output format comes from --to, else from OUT's "
        "extension (.safetensors -> safetensors; .pt, .pth, .bin, .ckpt -> torch). torch -> "
        "torch rewrites any torch zip file in ckptio's page-aligned layout, keeping the saved "
        "object exactly (structure, sharing, views). To safetensors: the tensors of IN under "
        "their dotted names; tensors that shared memory are stored as separate copies.",
    )
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--to", choices=("torch", "safetensors"), help="output format")
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
        help="torch -> torch: unpickle with weights_only=False (runs code from the file; "
        "only for files you trust)",
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
        "the data section. Exit code 0 when all is well, 1 when a check fails.",
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
def _open(path: str) -> Any:
    from ._open import open as open_checkpoint

    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a checkpoint file")
    return open_checkpoint(path)


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


def _globals(path: str) -> dict[str, list[str]] | None:
    """The globals a torch zip file's data.pkl names and those the weights-only allowlist
    lacks (pre-scan only, nothing imported), or None for other files."""
    from ._unpickler import unsafe_globals

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


def _inspect(args: argparse.Namespace) -> int:
    from .errors import UnsafeGlobalError

    found = _globals(args.file) if not os.path.isdir(args.file) else None
    try:
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
        f"tensors:         {info['tensor_count']} in {info['storage_count']} storages",
        f"tensor bytes:    {info['tensor_bytes']} ({_human(info['tensor_bytes'])}); "
        f"storage bytes {info['storage_bytes']}",
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
        header = ("name", "dtype", "shape", "bytes")
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(4)]
        print()
        print(_row(header, widths))
        for r in rows:
            print(_row(r, widths))
    if info["non_tensors"]:
        print("\nnon-tensor entries:")
        for name, value in info["non_tensors"].items():
            print(f"  {name or '<root>'} = {value}")
    return 0


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    name, dtype, shape, nbytes = cells
    return f"{name:<{widths[0]}}  {dtype:<{widths[1]}}  {shape:<{widths[2]}}  {nbytes:>{widths[3]}}"


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


def _convert(args: argparse.Namespace) -> int:
    from .serialization import load, save

    target = _output_format(args)
    extra_metadata = _parse_metadata(args.metadata)
    if extra_metadata and target != "safetensors":
        raise UsageError("--metadata applies only to safetensors output")
    if os.path.isdir(args.output):
        raise UsageError(f"{args.output} is a directory; name the output file")
    with _open(args.input) as handle:
        source = handle.format
        total = sum(i.nbytes for i in handle.infos())
        progress = _Progress(total, "reading", not args.no_progress)
        try:
            if source == "torch" and target == "torch":
                # The whole object, exactly: mapped (no copy in memory), then written.
                progress.describe("converting")
                obj = load(args.input, mmap=True, weights_only=not args.unsafe)
                save(obj, args.output)
                progress.update(total)
            else:
                if target == "safetensors" and handle.non_tensors and not args.drop_non_tensors:
                    names = ", ".join(repr(n) for n in list(handle.non_tensors)[:5])
                    raise UsageError(
                        f"{args.input} holds non-tensor entries ({names}"
                        f"{', ...' if len(handle.non_tensors) > 5 else ''}), which safetensors "
                        "cannot store; pass --drop-non-tensors to leave them out"
                    )
                names = handle.keys()
                if len(names) != len(handle):
                    raise UsageError(
                        f"{args.input}: some dotted tensor names are ambiguous; cannot name "
                        "them uniquely in the output"
                    )
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
    return 0


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
    from . import _core
    from .errors import CheckpointError, UnsafeGlobalError

    path = args.file
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise UsageError(f"No such file or directory: {path}")
    checks: list[dict[str, Any]] = []
    ok = True

    def record(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and passed
        checks.append({"check": name, "ok": passed, "detail": detail})

    fmt = "unknown"
    try:
        with _open(path) as handle:
            fmt = handle.format
            if fmt == "safetensors":
                record(
                    "header",
                    True,
                    f"{len(handle)} tensors tile the data section exactly",
                )
                record("checksums", True, "none in the safetensors format")
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
                _check_crcs(path, handle.archive, record, not args.no_progress)
    except UnsafeGlobalError as e:
        fmt = "torch"
        from ._archive import ArchiveReader

        with _core.File.open(path, _core.FileMode.READ) as f:
            archive = ArchiveReader(f)
            record("container", True, f"zip with {len(archive.records)} stored records")
            if _check_opcodes(archive, record):
                record(
                    "pickle",
                    True,
                    f"not unpickled: it needs weights_only=False ({_describe(e)})",
                )
            _check_crcs(path, archive, record, not args.no_progress)
    except CheckpointError as e:
        record("structure", False, _describe(e))
    if args.json:
        print(json.dumps({"file": path, "format": fmt, "ok": ok, "checks": checks}, indent=2))
    else:
        for c in checks:
            print(f"{c['check']:<10} {'ok' if c['ok'] else 'FAILED':<7} {c['detail']}")
        print(f"{path}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


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
    """Compares the CRC-32 each zip entry declares with its bytes. A file whose non-empty
    records all declare 0 has no CRCs (ckptio's default), which is not a failure."""
    from . import _core

    try:
        with zipfile.ZipFile(path) as z:
            declared = {i.filename: i.CRC for i in z.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        record("checksums", False, f"cannot read the zip directory: {e}")
        return
    entries = [(archive.prefix + n, archive.record(n)) for n in archive.records]
    if all(declared.get(full, 0) == 0 for full, r in entries if r.size):
        record("checksums", True, "not recorded (all zero: written without crc32)")
        return
    progress = _Progress(sum(r.size for _, r in entries), "checking CRCs", show_progress)
    mismatched = []
    try:
        with _core.File.open(path, _core.FileMode.READ) as f:
            for full, r in entries:
                crc = 0
                offset = r.data_offset
                end = r.data_offset + r.size
                while offset < end:
                    n = min(16 << 20, end - offset)
                    crc = _crc(_core, f.pread(offset, n), crc)
                    offset += n
                    progress.update(n)
                if crc != declared.get(full, 0):
                    mismatched.append(full)
    finally:
        progress.close()
    if mismatched:
        shown = ", ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else "")
        record("checksums", False, f"CRC-32 mismatch in {len(mismatched)} records: {shown}")
    else:
        record("checksums", True, f"CRC-32 of all {len(entries)} records match")


def _crc(core: Any, data: bytes, value: int) -> int:
    if core.crc32_available():
        return int(core.crc32(data, value))
    import zlib

    return zlib.crc32(data, value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
