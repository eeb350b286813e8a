"""The README's headline table and the first-load issue's targets, from one ``make bench`` run.

    python bench/summary.py [bench/results/results.json]

Prints two markdown tables built from the JSON that ``bench/compare.py --json`` writes:

* the headline (README.md, "Results on the development machine"): per workload, torch and
  ckptio side by side for the first load+touch of a fresh process (ckptio's file and a stock
  ``torch.save`` file), the first ``mmap=True`` load, the cold first loads, loads repeated in
  one process and the save to a new path, each beside the machine limit that bounds it,
  measured in the same run;
* the targets (bench/README.md, "The targets against this run"): each target with this run's
  value, met or missed, and the limit or the peers it is held against.

Rows whose measurement the run skipped (``--no-cold``, a peer not installed) are left out.
Every number is a ratio of medians of the same run: nothing is compared across runs.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator

WORKLOADS = ("llm", "small", "ckpt")
# Per workload: first load vs torch.load, first mmap load vs torch's, save vs torch.save.
FIRST_TARGET = {"llm": 3.0, "small": 6.0, "ckpt": 3.0}
MMAP_TARGET = {"llm": 2.0, "small": 6.0, "ckpt": 2.0}
SAVE_TARGET = {"llm": 2.0, "small": 4.0, "ckpt": 2.0}
COLD_TARGET = 2.0  # cold first load vs torch.load's
COLD_LIMIT_TARGET = 0.9  # cold read limit / cold first load
HUGE_LIMIT_TARGET = 1.2  # first load / read into fresh huge-page memory
RSS_TARGET = 1.1  # peak RSS added by a load / file size
# Loaders that are not peers: the reference and plain pickle.
NOT_PEERS = {"torch", "torch mmap", "pickle5", "pickle5 oob"}


def _s(x: float) -> str:
    return f"{x:.3f} s"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.0f} MB"


def _first(c: dict[str, Any], name: str) -> float | None:
    entry = c.get(name, {}).get("first")
    return None if entry is None else float(entry["s"])


def _cold(c: dict[str, Any], name: str) -> float | None:
    entry = c.get(name, {}).get("cold")
    return None if entry is None else float(entry["s"])


def _workloads(
    results: dict[str, Any],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(name, workload, candidates, first-process limits, cold limits) of each workload the
    run measured, in WORKLOADS order."""
    for name in WORKLOADS:
        w = results["workloads"].get(name)
        if w is not None:
            yield name, w, w["candidates"], w["first_limits"], w["cold_limits"]


