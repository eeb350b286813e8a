"""The benchmark module (ckptio.benchmark): runs end to end on tiny workloads, writes a JSON of
the documented shape, a PNG and a markdown table, and stops on a wrong result."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio.benchmark import candidates as cmod
from ckptio.benchmark import main
from ckptio.benchmark._measure import touch
from ckptio.benchmark.candidates import BenchmarkError, Candidate, verify
from ckptio.benchmark.limits import LIMITS
from ckptio.benchmark.workloads import build

CORE = "ckptio,ckptio mmap,ckptio load_into,torch,torch mmap,pickle5,pickle5 oob"


def _run(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """A quick run: one round of each kind; cold first loads only where a test asks for them
    (`--cold`), since every first load is a process of its own."""
    out = tmp_path / "r.json"
    cold = "--cold" in args
    args = tuple(a for a in args if a != "--cold") + (() if cold else ("--no-cold",))
    argv = ["--quick", "--rounds", "1", "--first-rounds", "1", "--dir", str(tmp_path)]
    rc = main([*argv, "--json", str(out), *args])
    return rc, (json.loads(out.read_text()) if out.exists() else {})


def test_quick_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png, md = tmp_path / "chart.png", tmp_path / "table.md"
    rc, res = _run(
        tmp_path, "--no-rss", "--candidates", CORE, "--plot", str(png), "--markdown", str(md)
    )
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert table.strip() == md.read_text().strip()
    assert "| ckptio load_into | reuse |" in table and "| torch.save |" in table
    # bench/summary.py reads this run's JSON: a headline row per workload, no cold rows
    summary = _summary_module()
    head, goals = summary.headline(res), summary.targets(res)
    assert sum("**first load+touch, fresh process**" in line for line in head.splitlines()) == 3
    assert "cold" not in head and "cold" not in goals
    assert "| small | save to a new path >= 4x torch.save |" in goals

    meta = res["meta"]
    assert meta["rounds"] == 1 and meta["quick"] is True and meta["statistic"] == "median"
    assert meta["first_rounds"] == 1 and meta["cold"] is False
    assert meta["torch"] == torch.__version__ and meta["ckptio"] == ckptio.__version__
    assert set(res["workloads"]) == {"llm", "small", "ckpt"}
    for w in res["workloads"].values():
        assert set(w) == {
            "description",
            "tensor_bytes",
            "saves",
            "candidates",
            "limits",
            "first_limits",
            "cold_limits",
            "failed",
        }
        assert w["failed"] == {}
        assert w["tensor_bytes"] > 0
        assert set(w["candidates"]) == set(CORE.split(","))
        for c in w["candidates"].values():
            assert c["kind"] in {"copy", "mmap", "reuse"}
            assert len(c["load_runs"]) == 1 and c["load_s"] == c["load_runs"][0] > 0
            assert c["load_touch_s"] >= c["load_s"]
            assert c["file_bytes"] > 0 and c["load_touch_vs_torch"] > 0
            # The headline: one fresh process's first load+touch, with its peak RSS.
            assert len(c["first"]["runs"]) == 1 and c["first"]["s"] == c["first"]["runs"][0] > 0
            assert c["first_vs_torch"] > 0 and c["first_vs_limit"] > 0
            assert c["rss"]["peak_rss"] >= c["rss"]["base_rss"] > 0
            assert "cold" not in c
        assert w["candidates"]["torch"]["load_touch_vs_torch"] == 1.0
        assert w["candidates"]["torch"]["first_vs_torch"] == 1.0
        assert w["candidates"]["torch mmap"]["first_vs_torch_mmap"] == 1.0
        for fmt, s in w["saves"].items():
            assert fmt in cmod.FORMATS and s["save_s"] > 0 and s["file_bytes"] > 0
        assert w["saves"]["torch"]["save_vs_torch"] == 1.0
        lim = w["limits"]
        assert lim["bytes"] == w["saves"]["ckptio"]["file_bytes"]
        for k in LIMITS:
            assert lim[k]["s"] > 0 and len(lim[k]["runs"]) == meta["rounds"], k
        assert set(lim) == {*LIMITS, "bytes"}
        assert set(w["first_limits"]) == {"read fresh 4K", "read fresh huge", "map + touch"}
        assert all(v["s"] > 0 and len(v["runs"]) == 1 for v in w["first_limits"].values())
        assert w["cold_limits"] == {}


def test_first_and_cold_loads_each_run_in_a_fresh_process(tmp_path: Path) -> None:
    md = tmp_path / "r.md"
    rc, res = _run(
        tmp_path,
        "--workloads",
        "small",
        "--candidates",
        "ckptio,torch",
        "--first-rounds",
        "1",
        "--cold",
        "--markdown",
        str(md),
    )
    assert rc == 0
    w = res["workloads"]["small"]
    c = w["candidates"]["ckptio"]
    assert len(c["first"]["runs"]) == 1 and c["first"]["s"] > 0
    rss = c["rss"]
    assert rss["peak_rss"] >= rss["base_rss"] > 0
    # The load+touch holds the whole file's tensors: the peak grows by at least their size.
    assert rss["delta_rss"] >= 0.5 * w["tensor_bytes"]
    assert rss["seconds"] in c["first"]["runs"]  # the peak comes from one of the first loads
    assert w["saves"]["ckptio"]["rss"]["seconds"] > 0
    # Cold: the file was evicted before each sample, and mincore confirmed it (else a note).
    cold = c["cold"]
    assert len(cold["runs"]) == 1 and cold["s"] > 0
    assert (cold["resident_max"] is not None and cold["resident_max"] < 0.05) or cold["note"]
    assert set(w["cold_limits"]) == {"cold read", "cold read O_DIRECT"}
    for v in w["cold_limits"].values():
        assert v["s"] is None and v["note"] or v["s"] > 0 and len(v["runs"]) == 1
    assert c["cold_vs_torch"] > 0 and w["candidates"]["torch"]["cold_vs_torch"] == 1.0
    row = next(line for line in md.read_text().splitlines() if line.startswith("| ckptio |"))
    assert row.split("|")[3].strip() == f"{c['first']['s']:.3f}"  # the headline column
    assert "| cold read | fresh process, file evicted |" in md.read_text()


def test_saves_go_to_a_new_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    torch_fmt = cmod.FORMATS["torch"]

    def save(obj: Any, path: str) -> None:
        seen.append(Path(path).exists())
        torch_fmt.save(obj, path)

    monkeypatch.setitem(cmod.FORMATS, "torch", dataclasses.replace(torch_fmt, save=save))
    rc, _ = _run(
        tmp_path, "--no-rss", "--no-limits", "--workloads", "small", "--candidates", "torch"
    )
    assert rc == 0
    assert seen == [False, False]  # the warm-up round and the timed one


def test_load_rounds_run_in_a_fresh_process(tmp_path: Path) -> None:
    # The writers leave state in the process that saved (safetensors' save keeps ctypes
    # types alive): the load rounds run where nothing was built or written.
    from ckptio.benchmark import runner

    path = tmp_path / "m.pt"
    ckptio.save({"w": torch.randn(64, 32), "b": torch.arange(7)}, path)
    spec = {
        "op": "rounds",
        "loaders": {"ckptio": str(path), "ckptio load_into": str(path)},
        "rounds": 2,
        "limits": {"source": str(path), "scratch": str(tmp_path / "scratch.bin")},
        "skip": ["write"],
    }
    out = runner._child(spec, timeout=300)
    for name in spec["loaders"]:
        t = out["times"][name]
        assert len(t["load"]) == len(t["touch"]) == len(t["load_touch"]) == 2
        assert all(lt >= ld > 0 for lt, ld in zip(t["load_touch"], t["load"], strict=True))
    assert set(out["ltimes"]) == set(LIMITS) - {"write"}
    assert all(len(v) == 2 for v in out["ltimes"].values())
    assert not (tmp_path / "scratch.bin").exists()  # the child's limits cleaned up

    spec["loaders"] = {"no such loader": str(path)}
    with pytest.raises(BenchmarkError, match="the rounds process failed: KeyError"):
        runner._child(spec, timeout=300)


def test_wrong_result_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def corrupt(path: str, _target: Any) -> Any:
        sd = ckptio.load(path)
        t = next(iter(sd.values()))
        t.view(-1)[0] += 1
        return sd

    bad = Candidate("broken", "copy", "ckptio", corrupt, keeps_sharing=True)
    monkeypatch.setitem(cmod.CANDIDATES, "broken", bad)
    rc, res = _run(tmp_path, "--no-rss", "--workloads", "small", "--candidates", "torch,broken")
    assert rc == 1 and res == {}
    assert "broken (small)" in capsys.readouterr().err


def test_verify_checks_values_keys_dtypes_and_ties() -> None:
    wl = build("llm", quick=True)
    good = {k: v.clone() for k, v in wl.obj.items()}
    good["lm_head.weight"] = good["transformer.wte.weight"]
    verify("ok", good, wl.obj, wl.tied, ordered=True)
    untied = dict(good, **{"lm_head.weight": good["lm_head.weight"].clone()})
    with pytest.raises(BenchmarkError, match="no longer tied"):
        verify("untied", untied, wl.obj, wl.tied)
    with pytest.raises(BenchmarkError, match="keys"):
        verify("missing", {k: v for k, v in good.items() if k != "lm_head.weight"}, wl.obj)
    with pytest.raises(BenchmarkError, match="keys"):
        verify("order", dict(reversed(list(good.items()))), wl.obj, ordered=True)
    verify("order ignored", dict(reversed(list(good.items()))), wl.obj)
    cast = dict(good, **{"transformer.wpe.weight": good["transformer.wpe.weight"].float()})
    with pytest.raises(BenchmarkError, match="float32"):
        verify("dtype", cast, wl.obj)
    ckpt = build("ckpt", quick=True).obj
    with pytest.raises(BenchmarkError, match="epoch"):
        verify("epoch", dict(ckpt, epoch=8), ckpt)


def test_workloads_are_deterministic_and_shaped_as_specified() -> None:
    a, b = build("small", quick=True), build("small", quick=True)
    verify("same seed", a.obj, b.obj, ordered=True)
    sizes = [t.numel() * t.element_size() for t in a.obj.values()]
    assert min(sizes) >= 256 - 8 and max(sizes) <= 64 << 10
    assert {t.dtype for t in a.obj.values()} == {
        torch.float32,
        torch.float16,
        torch.int64,
        torch.bool,
    }
    llm = build("llm", quick=True)
    assert llm.obj["lm_head.weight"] is llm.obj["transformer.wte.weight"]
    assert llm.flat is not None
    assert llm.flat["lm_head.weight"].data_ptr() != llm.flat["transformer.wte.weight"].data_ptr()
    assert all(t.dtype == torch.float16 for t in llm.obj.values())
    ckpt = build("ckpt", quick=True).obj
    assert set(ckpt) == {"epoch", "loss", "model_state_dict", "optimizer_state_dict", "rng"}
    assert ckpt["optimizer_state_dict"]["state"][0]["step"] == 1


def test_files_mode(tmp_path: Path) -> None:
    sd = {"w": torch.randn(300, 40), "b": torch.arange(9)}
    path = tmp_path / "given.pt"
    torch.save(sd, path)
    cands = "ckptio,ckptio load_into,torch,pickle5"  # pickle5 reads no torch file: not used
    rc, res = _run(tmp_path, str(path), "--no-rss", "--candidates", cands)
    assert rc == 0
    w = res["workloads"]["given.pt"]
    assert set(w["candidates"]) == {"ckptio", "ckptio load_into", "torch"}
    assert w["saves"] == {} and w["limits"]["bytes"] == path.stat().st_size


def test_bad_arguments(tmp_path: Path) -> None:
    assert _run(tmp_path, "--workloads", "nope", "--no-rss")[0] == 1
    assert _run(tmp_path, "--candidates", "nope", "--no-rss")[0] == 1
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])


def test_touch_reads_every_page() -> None:
    t = torch.zeros(3 * 4096 + 10, dtype=torch.uint8)
    t[::4096] = 1  # one marked byte per page; touch reads exactly those and the last byte
    t[-1] = 5
    assert touch({"a": t, "again": t}) == 4 + 5


@pytest.mark.skipif(
    cmod.CANDIDATES["safetensors"].unavailable() is not None, reason="safetensors not installed"
)
def test_safetensors_peers_on_flat_workloads(tmp_path: Path) -> None:
    rc, res = _run(tmp_path, "--no-rss", "--no-limits", "--candidates", "ckptio,safetensors")
    assert rc == 0
    assert "safetensors" in res["workloads"]["llm"]["candidates"]
    assert "safetensors" in res["workloads"]["llm"]["saves"]
    assert "safetensors" not in res["workloads"]["ckpt"]["candidates"]  # not a flat dict


def test_a_peer_that_cannot_write_a_workload_sits_it_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(obj: Any, path: str) -> None:
        raise RuntimeError("Metadata overflow")  # as tensorizer does past ~5,000 tensors

    fmt = cmod.Format("peer.save", ".peer", refuse, True, "peer", requires="pickle")
    monkeypatch.setitem(cmod.FORMATS, "peer", fmt)
    monkeypatch.setitem(cmod.CANDIDATES, "peer", Candidate("peer", "copy", "peer", lambda p, t: 0))
    rc, res = _run(
        tmp_path, "--no-rss", "--no-limits", "--workloads", "small", "--candidates", "torch,peer"
    )
    assert rc == 0
    w = res["workloads"]["small"]
    assert set(w["candidates"]) == {"torch"} and set(w["saves"]) == {"torch"}
    assert "Metadata overflow" in w["failed"]["peer"]


def test_verify_benchmark_quick_run(tmp_path: Path) -> None:
    """bench/bench_verify.py runs end to end (small workloads, one round): every cell
    checked against the saved tensors, one row per file with both medians."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_verify.py"
    md = tmp_path / "verify.md"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--rounds", "1", "--dir", str(tmp_path),
         "--markdown", str(md)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = md.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and " s |" in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| llm",
        "| ckpt",
        "| small",
        "| llm, 4 safetensors shards + manifest",
    ]
    # medians, cost and interval, the paired cost and its interval, the process counts
    assert all(len(r.split(" | ")) == 8 and r.endswith(" 1 + 1 |") for r in rows), rows
    assert (tmp_path / "llm-4-shards" / "ckptio.manifest.json").exists()


