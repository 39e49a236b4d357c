"""Reading a root: one listing, then the manifests, sorted into what is and is not a checkpoint.

A folder is a committed checkpoint iff its manifest parses, names the folder, and every data
file it lists is in the same listing. Everything else is classified, never guessed at:
unreadable manifests (left for the user), unfinished or claimed saves, manifests whose data
is missing (``broken``: counting them would let retention prune a real checkpoint for a
phantom), and stray temp files.

**Cost.** A scan is one listing of the root (a paginated LIST on object stores: one request
per 1,000 files) plus a read of each manifest it has not seen. Committed manifests never
change in place: a manifest path is only ever re-used after a delete, and the new file has a
new listing tag (ETag or generation on object stores, inode and mtime on a local disk). So a
:class:`KnownManifests` kept by a manager reads each manifest once, whatever the history.
"""

from __future__ import annotations

import logging
import posixpath
import re
import time
from dataclasses import dataclass, field

from .errors import ConfigError, CorruptCheckpointError, StorageError
from .manifest import MANIFEST_NAME, CheckpointInfo, is_tombstone
from .storage import TEMP_FILE, FsspecStorage, Listed

log = logging.getLogger("ckptstore")

LIST_ATTEMPTS = 3  # listings per scan when manifests vanish between the listing and their read
# a data file: one file per checkpoint, a sharded save's files (see ckptstore.sharded), or a folder
# checkpoint's files, kept under the save's token (see ckptstore.folders)
_DATA_FILE = re.compile(r"^state-[0-9a-f]{8}\.(?:safetensors|pt|rank\d+-\d+\.distcp|dcp-metadata|tree\.json)$|^files-[0-9a-f]{8}/.")


def _ours(name: str) -> bool:
    """A file name ckptstore writes inside a checkpoint folder (data file or temp file)."""
    return bool(_DATA_FILE.match(name) or TEMP_FILE.match(name))


@dataclass(frozen=True)
class Leftover:
    """Files under the root that no manifest describes: an unfinished save or a temp file."""

    files: tuple[str, ...]  # relative to the root
    mtime: float  # the newest modification time among them, as the store reports it
    manifest: bytes = b""  # the folder's manifest as listed (a tombstone, or one whose data is missing)

    @property
    def tombstone(self) -> bool:
        """A cleaner claimed this folder: its manifest is a tombstone."""
        return is_tombstone(self.manifest)


@dataclass(frozen=True)
class Scan:
    """What a root holds: committed checkpoints, unreadable manifests, leftovers."""

    committed: list[CheckpointInfo]
    corrupt: dict[str, tuple[str, ...]]  # folder -> its files: unreadable manifest, left for the user
    abandoned: dict[str, Leftover]  # folder -> an unfinished (or claimed) save
    broken: dict[str, Leftover]  # folder -> a manifest whose data file is not there: never a checkpoint
    stray: dict[str, Leftover]  # file -> temp files and unlisted data files, in committed folders or at the root
    files: int = 0  # files listed under the root, of any kind (0: an empty or nonexistent root)

    def damaged(self, folder: str) -> tuple[str, ...] | None:
        """The files of ``folder`` if its manifest is unreadable or its data is missing, else None."""
        if folder in self.corrupt:
            return self.corrupt[folder]
        return self.broken[folder].files if folder in self.broken else None

    def reasons(self) -> dict[str, str]:
        """Each folder that is not a checkpoint, and why: ``{folder: reason}``."""
        now = time.time()
        reasons = {
            f: "being removed as an abandoned save" if left.tombstone else f"unfinished save (no manifest), idle {now - left.mtime:.0f}s"
            for f, left in self.abandoned.items()
        }
        reasons.update({f: "manifest whose data file is missing; removed once idle" for f in self.broken})
        reasons.update({f: "unreadable manifest; left for you to inspect (CheckpointManager.delete removes it)" for f in self.corrupt})
        return dict(sorted(reasons.items()))


@dataclass
class KnownManifests:
    """The committed manifests one process has read, by listing tag, and the warnings it gave.

    Example:
        >>> known = KnownManifests()
        >>> known.warn("step_1", "step_1 looks damaged"), known.warn("step_1", "step_1 looks damaged")
        (True, False)
    """

    infos: dict[str, tuple[str, CheckpointInfo, bytes]] = field(default_factory=dict)  # manifest path -> (tag, info, bytes)
    warned: set[tuple[str, str]] = field(default_factory=set)

    def warn(self, folder: str, message: str) -> bool:
        """Log ``message`` unless this exact one was logged for ``folder`` already; True if logged."""
        if (folder, message) in self.warned:
            return False
        self.warned.add((folder, message))
        log.warning("%s", message)
        return True

    def keep(self, listed: dict[str, str], manifests: dict[str, tuple[CheckpointInfo, bytes]]) -> None:
        """Remember ``manifests`` (path -> parsed, raw) with their tags in ``listed``; forget what is no longer listed."""
        self.infos = {p: (listed[p], info, data) for p, (info, data) in manifests.items()}
        self.warned = {w for w in self.warned if f"{w[0]}/{MANIFEST_NAME}" in listed}


