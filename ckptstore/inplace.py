"""Restoring in place: put a checkpoint into the caller's live modules, optimizers and tensors.

Mirrors ``torch.distributed.checkpoint``: the caller passes the state it wants filled.
Stateful entries get ``load_state_dict``; tensors (also inside nested dicts and lists) are
filled with ``copy_`` so pre-allocated memory, and every reference to it, sees the restored
values. Everything else cannot be updated in place (ints, strings, ...) and is handed back.

:func:`restore_checkpoint` streams instead of reading the whole file into new tensors and
copying them (which holds the state twice in RAM):

1. **Plan** the data file from its header (:func:`ckptstore.partial.plan`) and build the
   saved tree with a marker in place of each tensor.
2. **Check and pair** (:func:`_walk`), before any tensor byte is read: raise
   :class:`StateMismatchError` wherever torch would refuse the saved tree, and pair each
   marker with the live tensor it restores: plain tensors, a module's
   ``state_dict(keep_vars=True)`` (its parameters and buffers themselves), an optimizer's
   ``state_dict()["state"]``. Only these two ``state_dict`` implementations are known to
   alias live memory without side effects; other Stateful objects are not asked.
3. **Land** each saved tensor's bytes straight in its live partner when they fit as they
   are: same shape and dtype, contiguous on both sides, and no other saved tensor restores
   into overlapping memory (then the order of ``load_state_dict``'s copies would decide the
   result). Every other saved tensor is read into a new tensor and placed by
   ``map_location``. Live tensors keep their device, as ``copy_`` keeps it.
4. **Apply** the saved tree, now holding those live tensors themselves: ``load_state_dict``
   runs as before (a ``copy_`` of a tensor onto itself is a no-op).

All or nothing: a restore that fails changes nothing, although ``load_state_dict`` itself is
not atomic (a module copies the keys that fit, then raises for the others). Two means, by cost:

* **Checked up front, at no memory cost:** whatever torch's own code loads: plain tensors,
  modules that load key for key (:func:`ckptstore.fit.loads_key_for_key`), optimizers without overrides
  or hooks. Step 2 checks what torch checks (strict key sets, shapes, a tensor for each key,
  parameter group count and sizes), and torch zip member headers are checked while the new
  tensors are read, so nothing that can fail on a checked file is left once bytes land.
* **Undone, at the cost of what is at risk:** every other Stateful runs code no check can
  predict (schedulers, :class:`RNGState`, a user's object, a module with load hooks). They
  are loaded first, before any byte lands, each after a snapshot of its ``state_dict()``; if
  anything fails, each gets its snapshot back by ``load_state_dict`` (the round trip every
  Stateful supports), and its own error is raised as StateMismatchError naming the entry.
  A snapshot costs that object's state (a module's size for a hooked module); an undo of the
  landed tensors would cost a second model, which is why those are checked instead. Such
  objects see the model still holding its old values while they load; saved tensors they
  share with it are read into new memory for them.

Integrity. No live byte changes before the checksum passes. The data file is opened once, and
that descriptor serves the checksum pass and every tensor read: a file deleted (pruned by
another process) once it is open and planned still restores whole, one deleted earlier raises
:class:`CorruptCheckpointError` (so "latest" falls back). Local files get their CRC32C pass
first (landing then reads the page cache). Remote files are downloaded once to a local
temporary file, checksummed on the way, and restored from there; an object deleted during the
download is unusable likewise. (Checking remote bytes while they streamed into the live
tensors let a "latest" fallback leave bad bytes in the tensors the older checkpoint lacks.)

Modules whose loading is not torch's key-for-key copy (load or state_dict hooks, extra state,
``_load_from_state_dict`` defined outside ``torch.nn``, an overridden ``state_dict`` or
``load_state_dict``) get their tensors as new ones: a hook may route saved tensor X into
parameter Y, which bytes landed early by key would corrupt. Where the header cannot be planned
(a torch ``data.pkl`` beyond the planner's restricted unpickler) or a callable ``map_location``
must see torch's own storages, the whole file is read and :func:`restore_into` copies it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import torch
from torch.nn.parameter import is_lazy

from . import commit
from .errors import CorruptCheckpointError, StateMismatchError, UnsafeCheckpointError, UnsupportedValueError
from .fit import Marker, check_entries, check_module, check_optimizer, check_tensor, loads_as_torch, loads_key_for_key
from .manifest import CheckpointInfo
from .partial import DEFAULT_MAX_BUFFER, LoadReport, Plan, plan
from .serializers import CHUNK_BYTES, ChecksumReader, MapLocation, Source, check_crc, get_format, place, read_checked
from .storage import FsspecStorage, open_storage
from .transfer import SourceTensor, Transfer, byte_view, landable, scratch, shaped
from .tree import decanonicalize, is_stateful, leaves

log = logging.getLogger("ckptstore")


def restore_into(target: dict[str, Any] | None, loaded: dict[str, Any]) -> dict[str, Any]:
    """Fill ``target`` from ``loaded`` in place, all or nothing; return the values that were not consumed.

    Returned: every saved entry except Stateful objects restored in place (plain values
    such as ``epoch``, nested containers with their tensors restored, and saved entries that
    ``target`` did not ask for).

    Raises:
        StateMismatchError: a saved value does not fit its live counterpart, or a Stateful's
            ``load_state_dict`` raised; nothing in ``target`` changed (see the module doc).

    Example:
        >>> w = torch.zeros(2)
        >>> restore_into({"w": w, "epoch": 0}, {"w": torch.ones(2), "epoch": 4})
        {'epoch': 4}
        >>> w
        tensor([1., 1.])
    """
    steps = _Steps()
    values = _walk_entries(target, loaded, steps)
    _apply(steps, lambda: None)
    return values


def restore_checkpoint(
    storage: FsspecStorage, info: CheckpointInfo, target: dict[str, Any] | None, *,
    map_location: MapLocation = None, weights_only: bool = True, verify: bool = True,
    max_buffer: int = DEFAULT_MAX_BUFFER, strict: bool = True,
) -> tuple[dict[str, Any], LoadReport]:
    """Restore checkpoint ``info`` into ``target``, streaming tensor bytes into live tensors.

    ``strict``: an entry of ``target`` that the checkpoint lacks is a StateMismatchError
    (before anything changes); with ``strict=False`` it is left as it is, with a warning.

    Returns what :func:`restore_into` returns, and a report: ``loaded`` lists the saved keys
    that landed in live memory; ``missing`` the entries of ``target`` the checkpoint lacks;
    ``bytes_read``/``requests`` count the reads of the data file (0 where it was read whole, see
    the module doc). On any error nothing in ``target`` changed.

    Raises:
        CorruptCheckpointError: the data file is missing, resized, damaged, fails its CRC32C,
            or was deleted before the restore could open and plan it.
        StateMismatchError: a saved value does not fit the live one, a Stateful refused it,
            or (``strict``) the checkpoint lacks an entry of ``target``.
    """
    path, entry = commit.data_file(storage, info)
    crc = entry.crc32c if verify else None
    local = storage.local_path(path)
    if local is not None:
        with _vanishing(storage.url(path)):
            f = open(local, "rb")  # noqa: SIM115 - the one descriptor of this restore, closed below
        with f:
            return _restore(storage, path, f, crc, info, target, map_location, weights_only, max_buffer, strict,
                            storage.url(path))
    with tempfile.TemporaryDirectory(prefix="ckptstore-restore-") as folder:  # remote: a checked local copy first
        name = posixpath.basename(path)
        with open(os.path.join(folder, name), "w+b") as copy_file:
            with _vanishing(storage.url(path)):
                read_checked(Source(storage, path, entry.size), crc, copy_to=copy_file)
            copy_file.flush()
            return _restore(open_storage(folder), name, copy_file, None, info, target, map_location, weights_only, max_buffer,
                            strict, storage.url(path))


def _restore(
    data: FsspecStorage, path: str, f: IO[bytes], crc: int | None, info: CheckpointInfo,
    target: dict[str, Any] | None, map_location: MapLocation, weights_only: bool, max_buffer: int, strict: bool,
    where: str,
) -> tuple[dict[str, Any], LoadReport]:
    """Restore from ``data``'s local file ``path``, open as ``f``; its CRC32C is checked through
    ``f`` unless ``crc`` is None (already checked). ``where``: the file's URL for messages (a
    remote checkpoint is restored from a local copy, whose name means nothing to the user)."""
    size = info.files[0].size
    report = LoadReport()
    with _vanishing(where):
        try:
            planned: Plan | None = plan(data, path, report, size, weights_only=True)  # planned before any check
        except (CorruptCheckpointError, UnsafeCheckpointError, UnsupportedValueError) as err:
            log.info("%s cannot be planned from its header (%s); reading it whole", info.url, err)
            planned = None
        if planned is not None and planned.rebuilt:  # torch's own loader builds them where they belong
            log.info("%s holds sparse or quantized tensors (%s); reading it whole", info.url, ", ".join(planned.rebuilt))
            planned = None
        _same_file(f, where)  # the header planned is the descriptor's
    _check_open_file(f, size, crc, where)
    if planned is None or (info.format == "torch" and callable(map_location)):
        with _vanishing(where):
            loaded = get_format(info.format).read(Source(data, path, size), map_location, weights_only, None)
            _same_file(f, where)
        saved = _checked_dict(loaded, info)
        missing = check_entries(target, saved, strict, info)
        return restore_into(target, saved), LoadReport(missing=missing)

    sources = planned.sources
    needed: dict[str, None] = {}  # saved keys the tree refers to, in order

    def mark(key: str, _device: str) -> Marker:
        if key not in sources:
            raise CorruptCheckpointError(f"{info.url}: the state refers to tensor {key!r}, which the file lacks")
        needed[key] = None
        return Marker(key, sources[key].shape)

    checks = _Steps()
    saved = _checked_dict(planned.build(mark), info)
    report.missing = check_entries(target, saved, strict, info)
    _walk_entries(target, saved, checks)  # raises before any byte is read
    shared = {m.key for _, saved, _ in checks.opaque for m in leaves(saved, Marker)}  # loaded before the bytes land
    direct = _destinations([p for p in checks.pairs if p.key not in shared], sources)
    fresh = {k: scratch(sources[k]) for k in needed if k not in direct}
    transfer = Transfer(data, path, max_buffer, report, fd=f.fileno(), where=where)
    transfer.run([(sources[k], t.view(torch.uint8)) for k, t in fresh.items()], check=[sources[k] for k in needed])
    placed: dict[str, torch.Tensor] = {}

    def load(key: str, device: str) -> torch.Tensor:
        if key in direct:
            return direct[key]
        if key not in placed:
            placed[key] = place(shaped(sources[key], fresh[key]), device, map_location)
        return placed[key]

    steps = _Steps()
    values = _walk_entries(target, planned.build(load), steps)
    _apply(steps, lambda: transfer.run([(sources[k], byte_view(t)) for k, t in direct.items()], check=()))
    report.loaded = sorted(direct)
    return values, report


@contextlib.contextmanager
def _vanishing(where: str) -> Iterator[None]:
    """A data file deleted under a restore (a concurrent prune) makes the checkpoint unusable."""
    try:
        yield
    except FileNotFoundError as err:  # CheckpointNotFound too
        raise CorruptCheckpointError(
            f"{where} vanished while it was being restored (deleted by a concurrent prune?); nothing was changed"
        ) from err


def _same_file(f: IO[bytes], where: str) -> None:
    """Raise unless ``f``'s path still names the file open as ``f`` (FileNotFoundError: deleted)."""
    now, opened = os.stat(f.name), os.fstat(f.fileno())
    if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
        raise CorruptCheckpointError(f"{where} was replaced while it was being restored; nothing was changed")


