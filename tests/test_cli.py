"""The ``ckptio`` command line, driven as a user would: in a subprocess, through both
``python -m ckptio`` and the installed console script, on real files, including the error
paths (one line on stderr, exit code 2, never a traceback).

Each subprocess pays for importing torch (seconds on a loaded machine), so the tests of the
entry points, exit codes and terminal handling use real processes (``proc=True`` or
``script=True``) and the other checks of the commands' output call the same ``main`` in
this process, with stdout and stderr captured the same way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptio

from conftest import assert_same, make_model, torch_archive_parts, write_plain_zip

st = pytest.importorskip("safetensors.torch")

SCRIPT = shutil.which("ckptio", path=os.path.dirname(sys.executable)) or shutil.which("ckptio")


def run(*args: Any, script: bool = False, proc: bool = False) -> Any:
    """Runs `ckptio ARGS`: through the console script (script=True), `python -m ckptio`
    (proc=True), or ckptio.cli.main in this process (the default)."""
    if not (script or proc):
        return _in_process([str(a) for a in args])
    if script:
        assert SCRIPT is not None, "the ckptio console script is not installed"
        cmd = [SCRIPT, *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "ckptio", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _in_process(argv: list[str]) -> Any:
    import contextlib
    import io
    import types

    from ckptio import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's --help, --version and usage errors
            code = e.code if isinstance(e.code, int) else 2
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_usage_error(result: Any, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: Any) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    model = make_model()
    sd = model.state_dict()
    out = {
        "stock": d / "stock.pt",
        "ours": d / "ours.pt",
        "ours_crc": d / "ours_crc.pt",
        "nested": d / "nested.pt",
        "st": d / "model.safetensors",
        "legacy": d / "legacy.pt",
        "script": d / "script.pt",
        "numpy": d / "numpy.pt",
    }
    torch.save(sd, out["stock"])
    ckptio.save(sd, out["ours"])
    with ckptio.options(crc32=True):
        ckptio.save(sd, out["ours_crc"])
    w = torch.randn(6, 4)
    torch.save(
        {"model": {"w": w, "tied": w, "v": w[1:3]}, "epoch": 3, "name": "run-1"}, out["nested"]
    )
    st.save_file({k: v.clone() for k, v in sd.items()}, str(out["st"]), metadata={"format": "pt"})
    torch.save(sd, out["legacy"], _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(out["script"]))
    # a numpy array: weights_only=True refuses the file (its globals are not allowlisted)
    torch.save({"w": torch.ones(3), "a": np.arange(4)}, out["numpy"])
    return out


# ------------------------------------------------------------------------------ conventions
def test_version_and_help() -> None:
    r = run("--version", script=True)
    assert r.returncode == 0 and r.stdout.strip() == f"ckptio {ckptio.__version__}"
    r = run("--help", proc=True)
    assert r.returncode == 0
    for command in ("inspect", "convert", "verify", "bench"):
        assert command in r.stdout
    for command in ("inspect", "convert", "verify"):
        r = run(command, "--help")
        assert r.returncode == 0 and "usage: ckptio " + command in r.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "required"),
        (("frobnicate",), "invalid choice"),
        (("inspect",), "PATH"),
        (("convert", "a.pt"), "OUT"),
        (("convert", "a.pt", "b.pt", "--to", "numpy"), "invalid choice"),
        (("inspect", "--bogus", "x.pt"), "unrecognized"),
        (("convert", "a.pt", "b.pt", "--map-location", "nowhere"), "--map-location"),
        (("convert", "a.pt", "b.pt", "--map-location", "meta"), "no tensor data"),
    ],
    ids=[
        "nothing",
        "unknown-command",
        "missing-file-arg",
        "missing-out",
        "bad-to",
        "bad-flag",
        "bad-map-location",
        "meta-map-location",
    ],
)
def test_bad_arguments(args: tuple[str, ...], fragment: str) -> None:
    assert_usage_error(run(*args), fragment)


def test_bad_arguments_in_a_real_process() -> None:
    assert_usage_error(run("convert", "a.pt", proc=True), "OUT")


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_missing_file(tmp_path: Path, command: str) -> None:
    assert_usage_error(run(command, tmp_path / "nope.pt"), "No such file", "nope.pt")


def test_missing_and_corrupt_files_in_real_processes(tmp_path: Path) -> None:
    assert_usage_error(run("inspect", tmp_path / "nope.pt", script=True), "No such file")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10" + b"\0" * 7 + b"{not json at all")
    assert_usage_error(run("inspect", garbage, proc=True), "garbage.safetensors", "JSON")


def test_corrupt_and_odd_inputs(tmp_path: Path, files: dict[str, Path]) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint" * 10)
    assert_usage_error(run("inspect", garbage), "garbage.pt", "neither")
    assert_usage_error(run("convert", garbage, tmp_path / "o.safetensors"), "garbage.pt")
    (tmp_path / "empty").mkdir()
    assert_usage_error(run("inspect", tmp_path / "empty"), "not a model directory")
    assert_usage_error(run("convert", files["ours"], tmp_path / "out.xyz"), "--to")
    assert not (tmp_path / "out.xyz").exists()


# ---------------------------------------------------------------------------------- inspect
def test_inspect_text(files: dict[str, Path]) -> None:
    r = run("inspect", files["ours"], script=True)
    assert r.returncode == 0, r.stderr
    sd = make_model().state_dict()
    assert "torch zip" in r.stdout and "data alignment:  4096" in r.stdout
    for name, t in sd.items():
        line = next(line for line in r.stdout.splitlines() if line.startswith(name + " "))
        assert str(t.dtype).replace("torch.", "") in line
        assert line.rstrip().endswith(str(t.numel() * t.element_size()))


def test_inspect_json(files: dict[str, Path]) -> None:
    sd = make_model().state_dict()
    stock = json.loads(run("inspect", "--json", files["stock"]).stdout)
    ours = json.loads(run("inspect", "--json", files["ours"]).stdout)
    assert stock["format"] == ours["format"] == "torch"
    assert stock["data_alignment"] == 64 and ours["data_alignment"] == 4096
    assert [t["name"] for t in ours["tensors"]] == list(sd)
    assert ours["tensor_count"] == len(sd)
    assert ours["tensor_bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert {t["name"]: t["shape"] for t in ours["tensors"]} == {
        k: list(v.shape) for k, v in sd.items()
    }
    nested = json.loads(run("inspect", "--json", files["nested"]).stdout)
    assert nested["non_tensors"] == {"epoch": "3", "name": "'run-1'"}
    assert nested["storage_count"] == 1 and nested["tensor_count"] == 3
    safet = json.loads(run("inspect", "--json", files["st"]).stdout)
    assert safet["format"] == "safetensors" and safet["metadata"] == {"format": "pt"}


# ---------------------------------------------------------------------------------- convert
def test_convert_torch_to_safetensors_and_back(tmp_path: Path, files: dict[str, Path]) -> None:
    sd = make_model().state_dict()
    out = tmp_path / "m.safetensors"
    r = run("convert", files["stock"], out, "--metadata", "source=stock", proc=True)
    assert r.returncode == 0, r.stderr
    got = st.load_file(str(out))
    assert list(got) == sorted(got, key=lambda k: list(got).index(k))
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"source": "stock"}
    back = tmp_path / "back.pt"
    r = run("convert", out, back)
    assert r.returncode == 0, r.stderr
    loaded = torch.load(back)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_convert_stock_torch_to_ckptio_layout(tmp_path: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "aligned.pt"
    r = run("convert", files["nested"], out)
    assert r.returncode == 0, r.stderr
    assert json.loads(run("inspect", "--json", out).stdout)["data_alignment"] == 4096
    expected, got = torch.load(files["nested"]), torch.load(out)
    assert_same(expected, got)
    assert got["model"]["w"].data_ptr() == got["model"]["tied"].data_ptr()  # sharing kept


def test_convert_refuses_non_tensors_unless_dropped(tmp_path: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "n.safetensors"
    assert_usage_error(run("convert", files["nested"], out), "'epoch'", "--drop-non-tensors")
    assert not out.exists()
    r = run("convert", files["nested"], out, "--drop-non-tensors", "--no-progress")
    assert r.returncode == 0, r.stderr
    got = st.load_file(str(out))
    nested = torch.load(files["nested"])
    assert set(got) == {"model.w", "model.tied", "model.v"}
    assert torch.equal(got["model.v"], nested["model"]["v"])  # views stored as their values


def test_convert_to_with_flag(tmp_path: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "weights.bin.out"
    r = run("convert", files["ours"], out, "--to", "safetensors")
    assert r.returncode == 0, r.stderr
    assert set(st.load_file(str(out))) == set(make_model().state_dict())


def test_convert_legacy_file(tmp_path: Path, files: dict[str, Path]) -> None:
    """A legacy (pre-1.6) file converts as ckptio.load reads it, to either format."""
    want = torch.load(files["legacy"])
    for name in ("out.pt", "out.safetensors"):
        r = run("convert", files["legacy"], tmp_path / name, "--no-progress")
        assert r.returncode == 0, r.stderr
    assert_same(want, torch.load(tmp_path / "out.pt"))
    got = st.load_file(str(tmp_path / "out.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_convert_unsafe_means_weights_only_false(tmp_path: Path, files: dict[str, Path]) -> None:
    for name, extra in (("u.pt", ()), ("u.safetensors", ("--drop-non-tensors",))):
        out = tmp_path / name
        assert_usage_error(run("convert", files["numpy"], out, *extra), "weights")
        assert not out.exists()
        r = run("convert", files["numpy"], out, "--unsafe", *extra)
        assert r.returncode == 0, r.stderr
    got = torch.load(tmp_path / "u.pt", weights_only=False)
    assert torch.equal(got["w"], torch.ones(3)) and (got["a"] == np.arange(4)).all()
    assert list(st.load_file(str(tmp_path / "u.safetensors"))) == ["w"]


def test_convert_map_location(tmp_path: Path, files: dict[str, Path]) -> None:
    """The default reads onto the CPU; 'none' restores each storage where it was saved."""
    for value in ("cpu", "none"):
        out = tmp_path / f"{value}.pt"
        r = run("convert", files["nested"], out, "--map-location", value)
        assert r.returncode == 0, r.stderr
        assert_same(torch.load(files["nested"]), torch.load(out))


def test_convert_refuses_torchscript(tmp_path: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "s.pt"
    assert_usage_error(run("convert", files["script"], out, "--unsafe"), "TorchScript")
    assert not out.exists()


# ----------------------------------------------------------------------------------- verify
def test_verify_legacy_and_torchscript(files: dict[str, Path]) -> None:
    r = run("verify", files["legacy"])
    assert r.returncode == 0, r.stdout + r.stderr
    for fragment in ("storage records", "weights-only load onto the CPU", "legacy format"):
        assert fragment in r.stdout, r.stdout
    report = json.loads(run("verify", "--json", files["script"]).stdout)
    assert report["ok"] is True and report["format"] == "torchscript"
    assert "not checked" in report["checks"][0]["detail"]


def test_inspect_legacy_and_torchscript(files: dict[str, Path]) -> None:
    sd = make_model().state_dict()
    info = json.loads(run("inspect", "--json", files["legacy"]).stdout)
    assert info["format"] == "legacy"
    assert [t["name"] for t in info["tensors"]] == list(sd)
    assert [t["shape"] for t in info["tensors"]] == [list(v.shape) for v in sd.values()]
    r = run("inspect", files["script"])
    assert r.returncode == 0 and "TorchScript" in r.stdout


def test_verify_good_files(files: dict[str, Path]) -> None:
    r = run("verify", files["stock"], proc=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CRC-32 of all" in r.stdout and r.stdout.strip().endswith("OK")
    r = run("verify", files["ours"])
    assert r.returncode == 0 and "not recorded" in r.stdout
    r = run("verify", "--json", files["ours_crc"])
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"] is True
    assert any("match" in c["detail"] for c in report["checks"])
    r = run("verify", files["st"])
    assert r.returncode == 0 and "safetensors" in r.stdout


def _flip_byte_in_record(path: Path, out: Path, record_suffix: str) -> None:
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record_suffix))
    blob = bytearray(path.read_bytes())
    # the payload follows the local header: 30 bytes + name + extra
    name_len = int.from_bytes(blob[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(blob[info.header_offset + 28 : info.header_offset + 30], "little")
    at = info.header_offset + 30 + name_len + extra_len
    blob[at] ^= 0xFF
    out.write_bytes(bytes(blob))


@pytest.mark.parametrize("which", ["stock", "ours_crc"])
def test_verify_detects_flipped_data(tmp_path: Path, files: dict[str, Path], which: str) -> None:
    bad = tmp_path / "flipped.pt"
    _flip_byte_in_record(files[which], bad, "data/0")
    r = run("verify", bad, proc=which == "stock")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "mismatch" in r.stdout and "data/0" in r.stdout and "FAILED" in r.stdout


def test_verify_detects_structural_damage(tmp_path: Path, files: dict[str, Path]) -> None:
    blob = files["ours"].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(blob[: len(blob) - 100])
    r = run("verify", cut)
    assert r.returncode == 1 and "FAILED" in r.stdout
    bad_st = tmp_path / "bad.safetensors"
    data = bytearray(files["st"].read_bytes())
    bad_st.write_bytes(bytes(data[:-4]))  # data section shorter than the header says
    r = run("verify", "--json", bad_st)
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False


@pytest.mark.parametrize("damage", ["truncated", "trailing"])
def test_verify_detects_a_malformed_pickle(tmp_path: Path, damage: str) -> None:
    pkl, payloads = torch_archive_parts({"a": torch.arange(4)})
    bad_pkl = pkl[:-5] if damage == "truncated" else pkl + b"extra"
    path = tmp_path / "bad.pt"
    records = {"data.pkl": bad_pkl, "version": b"3\n"}
    records.update({f"data/{i}": p for i, p in enumerate(payloads)})
    write_plain_zip(path, records)
    r = run("verify", path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout


def test_verify_never_runs_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    # A pickle that would create a file if it ran.
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    torch.save({"a": torch.ones(1), "evil": Evil()}, path)
    r = run("verify", path, proc=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "weights_only=False" in r.stdout
    assert not marker.exists()


# ------------------------------------------------------------------------------------ bench
def test_bench_runs_the_benchmark_on_a_users_file(tmp_path: Path) -> None:
    """`ckptio bench FILE` is ckptio.benchmark's command: its own --help, and a run on a file
    that prints the table and writes the JSON."""
    r = run("bench", "--help", script=True)
    assert r.returncode == 0 and "--workloads" in r.stdout and "--plot" in r.stdout
    path = tmp_path / "m.pt"
    torch.save(make_model().state_dict(), path)
    out = tmp_path / "r.json"
    r = run(
        "bench", path, "--rounds", "1", "--first-rounds", "1", "--no-cold", "--no-rss",
        "--no-limits", "--candidates", "ckptio,torch", "--dir", tmp_path / "work", "--json", out,
        proc=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| ckptio |" in r.stdout and "| torch |" in r.stdout
    results = json.loads(out.read_text())
    (workload,) = results["workloads"].values()
    assert set(workload["candidates"]) == {"ckptio", "torch"}
    assert all(len(c["first"]["runs"]) == 1 for c in workload["candidates"].values())


# --------------------------------------------------------------------------------- progress
@pytest.mark.slow
def test_progress_bar_only_on_a_terminal(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    import pty

    src = tmp_path / "big.pt"
    ckptio.save({"a": torch.zeros(5 << 20)}, src)  # 20 MiB: over the progress threshold
    out = tmp_path / "big.safetensors"
    r = run("convert", src, out, proc=True)  # stderr is a pipe: no bar
    assert r.returncode == 0 and r.stderr == ""
    out.unlink()
    leader, follower = pty.openpty()
    import fcntl
    import struct
    import termios

    # A terminal 100 columns wide (a fresh pty has 0, where tqdm draws nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ckptio", "convert", str(src), str(out)],
            stdout=subprocess.PIPE,
            stderr=follower,
            timeout=120,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0
    drawn = b"".join(chunks)
    assert b"reading" in drawn and b"%" in drawn, drawn


# ------------------------------------------------------------------------ model directories
def _hub_save(sd: dict[str, Any], directory: Path, fmt: str, max_shard_size: Any) -> None:
    """huggingface_hub's save_torch_state_dict: the reference layout (docs/directories.md).
    make test-compat's environments do not install it: the test skips there."""
    save_torch_state_dict = pytest.importorskip("huggingface_hub").save_torch_state_dict

    directory.mkdir()
    save_torch_state_dict(
        dict(sd), directory, max_shard_size=max_shard_size, safe_serialization=fmt == "safetensors"
    )


