"""Operations: the columns of the matrix. Each ``Operation`` says what the call needs and how to check it.

``build`` runs in the child before the baseline (the state for a save; a zero-filled model,
every page touched, for a load); ``moved`` is the byte count throughput is computed on;
``check`` runs after the timing (a save wrote about the state's bytes; each loaded tensor's sum
matches the source's). An operation with ``reads`` gets an input file written beforehand,
untimed; one without writes the cell's output, which the store syncs (local) and then removes.

A conversion (``convert-to-st``, ``convert-to-pt``) does both: every implementation reads the same
input file (``input``: the one stock torch or stock safetensors saved, not each its own) and
writes ``output`` next to it, in the same folder on the same store; the output is synced (local)
inside the timing, read back with the stock library for the check, then removed. The two
directions are two operations so that *× best peer* and *× limit* compare like with like.

Adding an operation is one entry here plus a function under that name in the ``ops`` of each
implementation that has it (``impls.py``); cells exist only where an implementation has it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from common.state import LAYERS, Shapes, build_model, build_state, nbytes, partial_keys, state_shapes
from suite.context import Ctx
from suite.impls import IMPLEMENTATIONS, input_of
from suite.stores import output_bytes

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Operation:
    label: str
    reads: bool  # needs an input file written beforehand (untimed); False: the call writes the cell's output
    build: Callable[[Ctx, Shapes], None]  # builds ctx.state / ctx.model before the baseline
    moved: Callable[[Shapes], int]  # bytes that throughput is counted on
    check: Callable[[Ctx, dict[str, Any]], tuple[bool, str]]  # (ok, note) from ctx and the state's meta
    input: str | None = None  # whose save writes the input of every cell (None: each implementation's own)
    output: str = ""  # a reading operation that also writes this file next to its input (convert)

    @property
    def writes(self) -> bool:
        """Whether the call writes to the store: a save, or a conversion."""
        return not self.reads or bool(self.output)


def tensor_sums(tensors: dict[str, Any]) -> dict[str, float]:
    import torch

    return {k: float(t.detach().sum(dtype=torch.float64)) for k, t in tensors.items()}


def _build_save(ctx: Ctx, shapes: Shapes) -> None:
    ctx.state = build_state(state_shapes(ctx.extra["size_bytes"], ctx.extra.get("layers", LAYERS)))


def _build_load(ctx: Ctx, shapes: Shapes) -> None:
    ctx.model, ctx.keys = build_model(shapes), list(shapes)


def _build_partial(ctx: Ctx, shapes: Shapes) -> None:
    keys = partial_keys(shapes)
    ctx.model, ctx.keys = build_model({k: shapes[k] for k in keys}), keys


def _check_saved(ctx: Ctx, meta: dict[str, Any]) -> tuple[bool, str]:
    if ctx.data is not None and not isinstance(ctx.data, bytes):  # memory copy
        return True, ""
    written = output_bytes(ctx)
    ctx.extra["output_bytes"] = written
    return written >= 0.99 * meta["state_bytes"], f"wrote {written / MiB:.1f} MiB"


def _check_loaded(ctx: Ctx, meta: dict[str, Any]) -> tuple[bool, str]:
    if ctx.model is None:  # limits: the transport's byte count (the memory copy has nothing to check)
        got = ctx.extra.get("got")
        if got is None:
            return True, ""
        ranges = ctx.extra.get("ranges")
        want = meta["file_bytes"] if ranges is None else sum(b - a for a, b in ranges)
        return got == want, f"{got} of {want} bytes"
    sums = tensor_sums(dict(ctx.model.state_dict()))
    bad = [k for k in ctx.keys if abs(sums[k] - meta["sums"][k]) > 1e-6 * max(1.0, abs(meta["sums"][k]))]
    return not bad, (f"{len(bad)} tensors differ, e.g. {bad[0]}" if bad else "")


def _sampled(names: list[str]) -> list[str]:
    """A few tensors to check: every 29th of the state's (11 of 291, the embedding first) and the last."""
    return list(dict.fromkeys([*names[::29], names[-1]]))


