"""The ``ckptstore`` command line: a thin argparse layer over the public API.

Exit codes: 0 ok, 1 a failed check or a ckptstore error (one line on stderr, no traceback),
2 a usage error (argparse's own convention).
"""

from __future__ import annotations

import argparse
import json
import time
import os
import posixpath
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import __version__, files
from .convert import convert
from .errors import CkptStoreError, ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from .manager import CheckpointManager
from .partial import describe, resolve
from .serializers import TREE_METADATA_KEY


def _storage_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (checked by :func:`_key_value`); values parse as JSON when they can."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _key_value(pair: str) -> str:
    """An argparse type: ``key=value`` (a usage error, exit 2, otherwise)."""
    if "=" not in pair:
        raise argparse.ArgumentTypeError(f"takes key=value, got {pair!r}")
    return pair


def _cmd_ls(args: argparse.Namespace) -> int:
    mgr = CheckpointManager(args.root, monitor=args.monitor, mode=args.mode or "min",
                            storage_options=_storage_options(args.storage_option))
    found = mgr.listing()  # one listing for the whole command
    if found.empty:
        raise CkptStoreError(f"nothing under {mgr.root}: no such folder or prefix (or an empty one); check the URL")
    infos, latest, best = found.checkpoints, found.latest, found.best
    leftovers = found.uncommitted if args.all else {}
    if args.json:
        rows: list[dict[str, Any]] = [
            {"name": i.name, "step": i.step, "metrics": i.metrics, "size": i.size, "format": i.format,
             "created": i.created.isoformat(), "url": i.url, "latest": i == latest, "best": i == best, "committed": True}
            for i in infos
        ]
        rows += [{"name": name, "committed": False, "problem": why} for name, why in leftovers.items()]
        print(json.dumps(rows, indent=1, default=str))
        return 0
    now = datetime.now(timezone.utc)
    table = [("name", "step", "size", "age", "format", "metrics", "")]
    for i in infos:
        marks = " ".join(m for m, on in (("latest", i == latest), ("best", i == best)) if on)
        metrics = " ".join(f"{k}={v:.4g}" for k, v in i.metrics.items())
        table.append((i.name, str(i.step), _human_bytes(i.size), _human_age((now - i.created).total_seconds()),
                      i.format, metrics, marks))
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    right = {1, 2, 3}
    for row in table:
        print("  ".join(cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))).rstrip())
    for name, why in leftovers.items():
        print(_dim(f"{name}  (not a checkpoint: {why})"))
    if not infos and not leftovers:
        print(f"no committed checkpoints under {args.root}")
    return 0