def _check_open_file(f: IO[bytes], size: int, crc: int | None, where: str) -> None:
    """Check the open file's size and, unless ``crc`` is None, its CRC32C (one read of it)."""
    actual = os.fstat(f.fileno()).st_size
    if actual != size:
        raise CorruptCheckpointError(f"{where} is {actual} bytes, the manifest says {size} (truncated or replaced)")
    if crc is None:
        return
    f.seek(0)
    stream = ChecksumReader(f, where)
    buffer = memoryview(bytearray(max(1, min(CHUNK_BYTES, size))))
    for start in range(0, size, len(buffer)):
        stream.readinto(buffer[: min(len(buffer), size - start)])
    check_crc(stream.crc, crc, where)


def _checked_dict(tree: Any, info: CheckpointInfo) -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(f"{info.url} holds a {type(tree).__name__}, not a state dict")
    return tree


@dataclass(frozen=True)
class _Pair:
    """``live`` is restored from the saved tensor ``key``."""

    live: torch.Tensor
    key: str


@dataclass
class _Steps:
    """What restoring a saved tree does, found by :func:`_walk` before anything changes."""

    opaque: list[tuple[Any, Any, str]] = field(default_factory=list)  # (Stateful, saved, path): user code, undone
    checked: list[tuple[Any, Any]] = field(default_factory=list)  # (tensor or torch-loaded Stateful, saved)
    pairs: list[_Pair] = field(default_factory=list)  # live tensors that saved tensors restore, by key