def _dir_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory, read shard by shard with safetensors or torch."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(st.load_file(str(directory / name)))
        elif name.endswith(".bin"):
            out.update(torch.load(directory / name))
    return out


def _assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: Any) -> dict[str, Path]:
    """The TinyGPT state dict as a directory of 3+ safetensors shards (ckptio's) and of torch
    shards (huggingface_hub's)."""
    d = tmp_path_factory.mktemp("dirs")
    sd = make_model().state_dict()
    out = {"st": d / "st", "bin": d / "bin"}
    ckptio.save(sd, out["st"], max_shard_size=2000, format="safetensors")
    _hub_save(sd, out["bin"], "torch", 2000)
    return out


@pytest.mark.parametrize("which", ["st", "bin"])
def test_inspect_a_directory(model_dirs: dict[str, Path], which: str) -> None:
    d = model_dirs[which]
    fmt, index_name = {
        "st": ("safetensors", "model.safetensors.index.json"),
        "bin": ("torch", "pytorch_model.bin.index.json"),
    }[which]
    index = json.loads((d / index_name).read_text())
    shards = list(dict.fromkeys(index["weight_map"].values()))
    info = json.loads(run("inspect", "--json", d).stdout)
    assert info["directory"] == str(d) and info["index"] == index_name
    assert info["format"] == fmt and info["shard_count"] == len(shards) > 2
    assert info["tensor_count"] == len(index["weight_map"])
    assert info["total_size"] == index["metadata"]["total_size"]
    assert [s["file"] for s in info["shards"]] == shards
    tensors = _dir_tensors(d)
    for s in info["shards"]:
        held = [k for k, v in index["weight_map"].items() if v == s["file"]]
        assert s["format"] == fmt and s["tensors"] == len(held)
        assert s["tensor_bytes"] == sum(tensors[k].nbytes for k in held)
        assert s["file_bytes"] == os.path.getsize(d / s["file"])
    assert info["file_bytes"] == sum(s["file_bytes"] for s in info["shards"])
    # The index file names the same directory.
    assert json.loads(run("inspect", "--json", d / index_name).stdout) == info
    text = run("inspect", d)
    assert text.returncode == 0, text.stderr
    assert f"shards:          {len(shards)} ({fmt})" in text.stdout
    assert f"total_size:      {index['metadata']['total_size']}" in text.stdout
    for s in info["shards"]:
        row = next(line for line in text.stdout.splitlines() if line.startswith(s["file"]))
        assert row.split() == [
            s["file"],
            fmt,
            str(s["tensors"]),
            str(s["tensor_bytes"]),
            str(s["file_bytes"]),
        ]


