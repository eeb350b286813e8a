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


def markdown(results: dict[str, Any]) -> str:
    """One table of saves, one of loads and one of the machine's limits per workload."""
    meta = results["meta"]
    lines = [
        f"ckptio {meta['ckptio']}, torch {meta['torch']}, Python {meta['python']}, "
        f"{meta['cpus']} CPUs, {meta['ckptio_threads']} ckptio threads, ckptio huge pages "
        f"{_on(meta.get('ckptio_huge_pages'))}, recycling up to "
        f"{meta.get('ckptio_recycle_max_bytes', 0) / 2**30:g} GiB, THP "
        f"{meta['transparent_hugepage']}; medians of {meta['rounds']} rounds after a warm-up, "
        "candidates interleaved, page cache warm, every loader verified against the original.",
        "",
    ]
    for name, skipped in results.get("skipped", {}).items():
        lines.append(f"- skipped {name}: {skipped}")
    for wname, w in results["workloads"].items():
        mb = w["tensor_bytes"] / 1e6
        lines += ["", f"### {wname}: {w['description']} ({mb:.0f} MB of tensors)", ""]
        if w["saves"]:
            lines += [
                "| writer | save (s) | vs torch.save | file (MB) | save adds RSS (MiB) |",
                "|---|---:|---:|---:|---:|",
            ]
            for s in w["saves"].values():
                rss = s.get("rss", {}).get("delta_rss")
                lines.append(
                    f"| {s['name']} | {_s(s['save_s'])} | {_x(s.get('save_vs_torch'))} | "
                    f"{s['file_bytes'] / 1e6:.0f} | {_mib(rss)} |"
                )
            lines.append("")
        lines += [
            "| loader | kind | load (s) | load+touch (s) | vs torch.load | vs torch mmap "
            "| first load+touch of a process (s) | peak RSS added (MiB) | RSS / file |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for cname, c in w["candidates"].items():
            child = c.get("rss", {})
            rss = child.get("delta_rss")
            ratio = f"{rss / c['file_bytes']:.2f}" if rss is not None and c["file_bytes"] else ""
            lines.append(
                f"| {cname} | {c['kind']} | {_s(c['load_s'])} | {_s(c['load_touch_s'])} | "
                f"{_x(c.get('load_touch_vs_torch'))} | {_x(c.get('load_touch_vs_torch_mmap'))} | "
                f"{_s(child.get('seconds'))} | {_mib(rss)} | {ratio} |"
            )
        for cname, why in w.get("failed", {}).items():
            lines.append(f"\n- {cname}: n/a ({why})")
        lim = w.get("limits") or {}
        if lim:
            lines += ["", f"Machine limits for {lim['bytes'] / 1e6:.0f} MB:", ""]
            lines += ["| limit | seconds | GB/s |", "|---|---:|---:|"]
            for k, v in lim.items():
                if k == "bytes":
                    continue
                if v["s"] is None:
                    lines.append(f"| {k} | n/a ({v.get('note', '')}) | |")
                else:
                    lines.append(f"| {k} | {v['s']:.3f} | {lim['bytes'] / v['s'] / 1e9:.2f} |")
    return "\n".join(lines) + "\n"


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
        vals = [w["candidates"][n]["load_touch_s"] or 0.0 for n in names]
        colors = [_color(n, w["candidates"][n]["kind"]) for n in names]
        ax.barh(names, vals, color=colors)
        ax.invert_yaxis()
        ax.set_title(f"{wname}: load + touch (s, median, lower is better)", fontsize=10)
        lim = w.get("limits") or {}
        for key, style in (("read fresh huge", "--"), ("read prefaulted", ":")):
            v = lim.get(key, {}).get("s")
            if v:
                ax.axvline(v, color="black", linestyle=style, linewidth=1, label=f"limit: {key}")
        if lim:
            ax.legend(fontsize=7, loc="lower right")
        ax2 = axes[row][1]
        saves = w["saves"]
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
