"""The ``## Suite: formats x stores`` section of RESULTS.md: how it was measured, one table per
(operation, size), and ckptstore against the best peer. Every label and store description comes
from the registries, so a new store or operation needs nothing here.
"""

from __future__ import annotations

from typing import Any

from suite.aggregate import server_moved
from suite.impls import IMPLEMENTATIONS
from suite.operations import OPERATIONS
from suite.stores import STORES

MiB = 2**20
SECTION = "## Suite: formats x stores"


def fmt_mib(b: float | None, digits: int = 1) -> str:
    return "–" if b is None else f"{b / MiB:.{digits}f}"


def fmt_x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def store_rows(rows: list[dict[str, Any]], op: str, size: float, store: str) -> list[dict[str, Any]]:
    """The rows of one store, plus those measured once for every store (the memory copy)."""
    out = [r for r in rows if r["op"] == op and r["size_mib"] == size and r["store"] == store]
    copy = [r for r in rows if r["op"] == op and r["size_mib"] == size and r["impl"] in IMPLEMENTATIONS
            and IMPLEMENTATIONS[r["impl"]].any_store and r["store"] != store]
    return out + copy


def _moved_cell(r: dict[str, Any], op: str, store: str) -> str:
    """Bytes moved: counted on the server where there is one, by /proc/self/io on local disk."""
    if r["impl"] == "limit-memcpy":
        return "–"
    if r["store"] == store and "requests" in r:
        moved = server_moved(r)
        return fmt_mib(moved) + (f" ({r['x_limit_bytes']:.2f})" if r.get("x_limit_bytes") else "")
    if store in STORES and STORES[store].local:
        if op in OPERATIONS and OPERATIONS[op].output:  # a conversion: read + written
            return fmt_mib(r["disk_read"] + r["disk_write"])
        return fmt_mib(r["disk_write"] if op in OPERATIONS and not OPERATIONS[op].reads else r["disk_read"])
    return "–"


def table(rows: list[dict[str, Any]], op: str, size: float, stores: list[str]) -> str:
    partial = op == "partial"
    head = ("| Store | Implementation | Wall s, median (min–max) | MiB/s" + (" (of the 10%)" if partial else "")
            + " | × best peer | × limit | Peak extra RSS MiB, median (min–max) | % of state | anon MiB | CPU s "
            "| Bytes moved MiB (× limit) | Requests | OK |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|\n")
    lines = []
    for store in stores:
        for r in store_rows(rows, op, size, store):
            impl = IMPLEMENTATIONS.get(r["impl"])
            label = f"**`{r['impl']}`**" if impl and impl.kind == "ckptstore" else f"`{r['impl']}`"
            if "not_run" in r:
                lines.append(f"| {STORES[store].label} | {label} | {r['not_run']} | | | | | | | | | | |")
                continue
            reqs = f"{r['requests']:g}" if "requests" in r and r["store"] == store else "–"
            n_note = "" if r["n"] >= 3 or r["n"] == 0 else f" (n={r['n']})"
            lines.append(
                f"| {STORES[store].label} | {label}{n_note} | {r['wall']:.2f} ({r['wall_min']:.2f}–{r['wall_max']:.2f}) | "
                f"{r['mib_s']:.0f} | {fmt_x(r['x_best_peer'] if r['store'] == store else None)} | "
                f"{fmt_x(r['x_limit'] if r['store'] == store else None)} | "
                f"{fmt_mib(r['peak'])} ({fmt_mib(r['peak_min'])}–{fmt_mib(r['peak_max'])}) | "
                f"{100 * r['peak'] / r['state_bytes']:.0f}% | {fmt_mib(r['anon'])} | {r['cpu']:.2f} | "
                f"{_moved_cell(r, op, store)} | {reqs} | {'yes' if r['ok'] else '**no** ' + '; '.join(r['notes'])} |"
            )
    return head + "\n".join(lines) + "\n"


