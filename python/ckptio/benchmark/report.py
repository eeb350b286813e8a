"""Results as a markdown table, a JSON file and a PNG chart."""

from __future__ import annotations

import json
import statistics
from typing import Any, Optional

__all__ = ["markdown", "plot", "write_json"]


def _s(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.3f}"


def _x(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.2f}x"


def _mib(v: Optional[int]) -> str:
    return "" if v is None else f"{v / 2**20:.0f}"


def _on(flag: Any) -> str:
    return "unrecorded" if flag is None else "on" if flag else "off"


def _first(c: dict[str, Any], key: str) -> Optional[float]:
    return (c.get(key) or {}).get("s")


def markdown(results: dict[str, Any]) -> str:
    """Per workload: the saves, the loads (first loads of a fresh process first, then cold
    first loads and repeated loads in one process) and the machine's limits."""
    meta = results["meta"]
    first_rounds = meta.get("first_rounds", meta["rounds"])
    lines = [
        f"ckptio {meta['ckptio']}, torch {meta['torch']}, Python {meta['python']}, "
        f"{meta['cpus']} CPUs, {meta['ckptio_threads']} ckptio threads, ckptio huge pages "
        f"{_on(meta.get('ckptio_huge_pages'))}, recycling up to "
        f"{meta.get('ckptio_recycle_max_bytes', 0) / 2**30:g} GiB, THP "
        f"{meta['transparent_hugepage']}. Headline: the first load+touch of a fresh process "
        f"(imports excluded), median of {first_rounds} processes per candidate, page cache "
        "warm; cold: the same with the file evicted before each; repeated: loads in one "
        f"process, median of {meta['rounds']} rounds. Saves to a new path, median of "
        f"{meta['rounds']} rounds. All after a warm-up round, candidates interleaved, every "
        "loader verified against the original.",
        "",
    ]
    for name, skipped in results.get("skipped", {}).items():
        lines.append(f"- skipped {name}: {skipped}")
    for wname, w in results["workloads"].items():
        mb = w["tensor_bytes"] / 1e6
        lines += ["", f"### {wname}: {w['description']} ({mb:.0f} MB of tensors)", ""]
        if w["saves"]:
            lines += [
                "| writer | save to a new path (s) | vs torch.save | file (MB) "
                "| save adds RSS (MiB) |",
                "|---|---:|---:|---:|---:|",
            ]
            for sv in w["saves"].values():
                rss = sv.get("rss", {}).get("delta_rss")
                lines.append(
                    f"| {sv['name']} | {_s(sv['save_s'])} | {_x(sv.get('save_vs_torch'))} | "
                    f"{sv['file_bytes'] / 1e6:.0f} | {_mib(rss)} |"
                )
            lines.append("")
        lines += [
            "| loader | kind | **first load+touch (s)** | **vs torch.load** | vs torch mmap "
            "| first / its limit | cold first (s) | cold vs torch.load | repeated load+touch (s) "
            "| repeated vs torch.load | peak RSS added (MiB) | RSS / file |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for cname, c in w["candidates"].items():
            rss = (c.get("rss") or {}).get("delta_rss")
            ratio = f"{rss / c['file_bytes']:.2f}" if rss is not None and c["file_bytes"] else ""
            cold = _s(_first(c, "cold"))
            if (c.get("cold") or {}).get("note"):
                cold += f" ({c['cold']['note']})"
            lines.append(
                f"| {cname} | {c['kind']} | {_s(_first(c, 'first'))} | "
                f"{_x(c.get('first_vs_torch'))} | {_x(c.get('first_vs_torch_mmap'))} | "
                f"{_x(c.get('first_vs_limit'))} | {cold} | {_x(c.get('cold_vs_torch'))} | "
                f"{_s(c['load_touch_s'])} | {_x(c.get('load_touch_vs_torch'))} | {_mib(rss)} | "
                f"{ratio} |"
            )
        for cname, why in w.get("failed", {}).items():
            lines.append(f"\n- {cname}: n/a ({why})")
        lines += _limit_rows(w)
    return "\n".join(lines) + "\n"


def _limit_rows(w: dict[str, Any]) -> list[str]:
    lim = w.get("limits") or {}
    groups = (
        ("first work of a fresh process", w.get("first_limits") or {}),
        ("fresh process, file evicted", w.get("cold_limits") or {}),
        ("repeated in one process", {k: v for k, v in lim.items() if k != "bytes"}),
    )
    if not lim:
        return []
    nbytes = lim["bytes"]
    out = ["", f"Machine limits for {nbytes / 1e6:.0f} MB (the same file, the same run):", ""]
    out += ["| limit | measured as | seconds | GB/s |", "|---|---|---:|---:|"]
    for where, entries in groups:
        for k, v in entries.items():
            if v.get("s") is None:
                out.append(f"| {k} | {where} | n/a ({v.get('note', '')}) | |")
            else:
                out.append(f"| {k} | {where} | {v['s']:.3f} | {nbytes / v['s'] / 1e9:.2f} |")
    return out


def print_medians(times: dict[str, list[float]]) -> None:
    """Prints one line per candidate: median, min and max of its timings (seconds)."""
    width = max([9, *map(len, times)]) + 1
    print(f"{'candidate':{width}s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for name, v in times.items():
        print(f"{name:{width}s} {statistics.median(v):9.3f} {min(v):7.3f} {max(v):7.3f}")


def write_json(results: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")


def plot(results: dict[str, Any], path: str) -> None:
    """A PNG: per workload, horizontal bars of load+touch and save medians, with the
    machine's read/write limits as lines. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            "drawing the chart needs matplotlib: pip install matplotlib (or 'ckptio[bench]')"
        ) from None
    works = list(results["workloads"].items())
    fig, axes = plt.subplots(
        len(works), 2, figsize=(13, 1.0 + 0.42 * max(8, _rows(works)) * len(works)), squeeze=False
    )
    for row, (wname, w) in enumerate(works):
        ax = axes[row][0]
        names = list(w["candidates"])
        cands = w["candidates"]
        ys = range(len(names))
        first = [_first(cands[n], "first") or 0.0 for n in names]
        cold = [_first(cands[n], "cold") or 0.0 for n in names]
        repeated = [cands[n]["load_touch_s"] or 0.0 for n in names]
        colors = [_color(n, cands[n]["kind"]) for n in names]
        ax.barh([y - 0.27 for y in ys], first, height=0.27, color=colors, label="first load")
        ax.barh(ys, cold, height=0.27, color=colors, alpha=0.45, hatch="//", label="cold")
        ax.barh(
            [y + 0.27 for y in ys],
            repeated,
            height=0.27,
            color=colors,
            alpha=0.25,
            label="repeated in one process",
        )
        ax.set_yticks(list(ys), names)
        ax.invert_yaxis()
        ax.set_title(
            f"{wname}: load + touch (s, median, lower is better): first load of a fresh "
            "process, cold, repeated",
            fontsize=9,
        )
        fresh = w.get("first_limits") or {}
        for key, style in (("read fresh 4K", "--"), ("read fresh huge", ":")):
            v = fresh.get(key, {}).get("s")
            if v:
                ax.axvline(v, color="black", linestyle=style, linewidth=1, label=f"limit: {key}")
        v = (w.get("cold_limits") or {}).get("cold read", {}).get("s")
        if v:
            ax.axvline(v, color="grey", linestyle="-.", linewidth=1, label="limit: cold read")
        ax.legend(fontsize=7, loc="lower right")
        ax2 = axes[row][1]
        saves = w["saves"]
        lim = w.get("limits") or {}
        if saves:
            snames = [s["name"] for s in saves.values()]
            ax2.barh(
                snames,
                [s["save_s"] or 0.0 for s in saves.values()],
                color=[_color(n, "copy") for n in snames],
            )
            ax2.invert_yaxis()
            v = lim.get("write", {}).get("s")
            if v:
                ax2.axvline(v, color="black", linestyle="--", linewidth=1, label="limit: write")
                ax2.legend(fontsize=7, loc="lower right")
            ax2.set_title(f"{wname}: save (s, median)", fontsize=10)
        else:
            ax2.axis("off")
    meta = results["meta"]
    fig.suptitle(
        f"ckptio {meta['ckptio']} vs peers, torch {meta['torch']}, {meta['cpus']} CPUs, "
        f"{meta['rounds']} rounds",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rows(works: list) -> int:
    return max(len(w["candidates"]) for _, w in works) if works else 1


def _color(name: str, kind: str) -> str:
    if name.startswith("ckptio"):
        return "#d62728"
    if name.startswith("torch"):
        return "#1f77b4"
    return "#7f7f7f" if kind != "mmap" else "#aaaaaa"