def scan(storage: FsspecStorage, known: KnownManifests | None = None) -> Scan:
    """List the root once and read the manifests ``known`` lacks (concurrently where the store can).

    A manifest deleted between the listing and its read (a concurrent prune) makes the listing
    stale, so the root is listed again (a few times at most): a stale listing could show no
    checkpoint at all while newer ones exist.
    """
    known = known if known is not None else KnownManifests()
    never_read: set[str] | None = None  # listed, yet unreadable, on every listing so far
    for attempt in range(LIST_ATTEMPTS):
        listing = storage.list_files()
        folders, at_root = _by_folder(listing)
        tags = {f"{f}/{MANIFEST_NAME}": files[MANIFEST_NAME].tag for f, files in folders.items() if MANIFEST_NAME in files}
        cached = {p: hit[1:] for p, tag in tags.items() if (hit := known.infos.get(p)) is not None and hit[0] == tag}
        texts = storage.read_many([p for p in tags if p not in cached])
        unread = set(tags) - set(texts) - set(cached)
        if not unread:
            break
        never_read = unread if never_read is None else never_read & unread
        if attempt + 1 < LIST_ATTEMPTS:
            time.sleep(0.05 * (attempt + 1))  # a concurrent prune deletes manifests one by one: let it get ahead
    else:
        if never_read:  # not a prune racing us (that would have left the next listing): the store disagrees with itself
            raise StorageError(
                f"{storage.url()}: {', '.join(sorted(never_read))} listed {LIST_ATTEMPTS} times but not found when read; "
                "the store's listing and its reads disagree, so the checkpoints under it cannot be told"
            )
    if MANIFEST_NAME in at_root:
        parent = posixpath.dirname(storage.url().rstrip("/"))
        raise ConfigError(f"{storage.url()} is a checkpoint folder (it holds {MANIFEST_NAME}), not a root of "
                          f"checkpoints; use its parent: CheckpointManager({parent!r})")
    committed: list[CheckpointInfo] = []
    corrupt: dict[str, tuple[str, ...]] = {}
    claimed: dict[str, bytes] = {}
    broken: dict[str, Leftover] = {}
    parsed: dict[str, tuple[CheckpointInfo, bytes]] = {}
    for path, data in sorted({**texts, **{p: d for p, (_, d) in cached.items()}}.items()):
        folder = path.split("/")[0]
        files = folders[folder]
        listed = tuple(f"{folder}/{n}" for n in sorted(files))
        if is_tombstone(data):
            claimed[folder] = data
            continue
        try:
            info = cached[path][0] if path in cached else _parse(storage, folder, data)
        except CorruptCheckpointError as err:
            known.warn(folder, f"ignoring {folder}: {err}")
            corrupt[folder] = listed
            continue
        parsed[path] = (info, data)
        missing = [e.path for e in info.files if e.path not in files]
        if missing:
            known.warn(folder, f"ignoring {folder}: unusable, its manifest lists {', '.join(missing)}, which is missing "
                               "(damaged by hand, or a save that failed while it committed); it is removed once idle")
            broken[folder] = Leftover(listed, max(f.mtime for f in files.values()), data)
        else:
            committed.append(info)
    abandoned = {
        f: Leftover(tuple(f"{f}/{n}" for n in sorted(files)), max(e.mtime for e in files.values()), claimed.get(f, b""))
        for f, files in sorted(folders.items())
        if f in claimed or (MANIFEST_NAME not in files and all(_ours(n) for n in files))
    }
    stray = {
        f"{i.name}/{n}": Leftover((f"{i.name}/{n}",), e.mtime) for i in committed for n, e in folders[i.name].items()
        if n != MANIFEST_NAME and _ours(n) and n not in {f.path for f in i.files}
    }
    stray.update({p: Leftover((p,), e.mtime) for p, e in at_root.items() if TEMP_FILE.match(p)})
    committed.sort(key=lambda i: (i.step, i.created))
    known.keep(tags, parsed)
    return Scan(committed, corrupt, abandoned, broken, dict(sorted(stray.items())), len(listing))


def _parse(storage: FsspecStorage, folder: str, data: bytes) -> CheckpointInfo:
    info = CheckpointInfo.from_json(data, url=storage.url(folder))
    if info.name != folder:
        raise CorruptCheckpointError(f"{storage.url(folder)}/{MANIFEST_NAME} names {info.name!r}, not its folder {folder!r}")
    return info


def _by_folder(listing: dict[str, Listed]) -> tuple[dict[str, dict[str, Listed]], dict[str, Listed]]:
    """The root's files: {checkpoint folder: {path in it: entry}}, and {root-level file: entry}."""
    folders: dict[str, dict[str, Listed]] = {}
    at_root: dict[str, Listed] = {}
    for path, entry in listing.items():
        folder, _, rest = path.partition("/")
        if rest:
            folders.setdefault(folder, {})[rest] = entry  # rest: a file in the folder, or below it (a folder checkpoint)
        else:
            at_root[path] = entry
    return folders, at_root
