"""Implementations: the rows. Each is ``{operation: function(ctx)}`` in the ``IMPLEMENTATIONS`` registry.

Stock peers (torch, safetensors, Lightning's save, DCP), ckptstore (both formats; ``restore`` and
in-place ``load_partial``) and the limits (``limits.py``). On a non-local store the peers go
through fsspec the way their users do: ``torch.save`` into ``fs.open(url, "wb")``, safetensors
through bytes and ``fs.pipe``/``fs.cat``. A cell exists where an implementation has the operation
and the store suits it; an implementation that reads gets its input file written, untimed, by the
save of ``input`` (default: its own; a conversion names the same input for every row). The
conversions (``stock-convert``, ``ckptstore-convert``) take their file URLs from ``ctx.extra``
(``src``, ``dst``: same folder, same store).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

from suite import limits
from suite.context import Ctx


@dataclasses.dataclass(frozen=True)
class Impl:
    label: str
    kind: str  # "peer" | "ckptstore" | "limit"
    ops: dict[str, Callable[[Ctx], Any]]
    input: str | None = None  # whose save writes the file this one reads (None: its own)
    pre: dict[str, Callable[[Ctx], None]] = dataclasses.field(default_factory=dict)  # untimed, before the call
    local_only: str = ""  # why it needs a local store ("": runs on every store)
    stores: tuple[str, ...] | None = None  # run on these stores only (None: all)
    reads_input: bool = True  # False: its load/partial need no file (the memory copy)
    any_store: bool = False  # one measurement shown under every store (memory copy)


# -- stock torch ------------------------------------------------------------------------
def torch_save(ctx: Ctx) -> None:
    import torch

    if ctx.local:
        torch.save(ctx.state, ctx.path("model.pt"))
    else:
        with ctx.fs.open(ctx.path("model.pt"), "wb") as f:
            torch.save(ctx.state, f)


def _torch_read(ctx: Ctx, mmap: bool = False) -> dict[str, Any]:
    import torch

    if ctx.local:
        return torch.load(ctx.path("model.pt"), weights_only=True, mmap=mmap)
    with ctx.fs.open(ctx.path("model.pt"), "rb") as f:
        return torch.load(f, weights_only=True)


def torch_load(ctx: Ctx, mmap: bool = False) -> None:
    ctx.model.load_state_dict(_torch_read(ctx, mmap))


def torch_partial(ctx: Ctx, mmap: bool = False) -> None:
    sd = _torch_read(ctx, mmap)
    ctx.model.load_state_dict({k: sd[k] for k in ctx.keys})


# -- stock safetensors ------------------------------------------------------------------
def st_save(ctx: Ctx) -> None:
    import safetensors.torch

    assert ctx.state is not None
    if ctx.local:
        safetensors.torch.save_file(ctx.state, ctx.path("model.safetensors"))
    else:
        ctx.fs.pipe_file(ctx.path("model.safetensors"), safetensors.torch.save(ctx.state))


def _st_read(ctx: Ctx) -> dict[str, Any]:
    import safetensors.torch

    if ctx.local:
        return safetensors.torch.load_file(ctx.path("model.safetensors"))
    return safetensors.torch.load(ctx.fs.cat_file(ctx.path("model.safetensors")))


def st_load(ctx: Ctx) -> None:
    ctx.model.load_state_dict(_st_read(ctx))


def st_partial(ctx: Ctx) -> None:
    if ctx.local:  # the stock partial API: safe_open (mmap) + get_tensor of the wanted keys
        from safetensors import safe_open

        with safe_open(ctx.path("model.safetensors"), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in ctx.keys}
    else:  # remote: safe_open needs a local path, so the whole object comes over
        full = _st_read(ctx)
        sd = {k: full[k] for k in ctx.keys}
        del full
    ctx.model.load_state_dict(sd)


# -- stock conversion (the state passes through memory whole) --------------------------------
def stock_to_st(ctx: Ctx) -> None:
    """``torch.load`` the .pt, ``safetensors.torch`` save it (remote: bytes written through ``fs.open``)."""
    import safetensors.torch
    import torch

    src, dst = ctx.extra["src"], ctx.extra["dst"]
    if ctx.local:
        safetensors.torch.save_file(torch.load(src, weights_only=True, mmap=False), dst)
        return
    with ctx.fs.open(src, "rb") as f:
        sd = torch.load(f, weights_only=True)
    with ctx.fs.open(dst, "wb") as f:
        f.write(safetensors.torch.save(sd))


def stock_to_pt(ctx: Ctx) -> None:
    """``safetensors.torch`` load the file (remote: ``fs.cat`` + ``load``), ``torch.save`` it (remote: into ``fs.open``)."""
    import safetensors.torch
    import torch

    src, dst = ctx.extra["src"], ctx.extra["dst"]
    if ctx.local:
        torch.save(safetensors.torch.load_file(src), dst)
        return
    sd = safetensors.torch.load(ctx.fs.cat_file(src))
    with ctx.fs.open(dst, "wb") as f:
        torch.save(sd, f)


# -- Lightning ----------------------------------------------------------------------------
def lightning_save(ctx: Ctx) -> None:
    """lightning.fabric.utilities.cloud_io._atomic_save (Lightning 2.x): serialize to BytesIO, then write."""
    import fsspec
    import torch

    buf = io.BytesIO()
    torch.save(ctx.state, buf)
    with fsspec.open(ctx.path("model.pt"), "wb", **ctx.storage_options) as f:
        f.write(buf.getvalue())


# -- torch.distributed.checkpoint ---------------------------------------------------------
def _dcp_io(ctx: Ctx, write: bool) -> Any:
    from torch.distributed import checkpoint as dcp

    where = ctx.path("dcp")
    if ctx.local:
        return dcp.FileSystemWriter(where) if write else dcp.FileSystemReader(where)
    try:
        from torch.distributed.checkpoint import FsspecReader, FsspecWriter  # type: ignore[attr-defined]
    except ImportError:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    return FsspecWriter(where, **ctx.storage_options) if write else FsspecReader(where, **ctx.storage_options)


def dcp_save(ctx: Ctx) -> None:
    from torch.distributed import checkpoint as dcp

    dcp.save(ctx.state, storage_writer=_dcp_io(ctx, write=True))


def dcp_load(ctx: Ctx) -> None:  # the same call for full and partial: DCP loads what the state_dict asks for
    from torch.distributed import checkpoint as dcp

    dcp.load(ctx.model.state_dict(), storage_reader=_dcp_io(ctx, write=False))


# -- ckptstore ---------------------------------------------------------------------------
def ck_save(fmt: str) -> Callable[[Ctx], None]:
    def save(ctx: Ctx) -> None:
        from ckptstore import CheckpointManager

        CheckpointManager(ctx.path("ck"), format=fmt, storage_options=ctx.so).save({"model": ctx.state}, step=0)

    return save


def ck_restore(fmt: str) -> Callable[[Ctx], None]:
    def restore(ctx: Ctx) -> None:
        from ckptstore import CheckpointManager

        CheckpointManager(ctx.path("ck"), format=fmt, storage_options=ctx.so).restore({"model": ctx.model})

    return restore


def ck_find(ctx: Ctx) -> None:
    """Untimed: the committed checkpoint folder's URL (what a caller of load_partial already knows)."""
    from ckptstore import CheckpointManager

    latest = CheckpointManager(ctx.path("ck"), storage_options=ctx.so).latest()
    assert latest is not None, f"no checkpoint under {ctx.path('ck')}"
    ctx.extra["ck_url"] = latest.url