def summary_table(rows: list[dict[str, Any]], sizes: list[float], stores_by_size: dict[float, list[str]]) -> str:
    lines = ["| Operation | Store | Size MiB | Best ckptstore | Wall × best peer | Peak MiB: ckptstore / best peer by time | "
             "× limit (time) | × limit (bytes) |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for size in sizes:
        for op in OPERATIONS:
            for store in stores_by_size.get(size, []):
                rs = [r for r in rows if r["op"] == op and r["size_mib"] == size and r["store"] == store and "wall" in r]
                ck = [r for r in rs if IMPLEMENTATIONS[r["impl"]].kind == "ckptstore"]
                if not ck:
                    continue
                best = min(ck, key=lambda r: r["wall"])
                peer = next((r for r in rs if r["impl"] == best.get("best_peer")), None)
                lines.append(
                    f"| {op} | {STORES[store].label} | {size:g} | {best['impl']} | {fmt_x(best['x_best_peer'])}"
                    + (f" (vs {peer['impl']})" if peer else "") + " | "
                    f"{fmt_mib(best['peak'])} / {fmt_mib(peer['peak']) if peer else '–'} | {fmt_x(best['x_limit'])} | "
                    f"{fmt_x(best.get('x_limit_bytes'))} |")
    return "\n".join(lines) + "\n"


def _invocation_lines(data: dict[str, Any]) -> list[str]:
    out = []
    for i in data["invocations"]:
        mine = [r for r in data["runs"] if r.get("inv") == i.get("id")]
        cover = "; ".join(f"{STORES[st].label} " + ", ".join(f"{z:g}" for z in sorted({r["size_mib"] for r in mine
                                                                                       if r["store"] == st})) + " MiB"
                          for st in STORES if any(r["store"] == st for r in mine))
        changed = i.get("ckptstore_changed_during_run")
        out.append(f"Command: `{i['command']}` — {i['date']}, wall {i['wall_s'] / 60:.1f} min; load average (1 min) "
                   f"at start / end {i['loadavg_start'][0]:.2f} / {i['loadavg_end'][0]:.2f}; ckptstore at "
                   f"{i.get('ckptstore') or i['machine'].get('ckptstore')}"
                   + (f" (changed to {changed} during the run; measured: the start state, which the fork server imported)"
                      if changed else "") + (f"; rows: {cover}" if cover else "") + ".  ")
    return out


def _machine_line(inv: dict[str, Any]) -> str:
    m = inv["machine"]
    clients = "".join(f", {mod} {m[mod]}" for mod in ("gcsfs", "gcp_storage_emulator") if mod in m)
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}; Python {m['python']}, "
            f"torch {m['torch']} ({inv['threads']} threads), safetensors {m['safetensors']}, fsspec {m['fsspec']}, "
            f"s3fs {m.get('s3fs')}, aiobotocore {m.get('aiobotocore')}, moto {m.get('moto')}{clients}, "
            f"matplotlib {m.get('matplotlib')}.")


HOW = (
    "What each row is: every measurement runs in a fresh child process, interleaved (round 1: every cell once, then "
    "round 2, ...); the child first runs the same code path on a tiny state (imports, S3 client, fsspec instances are "
    "not charged), then builds what the operation needs (the state for a save; a zero-filled model, every page "
    "touched, for a load) and times the call. *Peak extra RSS* = kernel `VmHWM` (reset via `/proc/self/clear_refs`) "
    "minus the RSS just before the call; *anon* = the sampled `RssAnon` rise (file-backed mmap pages count in RSS, not "
    "in anon). State: GPT-like float32 (embedding + 24 blocks + final norm, 291 tensors). *MiB/s* = state bytes "
    "(partial: the selected 10.6%) / wall. *× best peer* = wall / the fastest stock peer's median wall (same store, "
    "size, operation); *× limit* = wall / the larger of two lower bounds measured in the same run: the raw "
    "transport of the same bytes (local: 64 MiB writes + fsync, or a cold `readinto` a resident buffer, partial: "
    "`preadv` of the runs of selected tensors; other stores: `fs.pipe` / `fs.cat`, partial: `fs.cat_ranges` of "
    "exactly the selected byte ranges) and a memory copy of them (on memory://, `fs.pipe` keeps "
    "a reference to the bytes, so the copy is the bound there). *Bytes moved (× limit)*: bytes counted on the server "
    "(S3, GCS) over the raw transport's. The memory-copy row is one measurement shown under every store."
)
PEERS = (
    "Peers' remote paths: stock torch writes `torch.save(sd, fs.open(url, 'wb'))` and reads "
    "`torch.load(fs.open(url, 'rb'))` (this is also how Lightning loads); stock safetensors goes through bytes "
    "(`save` + `fs.pipe`, `fs.cat` + `load`); the stock partial is a full load + filter except locally, where "
    "`safe_open`/`get_tensor` and `torch.load(mmap=True)` read only what they touch. DCP loads only the keys the "
    "target's state_dict has. ckptstore's *load* rows: `restore` is the manager API (reads the checkpoint, then "
    "`load_state_dict`), *in place* is `load_partial(checkpoint, model)` with every key. *Convert* rows turn the "
    "file stock torch (`.pt`) or stock safetensors wrote into the other format, next to it on the same store "
    "(a local output is fsynced inside the timing); the stock way loads the whole state and saves it, ckptstore "
    "streams; bytes moved count the read and the written bytes, and the check reads the output back with the stock "
    "library (every name; every 29th tensor's sum)."
)