@pytest.mark.parametrize("out_name", ["one.safetensors", "one.pt"])
def test_convert_a_directory_to_one_file(
    tmp_path: Path, model_dirs: dict[str, Path], out_name: str
) -> None:
    for which in ("st", "bin"):
        out = tmp_path / f"{which}-{out_name}"
        r = run("convert", model_dirs[which], out)
        assert r.returncode == 0, r.stderr
        got = st.load_file(str(out)) if out_name.endswith(".safetensors") else torch.load(out)
        _assert_same_tensors(got, _dir_tensors(model_dirs[which]))


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_convert_a_file_to_a_directory_as_huggingface_hub_lays_it_out(
    tmp_path: Path, files: dict[str, Path], fmt: str
) -> None:
    sd = make_model().state_dict()
    out = tmp_path / "out"
    r = run("convert", files["stock"], out, "--max-shard-size", "2KB", "--to", fmt, proc=True)
    assert r.returncode == 0, r.stderr
    _hub_save(sd, tmp_path / "theirs", fmt, "2KB")
    names = sorted(os.listdir(out))
    assert names == sorted(os.listdir(tmp_path / "theirs"))
    index = next(n for n in names if n.endswith(".index.json"))
    assert (out / index).read_bytes() == (tmp_path / "theirs" / index).read_bytes()
    _assert_same_tensors(_dir_tensors(out), _dir_tensors(tmp_path / "theirs"))
    # Without --to, a directory keeps IN's format: a torch file gives torch shards.
    r = run("convert", files["st"], tmp_path / "keep", "--max-shard-size", "4096")
    assert r.returncode == 0, r.stderr
    assert all(n.endswith((".safetensors", ".json")) for n in os.listdir(tmp_path / "keep"))


