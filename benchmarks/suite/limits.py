"""The limits: lower bounds for a row, measured in the same run on the same bytes.

``limit-transport`` moves the bytes of the state's safetensors file and nothing else. Local
disk: 64 MiB ``write`` calls (+ the store's fsync), a cold ``readinto`` of a resident buffer, and
one ``preadv`` per run of adjacent selected tensors. Other stores: ``fs.pipe`` / ``fs.cat`` /
``fs.cat_ranges`` of exactly the selected byte ranges. For a conversion it reads the source file
and writes its bytes to the destination unchanged (a read, then a write, as above).
``limit-memcpy`` is ``dst.copy_(src)`` of as many bytes: no store moves them faster. The
``*_prepare`` functions are the untimed ``pre`` steps of the implementation entries in ``impls.py``.
"""

from __future__ import annotations

import json
import os

from suite.context import Ctx

MiB = 2**20
CHUNK = 64 * MiB  # local limits move the bytes in 64 MiB calls: one 1 GiB write() costs several times more CPU


def raw_prepare_save(ctx: Ctx) -> None:
    """The bytes of the safetensors file of this state: the same bytes, laid out once."""
    import safetensors.torch

    assert ctx.state is not None
    ctx.data = safetensors.torch.save(ctx.state)
    ctx.state = None


def _write(path: str, data: bytes | memoryview) -> None:
    view = memoryview(data)
    with open(path, "wb", buffering=0) as f:
        for i in range(0, len(view), CHUNK):
            f.write(view[i : i + CHUNK])


def raw_save(ctx: Ctx) -> None:
    if ctx.local:  # + the store's fsync: a disk write with fsync
        _write(ctx.path("model.safetensors"), ctx.data)
    else:
        ctx.fs.pipe_file(ctx.path("model.safetensors"), ctx.data)


def _resident(n: int) -> memoryview:
    import torch

    buf = torch.empty(n, dtype=torch.uint8)
    buf.zero_()  # every page faulted in before the call, like a pre-built model
    return memoryview(buf.numpy().data)


def raw_prepare_load(ctx: Ctx) -> None:
    ctx.model = None  # the transport fills no model
    if ctx.local:
        ctx.data = _resident(os.path.getsize(ctx.path("model.safetensors")))


def _read_into(path: str, view: memoryview) -> int:
    got = 0
    with open(path, "rb", buffering=0) as f:
        while got < len(view):
            n = f.readinto(view[got : got + CHUNK])
            if not n:
                break
            got += n
    return got


def raw_load(ctx: Ctx) -> None:
    if ctx.local:  # a sequential read into a resident buffer
        ctx.extra["got"] = _read_into(ctx.path("model.safetensors"), ctx.data)
    else:
        ctx.extra["got"] = len(ctx.fs.cat_file(ctx.path("model.safetensors")))


def raw_prepare_convert(ctx: Ctx) -> None:
    if ctx.local:
        ctx.data = _resident(os.path.getsize(ctx.extra["src"]))


def raw_convert(ctx: Ctx) -> None:
    """The conversion's bytes and nothing else: the source file read, then written to the destination."""
    src, dst = ctx.extra["src"], ctx.extra["dst"]
    if ctx.local:  # a cold read into a resident buffer, 64 MiB writes (+ the store's fsync)
        got = _read_into(src, ctx.data)
        _write(dst, ctx.data[:got])
    else:
        data = ctx.fs.cat_file(src)
        ctx.fs.pipe_file(dst, data)
        got = len(data)
    ctx.extra["got"] = got


def raw_prepare_partial(ctx: Ctx) -> None:
    """Byte ranges of the selected tensors in the safetensors file (adjacent ones merged), from its header."""
    p = ctx.path("model.safetensors")
    n = int.from_bytes(ctx.fs.cat_file(p, start=0, end=8), "little")
    header = json.loads(ctx.fs.cat_file(p, start=8, end=8 + n))
    base = 8 + n
    want = set(ctx.keys)
    spans = sorted((base + v["data_offsets"][0], base + v["data_offsets"][1], k in want)
                   for k, v in header.items() if k != "__metadata__")
    runs: list[list[int]] = []
    prev_selected = False
    for start, end, sel in spans:
        if sel:
            if prev_selected and runs and runs[-1][1] == start:
                runs[-1][1] = end
            else:
                runs.append([start, end])
        prev_selected = sel
    ctx.extra["ranges"] = runs
    ctx.model = None
    if ctx.local:
        ctx.data = _resident(sum(b - a for a, b in runs))


def raw_partial(ctx: Ctx) -> None:
    runs = ctx.extra["ranges"]
    p = ctx.path("model.safetensors")
    if ctx.local:  # one pread per run of adjacent selected tensors, into a resident buffer
        view, at, got = ctx.data, 0, 0
        fd = os.open(p, os.O_RDONLY)
        try:
            for a, b in runs:
                for off in range(a, b, CHUNK):
                    n = min(CHUNK, b - off)
                    got += os.preadv(fd, [view[at : at + n]], off)
                    at += n
        finally:
            os.close(fd)
        ctx.extra["got"] = got
        return
    got_parts = ctx.fs.cat_ranges([p] * len(runs), [a for a, _ in runs], [b for _, b in runs])
    ctx.extra["got"] = sum(len(g) for g in got_parts)


def memcpy_prepare(ctx: Ctx) -> None:
    import torch

    n = ctx.extra["moved_bytes"]
    src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    src.fill_(1)
    dst.zero_()
    ctx.data, ctx.state, ctx.model = (src, dst), None, None


def memcpy(ctx: Ctx) -> None:
    src, dst = ctx.data
    dst.copy_(src)