def render_section(data: dict[str, Any], name: str = "suite", title: str = SECTION) -> str:
    rows = data["summary"]
    sizes = sorted({r["size_mib"] for r in rows})
    stores_by_size = {s: [st for st in STORES if any(r["store"] == st and r["size_mib"] == s for r in rows)] for s in sizes}
    inv = data["invocations"]
    out = [title, "", *_invocation_lines(data), _machine_line(inv[-1]), ""]
    notes = list(dict.fromkeys(i["note"] for i in inv if i.get("note")))
    if notes:
        out += ["**The machine was shared.** " + " ".join(notes) + " Wall times carry that noise (CPU seconds less so); "
                "memory and byte counts do not."
                + (" (The `--note` texts on the command lines were written before the runs; these sentences replace them "
                   "with what process checks during the runs saw.)"
                   if any(i.get("note") != (i.get("args") or {}).get("note") for i in inv) else ""), ""]
    present = [st for st in STORES if any(r["store"] == st for r in rows)]
    out += [
        HOW, "",
        "Stores: " + " ".join(STORES[st].about for st in present), "",
        PEERS, "",
        "Implementations (rows; ckptstore in bold):", "",
        *[f"- `{name}`: {impl.label}" for name, impl in IMPLEMENTATIONS.items() if any(r["impl"] == name for r in rows)],
        "",
        f"![throughput](charts/{name}_throughput.png)", "",
        f"![peak memory](charts/{name}_memory.png)", "",
    ]
    for size in sizes:
        for op, operation in OPERATIONS.items():
            if any(r["op"] == op and r["size_mib"] == size for r in rows):
                sb = next((r["state_bytes"] for r in rows if r["size_mib"] == size and "state_bytes" in r), 0)
                out += [f"### {operation.label}, {size:g} MiB state ({fmt_mib(sb)} MiB)", "",
                        table(rows, op, size, stores_by_size[size])]
    out += ["### ckptstore against the best stock peer", "",
            "Per cell, the fastest ckptstore implementation; × < 1 is faster than the best peer.", "",
            summary_table(rows, sizes, stores_by_size)]
    slow = sorted({s for i in inv for s in i.get("slow", [])})
    if slow:
        out += ["Measured once (the first measurement took longer than `--slow-s`): " + ", ".join(f"`{s}`" for s in slow)
                + ".", ""]
    for st in present:
        reqs = [r for r in rows if r["store"] == st and r.get("by_method") and not (r["op"] in OPERATIONS
                                                                                  and not OPERATIONS[r["op"]].reads)]
        if reqs:
            out += [f"{st.upper()} requests by method (first measurement): "
                    + "; ".join(f"{r['op']} {r['impl']} {r['size_mib']:g} MiB: "
                                + ", ".join(f"{k} × {v}" for k, v in sorted(r["by_method"].items())) for r in reqs) + ".", ""]
    return "\n".join(out).rstrip("\n") + "\n"