def ck_load_partial(ctx: Ctx) -> None:
    from ckptstore import load_partial

    ctx.extra["report"] = load_partial(ctx.extra["ck_url"], ctx.model, storage_options=ctx.so)


def ck_convert(ctx: Ctx) -> None:
    from ckptstore.convert import convert

    convert(ctx.extra["src"], ctx.extra["dst"], storage_options=ctx.so)


IMPLEMENTATIONS: dict[str, Impl] = {
    "torch": Impl("`torch.save` / `torch.load` (other stores: through `fs.open`)", "peer",
                  {"save": torch_save, "load": torch_load, "partial": torch_partial}),
    "torch-mmap": Impl("`torch.load(mmap=True)`", "peer",
                       {"load": lambda c: torch_load(c, mmap=True), "partial": lambda c: torch_partial(c, mmap=True)},
                       input="torch", local_only="mmap needs a local file"),
    "safetensors": Impl("`safetensors.torch` `save_file`/`load_file`, local `safe_open` (other stores: bytes "
                        "+ `fs.pipe`/`fs.cat`)", "peer", {"save": st_save, "load": st_load, "partial": st_partial}),
    "lightning": Impl("Lightning `_atomic_save`: `torch.save` to BytesIO, then `fsspec.open(url, 'wb').write`", "peer",
                      {"save": lightning_save}),
    "dcp": Impl("`torch.distributed.checkpoint` (FileSystemWriter / FsspecWriter), one process", "peer",
                {"save": dcp_save, "load": dcp_load, "partial": dcp_load}),
    "ckptstore-torch": Impl("ckptstore `CheckpointManager(format='torch')` `.save` / `.restore`; partial: `load_partial`",
                            "ckptstore", {"save": ck_save("torch"), "load": ck_restore("torch"), "partial": ck_load_partial},
                            pre={"partial": ck_find}),
    "ckptstore-safetensors": Impl("ckptstore `CheckpointManager(format='safetensors')` `.save` / `.restore`; partial: "
                                  "`load_partial`", "ckptstore",
                                  {"save": ck_save("safetensors"), "load": ck_restore("safetensors"),
                                   "partial": ck_load_partial}, pre={"partial": ck_find}),
    "ckptstore-torch-inplace": Impl("ckptstore `load_partial(checkpoint, model)` (torch format, in place)", "ckptstore",
                                    {"load": ck_load_partial}, input="ckptstore-torch", pre={"load": ck_find}),
    "ckptstore-safetensors-inplace": Impl("ckptstore `load_partial(checkpoint, model)` (safetensors format, in place)",
                                          "ckptstore", {"load": ck_load_partial}, input="ckptstore-safetensors",
                                          pre={"load": ck_find}),
    "stock-convert": Impl("stock conversion: `.pt` → `.safetensors` = `torch.load(weights_only=True)` (local: "
                          "the path, `mmap=False`; other stores: `fs.open(url, 'rb')`) + `safetensors.torch.save_file` "
                          "(other stores: `save` written through `fs.open(url, 'wb')`); `.safetensors` → `.pt` = "
                          "`load_file` (other stores: `load(fs.cat(url))`) + `torch.save` (other stores: into "
                          "`fs.open(url, 'wb')`)", "peer", {"convert-to-st": stock_to_st, "convert-to-pt": stock_to_pt}),
    "ckptstore-convert": Impl("ckptstore `convert(src, dst)`: streamed, 8 MiB ranged reads", "ckptstore",
                              {"convert-to-st": ck_convert, "convert-to-pt": ck_convert}),
    "limit-transport": Impl("limit: raw transport of the same bytes (local: 64 MiB writes + fsync / `readinto` a "
                            "resident buffer / `preadv` of the needed runs; other stores: `fs.pipe` / `fs.cat` / "
                            "`fs.cat_ranges` of the needed bytes; convert: the source file read, then written back, "
                            "the same calls)", "limit",
                            {"save": limits.raw_save, "load": limits.raw_load, "partial": limits.raw_partial,
                             "convert-to-st": limits.raw_convert, "convert-to-pt": limits.raw_convert},
                            input="safetensors", pre={"save": limits.raw_prepare_save, "load": limits.raw_prepare_load,
                                                      "partial": limits.raw_prepare_partial,
                                                      "convert-to-st": limits.raw_prepare_convert,
                                                      "convert-to-pt": limits.raw_prepare_convert}),
    "limit-memcpy": Impl("limit: memory copy of the same bytes (`dst.copy_(src)`)", "limit",
                         {"save": limits.memcpy, "load": limits.memcpy, "partial": limits.memcpy},
                         pre={"save": limits.memcpy_prepare, "load": limits.memcpy_prepare,
                              "partial": limits.memcpy_prepare},
                         stores=("local",), any_store=True, reads_input=False),
}


def input_of(impl: str) -> str:
    """The implementation whose save writes the file ``impl`` reads."""
    return IMPLEMENTATIONS[impl].input or impl