def _human_bytes(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _human_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h" if seconds < 172800 else f"{seconds / 86400:.0f}d"


def _dim(text: str) -> str:
    """Grey on a terminal (unless NO_COLOR is set), plain otherwise."""
    return f"\x1b[2m{text}\x1b[0m" if sys.stdout.isatty() and not os.environ.get("NO_COLOR") else text


def _cmd_inspect(args: argparse.Namespace) -> int:
    desc = describe(args.url, _storage_options(args.storage_option), weights_only=not args.trust_pickle)
    if args.json:
        print(json.dumps(desc, indent=1, default=str))
        return 0
    if "checkpoint" in desc:
        c = desc["checkpoint"]
        print(f"checkpoint {c['name']}: step {c['step']}, {c['format']}, {_human_bytes(c['size'])}, metrics {c['metrics']}")
    print(f"{desc['url']} ({desc['header_bytes_read']:,} header bytes read)")
    print(f"{'name':<48} {'dtype':<14} {'shape':<20} {'bytes':>14}")
    for t in desc["tensors"]:
        layout = f" ({t['layout']}: parts read whole)" if "layout" in t else ""
        print(f"{t['name']:<48} {t['dtype']:<14} {t['shape']!s:<20} {t['bytes']:>14,}{layout}")
    print(f"{len(desc['tensors'])} tensors, {_human_bytes(sum(t['bytes'] for t in desc['tensors']))}")
    values = desc["values"]
    state = values.pop(TREE_METADATA_KEY, None) if isinstance(values, dict) else None
    if values:
        print("values:" if state is None else "metadata:")
        _print_tree(values, "  ")
    if state is not None:
        print("state:")
        _print_tree(state, "  ")
    return 0


TENSOR_PLACEHOLDER = re.compile(r"^<tensor .*>$")


def _print_tree(value: Any, indent: str) -> None:
    """Nested values as an indented outline; long runs of tensors or numbers are summarised."""
    items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
    for key, child in items:
        if isinstance(child, (dict, list, tuple)) and child:
            leaves = list(child.values()) if isinstance(child, dict) else list(child)
            if len(leaves) > 8 and all(isinstance(v, str) and TENSOR_PLACEHOLDER.match(v) for v in leaves):
                print(f"{indent}{key}: {len(leaves)} tensors")
            elif not isinstance(child, dict) and not any(isinstance(v, (dict, list, tuple, str)) for v in leaves):
                shown = ", ".join(map(str, leaves if len(leaves) <= 8 else leaves[:3]))
                print(f"{indent}{key}: [{shown}]" if len(leaves) <= 8 else f"{indent}{key}: [{shown}, ... {len(leaves)} values]")
            else:
                print(f"{indent}{key}:")
                _print_tree(child, indent + "  ")
        else:
            print(f"{indent}{key}: {child}")


def _cmd_verify(args: argparse.Namespace) -> int:
    options = _storage_options(args.storage_option)
    try:
        mgr = CheckpointManager(args.url, storage_options=options)
        infos = mgr.checkpoints()
        with _progress("verify", sum(i.size for i in infos)) as progress:
            results = mgr.verify(progress, checkpoints=infos)
    except ConfigError:  # the URL is a checkpoint folder or a file, not a root
        results = {}
    if not results:  # not a checkpoint root: one checkpoint folder, or a single file
        parent, name = posixpath.split(args.url.rstrip("/"))
        results = {k: v for k, v in CheckpointManager(parent or ".", storage_options=options).verify().items() if k == name}
    if not results:
        try:
            files.verify(args.url, storage_options=options)
            results = {args.url: None}
        except CorruptCheckpointError as err:
            results = {args.url: str(err)}
    if args.json:
        print(json.dumps([{"name": k, "ok": v is None, "problem": v} for k, v in results.items()], indent=1))
    else:
        for name, problem in results.items():
            print(f"{'OK     ' if problem is None else 'CORRUPT'} {name}{'' if problem is None else ': ' + problem}")
    return 1 if any(v is not None for v in results.values()) else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    options = _storage_options(args.storage_option)
    storage, name, info = resolve(args.src, options)
    total = info.size if info is not None else storage.size(name)  # out ~ in, headers aside
    with _progress(f"convert {posixpath.basename(args.dst)}", total) as progress:
        written = convert(args.src, args.dst, storage_options=options, progress=progress, weights_only=not args.trust_pickle)
    print(f"{args.src} -> {args.dst} ({written:,} bytes)")
    return 0


MIB = 2**20


@contextmanager
def _progress(desc: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar on stderr in MiB (2**20 bytes), with the total, percentage, rate and time left; shown
    only on a terminal, and only once it has run a second (``CKPTSTORE_PROGRESS_DELAY`` seconds)."""
    delay = float(os.environ.get("CKPTSTORE_PROGRESS_DELAY", "1"))
    layout = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MiB [{elapsed}<{remaining}, {rate_fmt}]"
    with tqdm(total=total / MIB, desc=desc, unit="MiB", bar_format=layout, delay=delay,
              disable=None, leave=False, dynamic_ncols=True) as bar:
        yield lambda n: bar.update(n / MIB)


def _cmd_prune(args: argparse.Namespace) -> int:
    mgr = CheckpointManager(args.root, keep_last=args.keep_last, keep_best=args.keep_best, monitor=args.monitor,
                            mode=args.mode or "min", abandoned_after=args.abandoned_after,
                            storage_options=_storage_options(args.storage_option))
    uploads = mgr.incomplete_uploads()
    doomed = mgr.prune(dry_run=not args.yes)
    left = {u.upload_id for u in mgr.incomplete_uploads()} if args.yes and uploads else set()
    if args.json:
        rows = [{"name": i.name, "step": i.step, "size": i.size} for i in doomed]
        parts = [{"path": u.path, "parts": u.parts, "idle_s": round(time.time() - u.mtime), "aborted": u.upload_id not in left
                  and args.yes} for u in uploads]
        print(json.dumps({"deleted": args.yes, "checkpoints": rows, "incomplete_uploads": parts}, indent=1))
        return 0
    verb = "deleted" if args.yes else "would delete"
    for info in doomed:
        print(f"{verb} {info.name} (step {info.step}, {info.size:,} bytes)")
    for u in uploads:
        idle = f"incomplete upload of {u.path} ({u.parts} parts, idle {time.time() - u.mtime:,.0f} s)"
        if args.yes and u.upload_id not in left:
            print(f"aborted {idle}")
        else:
            print(f"{idle}: aborted once idle for --abandoned-after ({args.abandoned_after:g} s, watched by one run)"
                  + ("" if args.yes else " with --yes"))
    if not args.yes and doomed:
        print("dry run: pass --yes to delete")
    if not doomed:  # say so: an exit with no output reads as "done" whatever the policy was
        print(f"nothing to delete: the policy keeps every checkpoint under {mgr.root}"
              + ("" if args.keep_last else " (no --keep-last: all are kept)"))
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    mgr = CheckpointManager(args.root, storage_options=_storage_options(args.storage_option))
    which: int | str = int(args.which) if args.which.isdigit() else args.which
    info = mgr.delete(which)
    print(f"deleted {mgr.storage.url(info.name) if info else args.which}" + ("" if info else " (it had an unreadable manifest)"))
    return 0


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BENCH_SCRIPTS = {"suite": "bench_suite.py", "save-memory": "bench_save_memory.py", "load": "bench_load.py",
                 "history": "bench_history.py"}


def _cmd_bench(args: argparse.Namespace) -> int:
    script = BENCHMARKS / BENCH_SCRIPTS[args.which]
    if not script.exists():
        raise CkptStoreError(f"{script} not found: `ckptstore bench` runs the benchmarks of a source checkout (git clone)")
    return subprocess.call([sys.executable, str(script), *args.args])


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    ok = demo.run(args.root, epochs=args.epochs, preempt_after=args.preempt_after,
                  storage_options=_storage_options(args.storage_option) or None, fresh=args.fresh)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptstore", description="Save, list and restore PyTorch checkpoints on any fsspec store.")
    parser.add_argument("--version", action="version", version=f"ckptstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, example: str, *, json_output: bool = False, store: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=f"example: {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if store:  # only commands that reach a store take its options: any other would ignore them
            p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                           help="passed to fsspec (repeatable), e.g. client_kwargs='{\"endpoint_url\": \"http://...\"}'")
        if json_output:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    ls = add("ls", "list the committed checkpoints under ROOT", "ckptstore ls s3://bucket/runs/exp1 --monitor val_loss", json_output=True)
    ls.add_argument("root")
    ls.add_argument("--monitor", help="metric that marks the best checkpoint (default: the one the newest checkpoint "
                    "was saved with)")
    ls.add_argument("--mode", choices=["min", "max"], help="with --monitor: which end is best (default: min)")
    ls.add_argument("--all", action="store_true", help="also list what is not a checkpoint: unfinished saves, unreadable manifests")
    ls.set_defaults(func=_cmd_ls)

    inspect = add("inspect", "show a file's or checkpoint's tensors and values from its header only",
                  "ckptstore inspect s3://bucket/runs/exp1/step_00000010", json_output=True)
    inspect.add_argument("url")
    _trust_option(inspect)
    inspect.set_defaults(func=_cmd_inspect)

    verify = add("verify", "check every checksum under a root, a checkpoint or a file; exit 1 on damage",
                 "ckptstore verify s3://bucket/runs/exp1", json_output=True)
    verify.add_argument("url")
    verify.set_defaults(func=_cmd_verify)

    conv = add("convert", "convert a file or checkpoint between torch (.pt) and safetensors, between any stores, "
               "streaming (memory: a few MiB, whatever the size)", "ckptstore convert s3://bucket/model.pt ./model.safetensors")
    conv.add_argument("src", help="a .pt or .safetensors file, or a checkpoint folder (its checksum is checked)")
    conv.add_argument("dst", help="the format follows the extension: .safetensors, else torch")
    _trust_option(conv)
    conv.set_defaults(func=_cmd_convert)

    prune = add("prune", "apply a retention policy; shows what it would delete unless --yes",
                "ckptstore prune ./runs/exp1 --keep-last 3 --keep-best 1 --monitor val_loss --yes", json_output=True)
    prune.add_argument("root")
    prune.add_argument("--keep-last", type=int, default=None)
    prune.add_argument("--keep-best", type=int, default=0)
    prune.add_argument("--monitor")
    prune.add_argument("--mode", choices=["min", "max"], help="with --monitor: which end is best (default: min)")
    prune.add_argument("--abandoned-after", type=float, default=600.0, metavar="SECONDS",
                       help="remove unfinished saves idle this long by the store's clock and by this run's own, which "
                            "first sees them now: only 0 removes them in one run (a save still running elsewhere then "
                            "fails loudly instead of committing)")
    prune.add_argument("--yes", action="store_true", help="really delete")
    prune.set_defaults(func=_cmd_prune)

    delete = add("delete", "delete one checkpoint (by step or name), also one whose manifest is unreadable",
                 "ckptstore delete ./runs/exp1 step_00000005")
    delete.add_argument("root")
    delete.add_argument("which", help="a step number or a checkpoint name")
    delete.set_defaults(func=_cmd_delete)

    bench = add("bench", "run a benchmark of the source checkout; extra arguments go to the script",
                "ckptstore bench suite --quick   (or: save-memory, load, history; see benchmarks/README.md)", store=False)
    bench.add_argument("which", choices=sorted(BENCH_SCRIPTS), nargs="?", default="suite")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark script")
    bench.set_defaults(func=_cmd_bench)

    demo = add("demo", "train, get preempted (SIGKILL), resume exactly", "ckptstore demo --root ./runs/demo --fresh")
    demo.add_argument("--root", default="./runs/demo")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--preempt-after", type=int, default=3, help="kill the trainer once this epoch is committed")
    demo.add_argument("--fresh", action="store_true", help="delete the root's checkpoints first")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _trust_option(command: argparse.ArgumentParser) -> None:
    """``--trust-pickle``: the command's form of ``weights_only=False``."""
    command.add_argument("--trust-pickle", action="store_true",
                         help="unpickle any object the file names (runs its code: only for files you trust)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ckptstore`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "mode", None) and not args.monitor:  # ls, prune: a mode alone would be ignored
        parser.error(f"{args.command}: --mode needs --monitor")
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `ckptstore inspect ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CkptStoreError as err:
        message = str(err)
        if isinstance(err, UnsafeCheckpointError) and hasattr(args, "trust_pickle"):  # in this command's terms
            message = message.replace("pass weights_only=False", f"run ckptstore {args.command} --trust-pickle")
        print(f"ckptstore: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