def _walk_entries(target: dict[str, Any] | None, loaded: dict[str, Any], steps: _Steps) -> dict[str, Any]:
    """:func:`_walk` each saved entry; return the values :func:`restore_into` hands back."""
    values: dict[str, Any] = {}
    for key, saved in loaded.items():
        live = target.get(key) if target is not None else None
        value = _walk(live, saved, f"[{key!r}]", steps)
        if not (isinstance(live, torch.Tensor) or is_stateful(live)):
            values[key] = value
    return values


def _walk(live: Any, saved: Any, path: str, steps: _Steps) -> Any:
    """Check restoring ``saved`` into ``live``, record its steps; return the value as the caller sees it.

    Raises:
        StateMismatchError: where torch (or :func:`_apply`'s ``copy_``) would refuse ``saved``.
    """
    if isinstance(live, torch.Tensor):
        check_tensor(live, saved, path, module=False)
        _pair(live, saved, steps.pairs)
    elif isinstance(live, torch.nn.Module) and loads_key_for_key(live):
        _pair(check_module(live, saved, path), saved, steps.pairs)
    elif isinstance(live, torch.optim.Optimizer) and loads_as_torch(live):
        check_optimizer(live, saved, path)
        _pair(live.state_dict()["state"], saved["state"], steps.pairs)
    elif is_stateful(live):
        steps.opaque.append((live, saved, path))
        return live
    elif isinstance(live, dict) and isinstance(saved, dict):
        return type(saved)((k, _walk(live.get(k), v, f"{path}[{k!r}]", steps)) for k, v in saved.items())
    elif isinstance(live, list) and isinstance(saved, list) and len(live) == len(saved):
        return [_walk(a, b, f"{path}[{i}]", steps) for i, (a, b) in enumerate(zip(live, saved))]
    else:
        return decanonicalize(saved)
    steps.checked.append((live, saved))
    return live