def test_reshard_and_change_a_directorys_format(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    sd = make_model().state_dict()
    out = tmp_path / "bin"
    r = run("convert", model_dirs["st"], out, "--max-shard-size", "4KiB", "--to", "torch")
    assert r.returncode == 0, r.stderr
    # The tensors go out in the source index's order (ckptio.load's order of a directory).
    source = json.loads((model_dirs["st"] / "model.safetensors.index.json").read_text())
    _hub_save({k: sd[k] for k in source["weight_map"]}, tmp_path / "ref", "torch", 4096)
    index = "pytorch_model.bin.index.json"
    assert (out / index).read_bytes() == (tmp_path / "ref" / index).read_bytes()
    _assert_same_tensors(_dir_tensors(out), _dir_tensors(model_dirs["st"]))
    # Resharding in place: the directory is replaced by its own tensors in one shard.
    r = run("convert", out, out, "--max-shard-size", "1GB")
    assert r.returncode == 0, r.stderr
    assert os.listdir(out) == ["pytorch_model.bin"]
    _assert_same_tensors(_dir_tensors(out), _dir_tensors(model_dirs["st"]))
    assert sorted(os.listdir(tmp_path)) == ["bin", "ref"]


def test_directory_conversion_errors(
    tmp_path: Path, files: dict[str, Path], model_dirs: dict[str, Path]
) -> None:
    out = tmp_path / "out"
    assert_usage_error(
        run("convert", files["stock"], out, "--max-shard-size", "5G"),
        "--max-shard-size", "'5G' has no known unit",
    )  # fmt: skip
    out.mkdir()
    assert_usage_error(run("convert", model_dirs["st"], out), "is a directory", "--max-shard-size")
    (out / "config.json").write_text("{}")
    assert_usage_error(
        run("convert", model_dirs["st"], out, "--max-shard-size", "1GB"),
        "files a checkpoint save does not write (config.json)", str(out),
    )  # fmt: skip
    assert os.listdir(out) == ["config.json"]
    assert_usage_error(
        run("convert", files["nested"], tmp_path / "n", "--max-shard-size", "1GB"),
        "non-tensor entries ('epoch', 'name')", "--drop-non-tensors",
    )  # fmt: skip
    r = run(
        "convert", files["nested"], tmp_path / "n", "--max-shard-size", "1GB", "--drop-non-tensors"
    )
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp_path / "n" / "pytorch_model.bin")
    assert list(got) == ["model.w", "model.tied", "model.v"]
    assert (
        got["model.w"].untyped_storage().data_ptr()
        == got["model.tied"].untyped_storage().data_ptr()
    )
    args = ("--max-shard-size", "1GB", "--to", "torch", "--metadata", "a=b")
    assert_usage_error(
        run("convert", model_dirs["st"], tmp_path / "m", *args),
        "--metadata applies only to safetensors output",
    )
    assert_usage_error(
        run("convert", files["script"], tmp_path / "s", "--max-shard-size", "1GB"), "TorchScript"
    )
    assert sorted(os.listdir(tmp_path)) == ["n", "out"]