def headline(results: dict[str, Any]) -> str:
    """The README's table: torch and ckptio side by side, each row with its bound."""
    lines = [
        "| workload | operation | torch | ckptio | vs torch | bound (same run) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, w, c, first_lim, cold_lim in _workloads(results):
        torch_first = _first(c, "torch")
        label = f"{name} ({_mb(w['tensor_bytes'])})"

        def row(op: str, theirs: float | None, ours: float | None, bound: str = "") -> None:
            nonlocal label
            if theirs is None or ours is None:
                return
            lines.append(
                f"| {label} | {op} | {_s(theirs)} | {_s(ours)} | {theirs / ours:.2f}x | {bound} |"
            )
            label = ""

        fresh = ", ".join(
            f"{_s(first_lim[k]['s'])} ({pages})"
            for k, pages in (("read fresh 4K", "4 KiB pages"), ("read fresh huge", "huge pages"))
            if k in first_lim
        )
        row(
            "**first load+touch, fresh process**",
            torch_first,
            _first(c, "ckptio"),
            f"read into fresh memory {fresh}" if fresh else "",
        )
        row("first load, stock torch.save file", torch_first, _first(c, "ckptio, torch's file"))
        touch = first_lim.get("map + touch")
        row(
            "first mmap load+touch",
            _first(c, "torch mmap"),
            _first(c, "ckptio mmap"),
            f"map + touch {_s(touch['s'])}" if touch else "",
        )
        cold_bound = ", ".join(
            f"{label_} {_s(cold_lim[k]['s'])}"
            for k, label_ in (("cold read", "cold read"), ("cold read O_DIRECT", "O_DIRECT"))
            if k in cold_lim
        )
        row("cold first load+touch", _cold(c, "torch"), _cold(c, "ckptio"), cold_bound)
        row(
            "cold first load, stock torch.save file",
            _cold(c, "torch"),
            _cold(c, "ckptio, torch's file"),
        )
        if "torch" in c and "ckptio" in c:
            row(
                "repeated load+touch, one process",
                c["torch"]["load_touch_s"],
                c["ckptio"]["load_touch_s"],
            )
        saves, limits = w["saves"], w["limits"]
        if "torch" in saves and "ckptio" in saves:
            write = limits.get("write")
            row(
                "save to a new path",
                saves["torch"]["save_s"],
                saves["ckptio"]["save_s"],
                f"write {_s(write['s'])}" if write else "",
            )
        rss = c.get("ckptio", {}).get("rss")
        if rss is not None:
            lines.append(
                f"| {label} | peak RSS of a ckptio load / file | | "
                f"{rss['delta_rss'] / c['ckptio']['file_bytes']:.2f} | | |"
            )
    return "\n".join(lines) + "\n"


def targets(results: dict[str, Any]) -> str:
    """Every target of the first-load issue with this run's value, met or missed."""
    lines = [
        "| workload | target | this run | | bound / peers (same run) |",
        "|---|---|---:|---|---|",
    ]
    for name, w, c, first_lim, cold_lim in _workloads(results):

        def row(target: str, value: str, met: bool, bound: str, workload: str = name) -> None:
            verdict = "met" if met else "**missed**"
            lines.append(f"| {workload} | {target} | {value} | {verdict} | {bound} |")

        ours = {
            label: c.get(key)
            for label, key in (
                ("ckptio", "ckptio"),
                ("ckptio, torch's file", "ckptio, torch's file"),
            )
        }
        torch_first = _first(c, "torch")
        fresh = [first_lim[k]["s"] for k in ("read fresh 4K", "read fresh huge") if k in first_lim]
        if torch_first is not None:
            bound = (
                f"torch.load / fastest read into fresh memory = {torch_first / min(fresh):.2f}x"
                if fresh
                else ""
            )
            for label in ours:
                mine = _first(c, label)
                if mine is not None:
                    goal = FIRST_TARGET[name]
                    v = torch_first / mine
                    row(
                        f"first load+touch, {label}: >= {goal:g}x torch.load",
                        f"{v:.2f}x",
                        v >= goal,
                        bound,
                    )
        mine = _first(c, "ckptio")
        if mine is not None and "read fresh huge" in first_lim and "read fresh 4K" in first_lim:
            huge, small_pages = first_lim["read fresh huge"]["s"], first_lim["read fresh 4K"]["s"]
            v = mine / huge
            row(
                f"first load within {HUGE_LIMIT_TARGET:g}x of read fresh huge",
                f"{v:.2f}x of it",
                v <= HUGE_LIMIT_TARGET,
                f"read fresh huge {_s(huge)}, read fresh 4K {_s(small_pages)} "
                f"(ckptio at {mine / small_pages:.2f}x of 4K)",
            )
        theirs_mmap, mine_mmap = _first(c, "torch mmap"), _first(c, "ckptio mmap")
        if theirs_mmap is not None and mine_mmap is not None:
            goal = MMAP_TARGET[name]
            v = theirs_mmap / mine_mmap
            touch = first_lim.get("map + touch")
            row(
                f"first mmap load+touch >= {goal:g}x torch mmap",
                f"{v:.2f}x",
                v >= goal,
                f"map + touch {_s(touch['s'])}" if touch else "",
            )
        torch_cold = _cold(c, "torch")
        cold_read = cold_lim.get("cold read", {}).get("s")
        direct = cold_lim.get("cold read O_DIRECT", {}).get("s")
        limit_text = ", ".join(
            x
            for x in (
                f"cold read {_s(cold_read)}" if cold_read else "",
                f"O_DIRECT {_s(direct)}" if direct else "",
            )
            if x
        )
        for label in ours:
            mine = _cold(c, label)
            if mine is None or torch_cold is None:
                continue
            v = torch_cold / mine
            bound = (
                f"torch.load cold / cold read = {torch_cold / cold_read:.2f}x" if cold_read else ""
            )
            row(
                f"cold first load, {label}: >= {COLD_TARGET:g}x torch.load",
                f"{v:.2f}x",
                v >= COLD_TARGET,
                bound,
            )
        for label in ours:
            mine = _cold(c, label)
            if mine is None or not cold_read:
                continue
            v = cold_read / mine
            row(
                f"cold first load, {label}: >= {COLD_LIMIT_TARGET:g}x the cold read limit",
                f"{v:.2f}x",
                v >= COLD_LIMIT_TARGET,
                limit_text,
            )
        saves = w["saves"]
        if "torch" in saves and "ckptio" in saves:
            goal = SAVE_TARGET[name]
            v = saves["torch"]["save_s"] / saves["ckptio"]["save_s"]
            write = w["limits"].get("write")
            row(
                f"save to a new path >= {goal:g}x torch.save",
                f"{v:.2f}x",
                v >= goal,
                f"write limit {_s(write['s'])}" if write else "",
            )
        rss = c.get("ckptio", {}).get("rss")
        if rss is not None:
            v = rss["delta_rss"] / c["ckptio"]["file_bytes"]
            row(f"peak RSS of a load <= {RSS_TARGET:g}x the file", f"{v:.2f}x", v <= RSS_TARGET, "")
        for kind, ours_name in (("copy", "ckptio"), ("mmap", "ckptio mmap")):
            mine = _first(c, ours_name)
            peers = {
                k: v["first"]["s"]
                for k, v in c.items()
                if v.get("kind") == kind
                and not k.startswith("ckptio")
                and k not in NOT_PEERS
                and "first" in v
            }
            if mine is None or not peers:
                continue
            row(
                f"first loads ahead of every {kind} peer",
                f"{ours_name} {_s(mine)}",
                all(t > mine for t in peers.values()),
                ", ".join(f"{k} {t:.3f}" for k, t in peers.items()),
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "bench/results/results.json"
    with open(path) as f:
        results = json.load(f)
    print(f"Run of {results['meta']['date']}.\n")
    print(headline(results))
    print(targets(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