def _apply(steps: _Steps, land: Callable[[], None]) -> None:
    """Load the opaque Statefuls (each after a snapshot), ``land`` the bytes, run the checked steps.

    On any error every opaque Stateful loaded so far, the failing one included, gets its
    snapshot back; a Stateful's own error is raised as StateMismatchError naming it.
    """
    undo: list[tuple[Any, Any]] = []
    try:
        for live, saved, path in steps.opaque:
            undo.append((live, copy.deepcopy(live.state_dict())))
            try:
                live.load_state_dict(decanonicalize(saved))
            except Exception as err:
                raise StateMismatchError(
                    f"state{path}: {type(live).__name__}.load_state_dict refused the checkpoint "
                    f"({type(err).__name__}: {err}); nothing was restored"
                ) from err
        land()
        for live, saved in steps.checked:
            if isinstance(live, torch.Tensor):
                with torch.no_grad():
                    live.copy_(saved)
            else:
                live.load_state_dict(decanonicalize(saved))
    except BaseException:
        for live, snapshot in reversed(undo):
            live.load_state_dict(snapshot)
        raise


def _pair(live: Any, saved: Any, out: list[_Pair]) -> None:
    """Collect the live tensors, alone or in nested dicts, that saved tensors restore by key."""
    if isinstance(saved, Marker):
        if isinstance(live, torch.Tensor) and not is_lazy(live):
            out.append(_Pair(live, saved.key))
    elif isinstance(live, dict) and isinstance(saved, dict):
        for k, v in saved.items():
            if k in live:
                _pair(live[k], v, out)


def _destinations(pairs: list[_Pair], sources: dict[str, SourceTensor]) -> dict[str, torch.Tensor]:
    """Saved key -> the live tensor its bytes land in directly (see the module doc, step 3)."""
    spans: list[tuple[str, int, int, int]] = []
    for i, p in enumerate(pairs):
        extent = _extent(p.live)
        if extent is not None:
            spans.append((str(p.live.device), *extent, i))
    spans.sort()
    blocked: set[str] = set()
    cluster: list[_Pair] = []
    device, end = "", 0
    for dev, lo, hi, i in spans:
        if cluster and (dev != device or lo >= end):
            blocked |= _conflicts(cluster)
            cluster = []
        if not cluster:
            device, end = dev, hi
        cluster.append(pairs[i])
        end = max(end, hi)
    blocked |= _conflicts(cluster)
    direct: dict[str, torch.Tensor] = {}
    for p in pairs:
        if p.key not in blocked and p.key not in direct and landable(sources[p.key], p.live):
            direct[p.key] = p.live
    return direct


def _conflicts(cluster: list[_Pair]) -> set[str]:
    """The keys of pairs sharing memory, unless they are one saved tensor into one view."""
    keys = {p.key for p in cluster}
    views = {(p.live.data_ptr(), tuple(p.live.shape), p.live.stride(), p.live.dtype) for p in cluster}
    return keys if len(keys) > 1 or len(views) > 1 else set()


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """The half-open address range ``[lo, hi)`` that ``t`` touches (None: no memory)."""
    if t.layout != torch.strided or t.device.type == "meta" or t.numel() == 0:
        return None
    lo = t.data_ptr()
    return lo, lo + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
