"""Two PNGs: throughput and peak extra memory, one panel per (size, operation), bars per store and
implementation (median, whiskers min–max; ckptstore outlined)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from suite.impls import IMPLEMENTATIONS
from suite.operations import OPERATIONS
from suite.stores import STORES

MiB = 2**20
CHARTS = (("mib_s", "MiB/s (log)", "throughput"), ("peak", "peak extra RSS, MiB", "memory"))  # <name>_<kind>.png


def _bar(r: dict[str, Any], what: str) -> tuple[float, float, float]:
    """(value, distance down to the min, distance up to the max) of one row."""
    if what == "mib_s":
        y = r["mib_s"]
        return y, y - r["moved_bytes"] / MiB / r["wall_max"], r["moved_bytes"] / MiB / r["wall_min"] - y
    y = r["peak"] / MiB
    return y, y - r["peak_min"] / MiB, r["peak_max"] / MiB - y


def _panel(ax: Any, rows: list[dict[str, Any]], impls: list[str], colors: dict[str, Any], what: str, ylabel: str,
           op: str, size: float) -> None:
    stores = [s for s in STORES if any(r["store"] == s and r["size_mib"] == size and r["op"] == op for r in rows)]
    present = [i for i in impls if any(r["impl"] == i and r["size_mib"] == size and r["op"] == op for r in rows)]
    width = 0.85 / max(1, len(present))
    for ii, impl in enumerate(present):
        xs, ys, lo, hi = [], [], [], []
        for xi, store in enumerate(stores):
            r = next((r for r in rows if r["impl"] == impl and r["op"] == op and r["size_mib"] == size
                      and (r["store"] == store or IMPLEMENTATIONS[impl].any_store)), None)
            if r is None:
                continue
            y, down, up = _bar(r, what)
            xs.append(xi - 0.425 + width * (ii + 0.5))
            ys.append(y)
            lo.append(down)
            hi.append(up)
        ax.bar(xs, ys, width, yerr=[lo, hi], color=colors[impl], label=impl, capsize=1.5,
               edgecolor="black" if IMPLEMENTATIONS[impl].kind == "ckptstore" else "none", linewidth=0.8)
    ax.set_xticks(range(len(stores)))
    ax.set_xticklabels([STORES[s].label for s in stores])
    if what == "mib_s":
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{op}, {size:g} MiB" + (" (MiB/s of the 10%)" if op == "partial" and what == "mib_s" else ""))
    ax.grid(axis="y", alpha=0.3)


def charts(data: dict[str, Any], out_dir: Path, copy_to: Path | None, name: str = "suite") -> list[Path]:
    """Write ``<name>_throughput.png`` and ``<name>_memory.png`` to ``out_dir`` (and copy them to
    ``copy_to``); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["summary"] if "wall" in r]
    sizes = sorted({r["size_mib"] for r in rows})
    ops = [o for o in OPERATIONS if any(r["op"] == o for r in rows)]
    impls = [i for i in IMPLEMENTATIONS if any(r["impl"] == i for r in rows)]
    cmap = plt.get_cmap("tab20")
    colors = {i: cmap(n % 20) for n, i in enumerate(impls)}
    written = []
    for what, ylabel, kind in CHARTS:
        fname = f"{name}_{kind}.png"
        fig, axes = plt.subplots(len(sizes), len(ops), figsize=(6.5 * len(ops), 4.2 * len(sizes)), squeeze=False)
        for si, size in enumerate(sizes):
            for oi, op in enumerate(ops):
                _panel(axes[si][oi], rows, impls, colors, what, ylabel, op, size)
        handles: dict[str, Any] = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(6, len(handles)), fontsize=8,
                   frameon=False)
        fig.suptitle(("Throughput" if what == "mib_s" else "Peak extra memory")
                     + " per format and store (median, whiskers min–max; ckptstore outlined)")
        fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) // 6), 1, 0.96))
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        if copy_to is not None:
            copy_to.mkdir(exist_ok=True)
            shutil.copyfile(path, copy_to / fname)
    return written
