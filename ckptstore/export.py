"""The best-model export: one stock-loadable weights file beside the checkpoints, with a record.

``export_best="model_best.safetensors"`` keeps ``<root>/model_best.safetensors`` holding the
weights (``state[export_key]``) of the best checkpoint *ever committed* under the root by
``monitor``, whatever retention has deleted since. Beside it, ``model_best.safetensors.json``
records which checkpoint the file holds, that checkpoint's metric, the file's size and CRC32C,
and the store's version token of the file (generation, ETag, inode and mtime: it changes with
every write, so a record tells its own file from one another process wrote after it).

The export is a copy of a committed checkpoint, so it is reconciled rather than trusted:
every save (after its commit, before retention) and every prune compares the record with the
best stored checkpoint, and rewrites the export when a stored checkpoint is strictly better
than the record, or when the file is not the one its record describes. Two processes may
export at once, each deciding from a listing that may be stale by the time it writes; so every
write is followed by another round on a fresh listing (a few rounds at most): it rewrites the
export if a better checkpoint appeared or the file is no longer the one its record describes.
An export costs one more listing; a save that exports nothing costs one small read and a
HEAD of the export. A kill or an error during the export costs one rewrite on the next save,
never a stale export; and a worse model never replaces a better one that retention has
pruned, since the record keeps its metric. The weights file is written first and the record
last, each atomically.

Repairing from a stored checkpoint reads that checkpoint whole (the rare path); the export of
the checkpoint just saved uses the state in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import commit, retention
from .errors import CheckpointNotFound, ConfigError, StorageError
from .manifest import CheckpointInfo
from .scan import KnownManifests, scan
from .serializers import ChecksumWriter, format_for_path
from .storage import FsspecStorage

log = logging.getLogger("ckptstore")
ROUNDS = 4  # reconcile rounds (each write is checked by one more) before giving up until the next save


@dataclass(frozen=True)
class ExportRecord:
    """Which checkpoint the export file holds, by what metric, and the file's size and CRC32C."""

    file: str
    checkpoint: str
    step: int
    monitor: str
    mode: str
    value: float
    size: int
    crc32c: int
    version: str


def weights_to_export(tree: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    """``tree[key]`` as a flat dict of tensors, or a ConfigError (checked before any write).

    Example:
        >>> sorted(weights_to_export({"model": {"w": torch.ones(1)}}, "model"))
        ['w']
    """
    weights = tree.get(key)
    if not (isinstance(weights, dict) and weights and all(isinstance(v, torch.Tensor) for v in weights.values())):
        raise ConfigError(
            f"export_best exports state[{key!r}], which must be a module or a dict of tensors "
            f"(the state's entries: {sorted(tree)}); set export_key to your model's entry"
        )
    return weights


class BestExport:
    """Keeps ``file`` under the root holding the best weights ever committed (see the module doc)."""

    def __init__(self, storage: FsspecStorage, file: str, key: str, monitor: str, mode: str, known: KnownManifests) -> None:
        self.storage, self.file, self.key, self.monitor, self.mode = storage, file, key, monitor, mode
        self.known = known  # the manager's: each manifest is read once
        self.record_file = f"{file}.json"

    def record(self) -> ExportRecord | None:
        """The record, or None when it is absent, unreadable, or about another file or metric."""
        try:
            doc = json.loads(self.storage.read(self.record_file))
            record = ExportRecord(**doc)
        except CheckpointNotFound:
            return None
        except (ValueError, TypeError) as err:
            log.warning("ignoring the unreadable export record %s: %s", self.storage.url(self.record_file), err)
            return None
        if (record.file, record.monitor, record.mode) != (self.file, self.monitor, self.mode):
            return None
        return record

    def reconcile(self, committed: Sequence[CheckpointInfo], fresh: tuple[CheckpointInfo, dict[str, Any]] | None = None) -> None:
        """Rewrite the export if a stored checkpoint beats its record or the file is not its record's.

        ``fresh``: the checkpoint just saved and its state, exported from memory if it is the best.

        Raises:
            StorageError: the store refused, or other processes kept rewriting the export.
        """
        for _ in range(ROUNDS):
            if not self._reconcile_once(committed, fresh):
                return  # the export already held the best stored checkpoint
            # Written: check it against a fresh listing, since the one this decision rests on may be
            # stale (another process may have exported a better checkpoint meanwhile, or rewritten ours).
            committed = scan(self.storage, self.known).committed
        raise StorageError(f"{self.storage.url(self.file)} kept being rewritten by other processes; it is reconciled on the next save")

    def _reconcile_once(self, committed: Sequence[CheckpointInfo], fresh: tuple[CheckpointInfo, dict[str, Any]] | None) -> bool:
        """One round: True if it wrote the export (to be checked by another round), False if it was right."""
        ranked = retention.ranked_best(committed, self.monitor, self.mode)
        if not ranked:
            return False
        top = ranked[0]
        record = self.record()
        if record is not None:
            value = top.metric(self.monitor)
            assert value is not None  # ranked_best keeps finite metrics only
            beaten = value < record.value if self.mode == "min" else value > record.value
            if not beaten and self._matches(record):
                return False
            if not beaten and record.value != value:  # the record's better checkpoint is pruned
                log.warning("the export %s no longer matches its record and %s (%s=%s) is gone; exporting the best "
                            "stored checkpoint, %s", self.storage.url(self.file), record.checkpoint, self.monitor,
                            record.value, top.name)
        tree = fresh[1] if fresh is not None and fresh[0].name == top.name else commit.read_checkpoint(self.storage, top)
        self._write(top, weights_to_export(tree, self.key))
        return True

    def _matches(self, record: ExportRecord) -> bool:
        try:
            return self.storage.version(self.file) == record.version
        except CheckpointNotFound:
            return False

    def _write(self, info: CheckpointInfo, weights: dict[str, torch.Tensor]) -> None:
        """Write the weights, then their record (with the version of the file this write published)."""
        published: list[str] = []
        with self.storage.open_write(self.file, published=published) as raw:
            out = ChecksumWriter(raw)
            format_for_path(self.file).write_plain(weights, out)
        value = info.metric(self.monitor)
        assert value is not None
        [version] = published
        record = ExportRecord(self.file, info.name, info.step, self.monitor, self.mode, value, out.size, out.crc, version)
        with self.storage.open_write(self.record_file) as f:
            f.write(json.dumps(asdict(record), indent=1).encode())
        log.info("exported best (%s=%s, step %d) to %s", self.monitor, value, info.step, self.storage.url(self.file))
