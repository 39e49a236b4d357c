"""The ``ckptstore`` command line: a thin argparse layer over the public API.

Exit codes: 0 ok, 1 a failed check or a ckptstore error (one line on stderr, no traceback),
2 a usage error (argparse's own convention).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

from .errors import CkptStoreError
from .manager import CheckpointManager


def _storage_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parse as JSON when they can (numbers, booleans, objects)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--storage-option takes key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _cmd_ls(args: argparse.Namespace) -> int:
    mgr = CheckpointManager(args.root, monitor=args.monitor, mode=args.mode, storage_options=_storage_options(args.storage_option))
    infos = mgr.checkpoints()
    latest, best = mgr.latest(), mgr.best()
    if args.json:
        rows = [{"name": i.name, "step": i.step, "metrics": i.metrics, "size": i.size, "format": i.format,
                 "created": i.created.isoformat(), "url": i.url,
                 "latest": i == latest, "best": i == best} for i in infos]
        print(json.dumps(rows, indent=1, default=str))
        return 0
    now = datetime.now(timezone.utc)
    print(f"{'name':<16} {'step':>8} {'size':>12} {'age':>8}  {'format':<12} metrics")
    for i in infos:
        marks = (" latest" if i == latest else "") + (" best" if i == best else "")
        age = f"{(now - i.created).total_seconds() / 60:.0f}m"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in i.metrics.items())
        print(f"{i.name:<16} {i.step:>8} {i.size:>12,} {age:>8}  {i.format:<12} {metrics}{marks}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    ok = demo.run(args.root, epochs=args.epochs, preempt_after=args.preempt_after,
                  storage_options=_storage_options(args.storage_option) or None, fresh=args.fresh)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckptstore", description="Save, list and restore PyTorch checkpoints on any fsspec store.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=f"example: {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="passed to fsspec (repeatable), e.g. client_kwargs='{\"endpoint_url\": \"http://...\"}'")
        return p

    ls = add("ls", "list the committed checkpoints under ROOT", "ckptstore ls s3://bucket/runs/exp1 --monitor val_loss")
    ls.add_argument("root")
    ls.add_argument("--monitor", help="metric that marks the best checkpoint")
    ls.add_argument("--mode", choices=["min", "max"], default="min")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_cmd_ls)

    demo = add("demo", "train, get preempted (SIGKILL), resume exactly", "ckptstore demo --root ./runs/demo --fresh")
    demo.add_argument("--root", default="./runs/demo")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--preempt-after", type=int, default=3, help="kill the trainer once this epoch is committed")
    demo.add_argument("--fresh", action="store_true", help="delete the root's checkpoints first")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ckptstore`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CkptStoreError as err:
        print(f"ckptstore: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
