"""From runs to rows: median and min–max per cell, and the ratios to the best peer and to the limits.

*× best peer* = wall / the fastest stock peer's median wall (same store, size, operation).
*× limit* = wall / the larger of the two limits (each is a lower bound): the raw transport on the
same store and the memory copy (measured once, it joins every store). *× limit (bytes)* compares
the bytes a server counted with the raw transport's.
"""

from __future__ import annotations

import statistics
from typing import Any

from suite.impls import IMPLEMENTATIONS
from suite.operations import OPERATIONS
from suite.stores import STORES

MiB = 2**20


def writes(op: str) -> bool:
    """Whether the operation's bytes go to the store (a save) rather than come from it."""
    return op in OPERATIONS and not OPERATIONS[op].reads


def server_moved(row: dict[str, Any]) -> float | None:
    """Bytes the server counted in the operation's direction: request bodies for saves, response bodies for loads,
    both for a conversion."""
    if row["op"] in OPERATIONS and OPERATIONS[row["op"]].output and "bytes_in" in row:
        return row["bytes_in"] + row["bytes_out"]
    return row.get("bytes_in") if writes(row["op"]) else row.get("bytes_out")


def _index(registry: dict[str, Any], key: str) -> int:
    return list(registry).index(key) if key in registry else 99


def _cell_row(op: str, store: str, impl: str, size: float, rs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rs if r.get("status") == "ok"]
    row: dict[str, Any] = {"op": op, "store": store, "impl": impl, "size_mib": size, "n": len(ok)}
    if not ok:
        row["not_run"] = "not run: " + rs[0].get("reason", "?")
        return row

    def med(key: str) -> float:
        return statistics.median(r[key] for r in ok)

    wall = [r["wall_s"] for r in ok]
    peak = [r["peak_extra"] for r in ok]
    row.update(
        state_bytes=ok[0]["state_bytes"], moved_bytes=ok[0]["moved_bytes"], wall=med("wall_s"), wall_min=min(wall),
        wall_max=max(wall), cpu=med("cpu_s"), peak=med("peak_extra"), peak_min=min(peak), peak_max=max(peak),
        anon=med("anon_extra"), retained=med("retained"), ok=all(r["ok"] for r in ok),
        notes=sorted({r["note"] for r in ok if not r["ok"]}), disk_read=med("disk_read"), disk_write=med("disk_write"),
    )
    row["mib_s"] = row["moved_bytes"] / MiB / row["wall"] if row["wall"] > 0 else None
    if "server" in ok[0]:
        row["requests"] = statistics.median(r["server"]["requests"] for r in ok)
        row["bytes_in"] = statistics.median(r["server"]["bytes_in"] for r in ok)
        row["bytes_out"] = statistics.median(r["server"]["bytes_out"] for r in ok)
        row["by_method"] = ok[0]["server"]["by_method"]
    if "report" in ok[0]:
        row["report"] = ok[0]["report"]
    return row


def _add_ratios(r: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    same = [p for p in rows if p["op"] == r["op"] and p["size_mib"] == r["size_mib"] and "wall" in p]
    peers = [p for p in same if p["store"] == r["store"] and p["impl"] in IMPLEMENTATIONS
             and IMPLEMENTATIONS[p["impl"]].kind == "peer"]
    limit = next((p for p in same if p["store"] == r["store"] and p["impl"] == "limit-transport"), None)
    copy = next((p for p in same if p["impl"] == "limit-memcpy"), None)
    best = min(peers, key=lambda p: p["wall"]) if peers else None
    r["x_best_peer"] = r["wall"] / best["wall"] if best else None
    r["best_peer"] = best["impl"] if best else None
    bound = max([p["wall"] for p in (limit, copy) if p is not None], default=None)  # each is a lower bound
    r["limit_s"] = bound
    r["x_limit"] = r["wall"] / bound if bound else None
    moved = server_moved(r)
    lim_moved = server_moved(limit) if limit else None
    r["x_limit_bytes"] = moved / lim_moved if moved is not None and lim_moved else None


def aggregate(runs: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (op, store, impl, size), sorted by size, operation, store, implementation, with ratios."""
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["op"], r["store"], r["impl"], r["size_mib"]), []).append(r)
    rows = [_cell_row(*key, rs) for key, rs in groups.items()]
    rows += [{**s, "n": 0, "not_run": s["reason"]} for s in skipped]
    rows.sort(key=lambda r: (r["size_mib"], _index(OPERATIONS, r["op"]), _index(STORES, r["store"]),
                             _index(IMPLEMENTATIONS, r["impl"])))
    for r in rows:
        if "wall" in r:
            _add_ratios(r, rows)
    return rows
