"""The hostile-file corpus (tests/hostile/make_corpus.py): every crafted file must raise the
exact exception its case names, with a telling message, and nothing else; or, for the files
that only look hostile (valid pickles CPython loads: far memo indices, deep nesting), load.

All cases load in one child process under an address-space limit (2 GiB above what the
interpreter already maps), so a crash fails the test instead of the run, and an allocation
sized by a lie in the file fails loudly instead of exhausting the machine."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostile.child import LIMIT_MEMORY, run_child
from hostile.make_corpus import Case, all_cases, write_corpus

# The child: loads every case of the index (by path and, for files, from a BytesIO) and
# reports what each raised. The unreadable case needs a user without root's privileges: as
# root, a forked child drops to uid 65534 before opening the file.
_CHILD = LIMIT_MEMORY + textwrap.dedent("""
    import io, json, os, sys
    import ckptio

    def outcome(fn):
        try:
            fn()
            return {"exc": "ok"}
        except BaseException as e:
            return {"exc": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                    "errno": getattr(e, "errno", None), "msg": str(e)[:600]}

    def as_nobody(fn):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, json.dumps(outcome(fn)).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        return json.loads(data) if data else {"exc": "child died"}

    index = json.load(open(sys.argv[1]))
    limit_memory(2 << 30)
    results = {}
    for case in index:
        path, kw = case["path"], case["load_kwargs"]
        if case["kind"] == "unreadable" and os.getuid() == 0:
            results[case["name"]] = {"path": as_nobody(lambda: ckptio.load(path, **kw))}
            continue
        res = {"path": outcome(lambda: ckptio.load(path, **kw))}
        if case["kind"] == "file" and not kw.get("mmap"):
            data = open(path, "rb").read()
            res["buffer"] = outcome(lambda: ckptio.load(io.BytesIO(data), **kw))
            # load_into parses the whole file (its own unpickling: tensors as specs) even
            # into an empty target; it reads no tensor data then.
            res["load_into"] = outcome(lambda: ckptio.load_into({}, path, strict=False))
        results[case["name"]] = res
    json.dump(results, sys.stdout)
""")

CASES = {c.name: c for c in all_cases(Path("/nonexistent"))}


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    out = tmp_path_factory.mktemp("hostile")
    index = write_corpus(out)
    # The unreadable file goes to a directory any user may traverse (pytest's are 0700), so
    # that as root the unprivileged child fails on the file's own mode bits.
    side = Path(tempfile.mkdtemp(prefix="ckptio-hostile-"))
    side.chmod(0o711)
    for entry in index:
        if entry["kind"] == "unreadable":
            moved = side / Path(entry["path"]).name
            os.replace(entry["path"], moved)
            entry["path"] = str(moved)
    (out / "index.json").write_text(json.dumps(index))
    try:
        proc = run_child(_CHILD, str(out / "index.json"), timeout=300)
    finally:
        shutil.rmtree(side)
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-3000:]}"
    results: dict[str, Any] = json.loads(proc.stdout)
    markers = sorted(p.name for p in out.glob("*.marker"))
    for entry in index:
        results[entry["name"]]["markers"] = markers
    yield results


def _check(case: Case, outcome: dict[str, Any]) -> None:
    assert outcome["exc"] == case.expected, f"{case.name}: {outcome}"
    if case.expected == "ok":
        return
    assert case.fragment.lower() in outcome["msg"].lower(), f"{case.name}: {outcome['msg']}"
    if case.errno is not None:
        assert outcome["errno"] == case.errno, outcome
    if case.expected == "UnsafeGlobalError":
        assert "UnpicklingError" in outcome["mro"]  # pickle.UnpicklingError-compatible
        assert "allow" in outcome["msg"] or "blocked" in outcome["msg"]
    if case.expected == "CheckpointError":
        assert "RuntimeError" in outcome["mro"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file(name: str, corpus_results: dict[str, Any]) -> None:
    case = CASES[name]
    result = corpus_results[name]
    _check(case, result["path"])
    if case.expected == "CheckpointError" and case.kind == "file":
        assert ".pt" in result["path"]["msg"], "the message names the file"
    if "buffer" in result:
        _check(case, result["buffer"])
    if case.marker:
        assert not result["markers"], f"a payload ran: {result['markers']}"
    if "load_into" in result:
        # Parsing for load_into succeeds or refuses the file as load does: never another
        # exception (a crash would have failed the child).
        got = result["load_into"]
        assert got["exc"] == "ok" or got["exc"] in ("CheckpointError", "UnsafeGlobalError"), (
            f"{name}: load_into: {got}"
        )
        if case.expected == "UnsafeGlobalError":  # the same global is refused
            assert got["exc"] == "UnsafeGlobalError", f"{name}: load_into: {got}"


REGRESSIONS = sorted((Path(__file__).resolve().parent.parent / "fuzz" / "regressions").iterdir())


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_fuzz_regressions(path: Path) -> None:
    """Inputs the fuzzer (or a review) found: the parsers refuse them cleanly."""
    import ckptio
    from ckptio import _core

    data = path.read_bytes()
    refused = 0
    for weights_only in (True, False):
        try:
            _core.pickling.scan_pickle(data, weights_only)
        except ckptio.CheckpointError as e:
            assert "offset" in str(e) or "STOP" in str(e)
            refused += 1
    try:
        _core.zip.read_zip_directory(_core.io.BufferSource(data, path.name))
    except ckptio.CheckpointError as e:
        assert path.name in str(e)
        refused += 1
    assert refused, "each regression is a file one of the parsers must refuse"


@pytest.mark.parametrize("label", ["os-system", "builtins-exec", "subprocess"])
def test_marker_payloads_are_live(tmp_path: Path, label: str) -> None:
    """The control: a full (trusting) load of the same file runs the payload, so the corpus
    cases that refuse it prove something."""
    import ckptio

    case = next(c for c in all_cases(tmp_path) if c.name == f"global-{label}")
    path = tmp_path / "payload.pt"
    assert case.data is not None
    path.write_bytes(case.data)
    with pytest.raises(ckptio.UnsafeGlobalError):
        ckptio.load(path)
    assert not list(tmp_path.glob("*.marker"))
    ckptio.load(path, weights_only=False)
    assert (tmp_path / f"{label}.marker").exists()
