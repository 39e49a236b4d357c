"""Leftovers: unfinished saves and temp files, judged idle safely and removed without a race.

A folder that holds ckptstore data files and no manifest is either an abandoned save (a killed
job) or a save in progress elsewhere (a second process, the old instance of a reclaimed spot
job still flushing). They look the same, so removal rests on three rules:

* **Idle by this process's own clock.** A leftover is removed once it has been idle for
  ``abandoned_after`` seconds both by the store's modification time and by this process's
  monotonic clock since it first saw the leftover as it is now. The store's time alone can be
  faked by a live save: clocks differ between machines, and on S3 a multipart object's
  Last-Modified is the *start* of the upload, so a 20-minute upload looks 20 minutes idle the
  moment it completes. (A new process therefore removes old leftovers only after watching them
  for ``abandoned_after``; ``abandoned_after=0`` removes them at once.)
* **Claimed with a tombstone.** Before deleting a folder's files the cleaner writes a tombstone
  in place of its manifest, create-only. If the writer committed first, the claim fails and
  nothing is deleted; if the claim wins, the writer's manifest write is refused and its save
  raises. Either way no committed manifest ever loses its data, whatever the clocks say.
  (The claim is preceded by a plain existence check, which narrows the window on stores whose
  create-only write is check-then-write, such as the GCS emulator.)
* **Exact keys.** Only the files listed are deleted, one by one, the tombstone last and only
  while it is still the same tombstone (each carries a random token): once it is gone a new
  save of that name may commit there. Never a recursive delete of a folder that may have
  gained files since it was listed. A folder another cleaner claimed is finished by the same
  idle rule, so a live cleaner is not raced by a second one.

A manifest whose data file is missing (a save that failed while a cleaner removed its data)
is removed by the same idle rule, data first and manifest last.

Incomplete multipart uploads under the root (S3: a writer killed mid-upload; they are billed
until aborted) are aborted by the same idle rule, judged by their newest part: an upload in
progress elsewhere keeps adding parts, so it is never idle.

Temp files of local atomic writes (``.<name>.<hex>.tmp``: a kill during a save or during the
best-model export) are removed by the same idle rule, wherever they are under the root.
"""

from __future__ import annotations

import logging
import time

from .commit import delete_manifest_if
from .scan import Leftover, Scan
from .manifest import MANIFEST_NAME, tombstone
from .storage import FsspecStorage, Upload

log = logging.getLogger("ckptstore")


class IdleClock:
    """Remembers when this process first saw each leftover in its current form.

    Example:
        >>> clock = IdleClock()
        >>> left = Leftover(("step_1/state-0a1b2c3d.pt",), mtime=0.0)
        >>> clock.watched("step_1", left, now=100.0), clock.watched("step_1", left, now=160.0)
        (0.0, 60.0)
    """

    def __init__(self) -> None:
        self._first_seen: dict[str, tuple[Leftover, float]] = {}

    def watched(self, key: str, leftover: Leftover, now: float) -> float:
        """Seconds this process has seen ``leftover`` under ``key`` unchanged (0 the first time)."""
        seen = self._first_seen.get(key)
        if seen is None or seen[0] != leftover:
            self._first_seen[key] = (leftover, now)
            return 0.0
        return now - seen[1]

    def forget_all_but(self, keys: set[str]) -> None:
        """Drop what is no longer listed, so the memory stays the size of the leftovers."""
        for key in set(self._first_seen) - keys:
            del self._first_seen[key]


def clean(
    storage: FsspecStorage, found: Scan, idle_seconds: float, clock: IdleClock,
    *, now: float | None = None, monotonic: float | None = None,
) -> list[str]:
    """Remove the leftovers of ``found`` that are idle for ``idle_seconds``; return what went.

    A folder another cleaner claimed (a tombstone) is finished by the same idle rule, and its
    tombstone deleted only while it is still that tombstone.
    """
    now = time.time() if now is None else now
    monotonic = time.monotonic() if monotonic is None else monotonic
    clock.forget_all_but(set(found.abandoned) | set(found.broken) | set(found.stray))

    def idle(key: str, leftover: Leftover) -> bool:
        watched = clock.watched(key, leftover, monotonic)
        return min(now - leftover.mtime, watched) >= idle_seconds

    removed = []
    for folder, leftover in found.abandoned.items():
        if idle(folder, leftover) and _remove_save(storage, folder, leftover):
            removed.append(folder)
    for folder, leftover in found.broken.items():
        if idle(folder, leftover):
            log.warning("removing %s: its manifest's data file is missing", storage.url(folder))
            _remove_files(storage, folder, leftover.files, leftover.manifest)
            removed.append(folder)
    for path, leftover in found.stray.items():
        if idle(path, leftover):
            storage.delete(path)
            removed.append(path)
    return removed


def _remove_save(storage: FsspecStorage, folder: str, leftover: Leftover) -> bool:
    """Claim ``folder`` with a tombstone (unless claimed already), delete the files listed, then the tombstone."""
    claim = leftover.manifest
    if not leftover.tombstone:
        if storage.exists(f"{folder}/{MANIFEST_NAME}"):  # committed since the listing; also guards stores whose create-only is not
            return False
        claim = tombstone()
        try:
            storage.write_new(f"{folder}/{MANIFEST_NAME}", claim)
        except FileExistsError:
            return False  # committed since the listing (or claimed by another cleaner): not ours to remove
    log.info("removing abandoned partial checkpoint %s", storage.url(folder))
    _remove_files(storage, folder, leftover.files, claim)
    return True


def _remove_files(storage: FsspecStorage, folder: str, files: tuple[str, ...], manifest: bytes) -> None:
    """Delete the listed files of ``folder``, then its manifest if it still is ``manifest``, then the empty folder.

    The manifest is deleted only while it holds what was listed (the tombstone, or the manifest
    without data): once it is gone, a new save of the same name may commit there.
    """
    path = f"{folder}/{MANIFEST_NAME}"
    for file in files:
        if file != path:
            storage.delete(file)
    delete_manifest_if(storage, folder, lambda data: data == manifest)
    storage.remove_folder(folder)


def abort_idle_uploads(
    storage: FsspecStorage, idle_seconds: float, clock: IdleClock,
    *, now: float | None = None, monotonic: float | None = None,
) -> list[Upload]:
    """Abort the root's incomplete multipart uploads that are idle for ``idle_seconds``; return them.

    ``clock`` must be kept for uploads alone (its memory is trimmed to the uploads listed).
    """
    now = time.time() if now is None else now
    monotonic = time.monotonic() if monotonic is None else monotonic
    uploads = storage.incomplete_uploads(older_than=idle_seconds)
    clock.forget_all_but({u.upload_id for u in uploads})
    aborted = []
    for upload in uploads:
        leftover = Leftover((upload.path, f"{upload.parts} parts"), upload.mtime)
        if min(now - upload.mtime, clock.watched(upload.upload_id, leftover, monotonic)) >= idle_seconds:
            log.info("aborting the incomplete upload of %s (%d parts, idle)", storage.url(upload.path), upload.parts)
            storage.abort_upload(upload)
            aborted.append(upload)
    return aborted