def _check_converted(ctx: Ctx, meta: dict[str, Any]) -> tuple[bool, str]:
    """The output read back with the stock library: every name there, sampled tensors' sums as the source's."""
    import safetensors.torch
    import torch

    src, dst = ctx.extra["src"], ctx.extra["dst"]
    ctx.fs.invalidate_cache()  # remote listings may predate the write
    if ctx.extra.get("got") is not None:  # the limit: what it read, it wrote back
        want, wrote = ctx.fs.size(src), ctx.fs.size(dst)
        return ctx.extra["got"] == want == wrote, f"read {ctx.extra['got']}, wrote {wrote} of {want} bytes"
    names = list(meta["sums"])
    keys = _sampled(names)
    if dst.endswith(".safetensors"):
        if ctx.local:  # stock safe_open reads only the sampled tensors
            from safetensors import safe_open

            with safe_open(dst, framework="pt") as f:
                got_names, sd = list(f.keys()), {k: f.get_tensor(k) for k in keys}
        else:  # safe_open needs a local path: the whole object
            full = safetensors.torch.load(ctx.fs.cat_file(dst))
            got_names, sd = list(full), {k: full[k] for k in keys}
    elif ctx.local:  # mmap: only the sampled tensors' pages are read
        full = torch.load(dst, weights_only=True, mmap=True)
        got_names, sd = list(full), {k: full[k] for k in keys}
    else:
        with ctx.fs.open(dst, "rb") as f:
            full = torch.load(f, weights_only=True)
        got_names, sd = list(full), {k: full[k] for k in keys}
    if sorted(got_names) != sorted(names):
        return False, f"{len(got_names)} tensors, {len(set(names) - set(got_names))} of the source's missing"
    sums, want = tensor_sums(sd), meta["sums"]
    bad = [k for k in keys if abs(sums[k] - want[k]) > 1e-6 * max(1.0, abs(want[k]))]
    return not bad, (f"{len(bad)} of {len(keys)} sampled tensors differ, e.g. {bad[0]}" if bad
                     else f"{len(keys)} of {len(names)} tensors sampled")


def _convert(label: str, src: str, dst: str, input: str) -> Operation:
    """A conversion of the file ``src`` (written by ``input``'s save) into ``dst``, in the same folder."""
    def build(ctx: Ctx, shapes: Shapes) -> None:
        ctx.extra.update(src=ctx.path(src), dst=ctx.path(dst))

    return Operation(label, True, build, moved=nbytes, check=_check_converted, input=input, output=dst)


OPERATIONS: dict[str, Operation] = {
    "save": Operation("Save", False, _build_save, moved=nbytes, check=_check_saved),
    "load": Operation("Full load into a pre-built model", True, _build_load, moved=nbytes, check=_check_loaded),
    "partial": Operation("10% partial load (blocks 0, 8, 16 of 24 + final norm)", True, _build_partial,
                         moved=lambda shapes: nbytes(shapes, partial_keys(shapes)), check=_check_loaded),
    "convert-to-st": _convert("Convert .pt → .safetensors on the same store (bytes moved: read + written)",
                              "model.pt", "converted.safetensors", input="torch"),
    "convert-to-pt": _convert("Convert .safetensors → .pt on the same store (bytes moved: read + written)",
                              "model.safetensors", "converted.pt", input="safetensors"),
}


def reads(op: str, impl: str) -> bool:
    """Whether the cell (op, impl) reads an input file."""
    return OPERATIONS[op].reads and IMPLEMENTATIONS[impl].reads_input


def input_for(op: str | None, impl: str) -> str:
    """The implementation whose save writes the file the cell (op, impl) reads: the operation's, else the row's."""
    return (OPERATIONS[op].input if op is not None else None) or input_of(impl)
