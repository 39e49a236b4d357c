"""Command line of ``benchmarks/bench_suite.py``: arguments, the JSON file, ``--append``, ``--from-json``.

The choices of ``--stores``, ``--ops`` and ``--impls`` come from the registries, and every store
with its own size axis (``Store.sizes_help``) gets a ``--<store>-size-mib`` flag, so a new entry
needs no change here.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

from common.provenance import ckptstore_diff, ckptstore_revision, command_line, machine_info, utc_now
from common.results_md import replace_section
from suite.aggregate import aggregate
from suite.charts import charts
from suite.impls import IMPLEMENTATIONS
from suite.measure import child_main
from suite.operations import OPERATIONS
from suite.report import SECTION, render_section
from suite.runner import zygote_main
from suite.schedule import log, measure_all
from suite.stores import STORES

HERE = Path(__file__).resolve().parents[1]
VERSIONS = ("s3fs", "moto", "botocore", "aiobotocore", "aiohttp", "matplotlib", "gcsfs", "gcp_storage_emulator")


def build_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes-mib", type=float, nargs="+", default=[100],
                    help="state sizes for the stores without a --<store>-size-mib flag (local disk, memory://)")
    for name, store in STORES.items():
        if store.sizes_help:
            ap.add_argument(f"--{name}-size-mib", type=float, nargs="+", default=[100], help=store.sizes_help)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median and min–max over them)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round")
    ap.add_argument("--stores", nargs="+", default=[s for s, st in STORES.items() if st.default], choices=list(STORES))
    ap.add_argument("--ops", nargs="+", default=list(OPERATIONS), choices=list(OPERATIONS))
    ap.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    ap.add_argument("--slow-s", type=float, default=60.0,
                    help="a cell whose first child takes longer than this is measured once only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's)")
    ap.add_argument("--warm-cache", action="store_true", help="local reads from the page cache (default: cold)")
    ap.add_argument("--no-warmup", action="store_true", help="charge one-time costs to the measured call")
    ap.add_argument("--sample-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    ap.add_argument("--workdir", default=None, help="local-disk folder (default: a temp dir under benchmarks/out)")
    ap.add_argument("--out", default=str(HERE / "out" / "suite.json"))
    ap.add_argument("--append", action="store_true",
                    help="add this invocation to --out (cells measured again replace the old ones) and report both")
    ap.add_argument("--note", default="", help="a sentence for RESULTS.md, e.g. what else ran on the machine")
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--name", default="suite",
                    help="another name gets its own RESULTS.md section ('## Suite: <--title>') and charts <name>_*.png, "
                    "beside the main matrix's")
    ap.add_argument("--title", default=SECTION.removeprefix("## Suite: "), help="the section's title, with --name")
    ap.add_argument("--no-results-md", action="store_true", help="leave RESULTS.md and benchmarks/charts/ alone")
    ap.add_argument("--no-charts", action="store_true")
    ap.add_argument("--from-json", default=None, metavar="PATH", help="measure nothing: re-render from a saved JSON")
    ap.add_argument("--spawn", action="store_true",
                    help="a fresh interpreter per measurement instead of a fork of a pre-imported server (slower)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--zygote", default=None, help=argparse.SUPPRESS)  # comma-separated modules to preload
    return ap


def write_outputs(data: dict[str, Any], args: argparse.Namespace) -> None:
    """Charts next to ``--out``, the section on stdout and, unless ``--no-results-md``, in RESULTS.md and charts/."""
    out_dir = Path(args.out).parent
    if not args.no_charts:
        for p in charts(data, out_dir, None if args.no_results_md else HERE / "charts", args.name):
            log(f"wrote {p}")
    title = SECTION if args.name == "suite" else f"## Suite: {args.title}"
    section = render_section(data, args.name, title)
    print(section)
    if not args.no_results_md:
        replace_section(Path(args.results_md), title, section)
        log(f"updated {args.results_md} ({title}); charts copied to {HERE / 'charts'}")


def _cell(r: dict[str, Any]) -> tuple[str, str, str, float]:
    return r["op"], r["store"], r["impl"], r["size_mib"]


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``--append``: the new invocation's cells replace the old ones; invocations left without rows are dropped."""
    measured = {_cell(r) for r in new["runs"] + new["skipped"]}
    keep = [r for r in old["runs"] if _cell(r) not in measured]
    keep_sk = [r for r in old["skipped"] if _cell(r) not in measured]
    alive = {r.get("inv") for r in keep + keep_sk}
    old_invs = [i for i in old["invocations"] if "id" not in i or i["id"] in alive]
    return {"invocations": [*old_invs, *new["invocations"]], "runs": keep + new["runs"],
            "skipped": keep_sk + new["skipped"]}


def main(argv: list[str] | None = None, description: str = "") -> int:
    args = build_parser(description).parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return 0
    if args.zygote is not None:
        zygote_main([m for m in args.zygote.split(",") if m])
        return 0
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        saved["summary"] = aggregate(saved["runs"], saved["skipped"])
        write_outputs(saved, args)
        return 0
    if args.quick:
        args.repeats = 1
    order = list(IMPLEMENTATIONS)
    args.impls = sorted(set(args.impls), key=order.index)
    args.ops = [o for o in OPERATIONS if o in args.ops]
    args.stores = [s for s in STORES if s in args.stores]
    rev_start = ckptstore_revision()  # the fork server imports ckptstore once, at the start
    diff_start = ckptstore_diff()
    res = measure_all(args)
    rev_end = ckptstore_revision()
    import torch

    inv = {"command": command_line(), "date": utc_now(), "machine": machine_info(VERSIONS),
           "args": {k: v for k, v in vars(args).items() if k not in ("child", "zygote")},
           "wall_s": res["wall_s"], "loadavg_start": res["loadavg_start"], "loadavg_end": res["loadavg_end"],
           "slow": res["slow"], "note": args.note, "threads": args.threads or torch.get_num_threads(),
           "ckptstore": rev_start, "ckptstore_changed_during_run": rev_end if rev_end != rev_start else None,
           "ckptstore_uncommitted_diff": diff_start, "id": uuid.uuid4().hex[:8]}
    for r in res["runs"] + res["skipped"]:
        r["inv"] = inv["id"]
    data: dict[str, Any] = {"invocations": [inv], "runs": res["runs"], "skipped": res["skipped"]}
    out = Path(args.out)
    if args.append and out.exists():
        data = merge(json.loads(out.read_text()), data)
    data["summary"] = aggregate(data["runs"], data["skipped"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    log(f"wrote {out}")
    write_outputs(data, args)
    return 0