def _summary_module() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "summary.py"
    spec = importlib.util.spec_from_file_location("bench_summary", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_holds_each_target_against_the_same_run() -> None:
    """bench/summary.py: each ratio from the run's own medians, met or missed at the target's
    threshold, each row with its bound; peers compared like for like."""
    summary = _summary_module()

    def cand(kind: str, first: float, cold: float | None = None, **extra: Any) -> dict[str, Any]:
        c: dict[str, Any] = {"kind": kind, "first": {"s": first}, "load_touch_s": first / 2}
        if cold is not None:
            c["cold"] = {"s": cold}
        return {**c, **extra}

    rss = {"delta_rss": 1000, "base_rss": 1, "peak_rss": 1001}
    results = {
        "meta": {"date": "today"},
        "workloads": {
            "small": {
                "tensor_bytes": 656_000_000,
                "candidates": {
                    "ckptio": cand("copy", 0.5, 0.8, rss=rss, file_bytes=1000),
                    "ckptio, torch's file": cand("copy", 0.25, 0.6),
                    "ckptio mmap": cand("mmap", 0.3),
                    "torch": cand("copy", 2.0, 3.2),
                    "torch mmap": cand("mmap", 1.5),
                    "safetensors": cand("mmap", 0.29),
                    "safetensors pread": cand("copy", 0.9),
                },
                "first_limits": {
                    "read fresh 4K": {"s": 0.25},
                    "read fresh huge": {"s": 0.2},
                    "map + touch": {"s": 0.01},
                },
                "cold_limits": {"cold read": {"s": 0.64}, "cold read O_DIRECT": {"s": 0.33}},
                "limits": {"write": {"s": 0.15}},
                "saves": {"torch": {"save_s": 1.0}, "ckptio": {"save_s": 0.2}},
            }
        },
    }
    goals = summary.targets(results).splitlines()

    def verdict(target: str) -> list[str]:
        (line,) = [g for g in goals if f"| small | {target} |" in g]
        return [part.strip() for part in line.split("|")[3:6]]

    assert verdict("first load+touch, ckptio: >= 6x torch.load")[:2] == ["4.00x", "**missed**"]
    assert verdict("first load+touch, ckptio, torch's file: >= 6x torch.load")[:2] == [
        "8.00x",
        "met",
    ]
    assert verdict("first load within 1.2x of read fresh huge")[:2] == ["2.50x of it", "**missed**"]
    assert verdict("first mmap load+touch >= 6x torch mmap")[:2] == ["5.00x", "**missed**"]
    assert verdict("cold first load, ckptio: >= 2x torch.load")[:2] == ["4.00x", "met"]
    assert verdict("cold first load, ckptio: >= 0.9x the cold read limit")[:2] == [
        "0.80x",
        "**missed**",
    ]
    assert verdict("save to a new path >= 4x torch.save")[:2] == ["5.00x", "met"]
    assert verdict("peak RSS of a load <= 1.1x the file")[:2] == ["1.00x", "met"]
    # safetensors' mmap load (0.29 s) is ahead of ckptio mmap (0.3 s): missed, named
    ahead = verdict("first loads ahead of every mmap peer")
    assert ahead[1] == "**missed**" and "safetensors 0.290" in ahead[2]
    assert verdict("first loads ahead of every copy peer")[1] == "met"
    head = summary.headline(results)
    assert (
        "| small (656 MB) | **first load+touch, fresh process** | 2.000 s | 0.500 s | 4.00x |"
        in (head)
    )
    assert (
        "| cold first load+touch | 3.200 s | 0.800 s | 4.00x | cold read 0.640 s, O_DIRECT" in head
    )
