"""The manifest: a checkpoint's commit marker and its description, as frozen dataclasses.

``<name>/manifest.json`` is written last; a checkpoint exists iff it does. It lists every
data file with its size and CRC32C, so a reader can tell a whole checkpoint from a damaged
one. ``monitor`` records the metric and mode the saving manager ranked by (``null`` without
one), so a tool that lists the root can mark the best without being told. Non-finite
metrics are stored as the strings ``"nan"``, ``"inf"``, ``"-inf"`` so that the file is strict
JSON any tool can read.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import CorruptCheckpointError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SHARDED_FORMAT = "dcp"  # a checkpoint saved by every rank through torch.distributed.checkpoint: several data files
FOLDER_FORMAT = "folder"  # the files a framework wrote into a local folder, committed as one checkpoint
_TOMBSTONE_PREFIX = b'{"ckptstore": "tombstone"'


def tombstone() -> bytes:
    """A new tombstone: written create-only in place of a manifest by a process that removes
    an abandoned save, it stops a late writer from committing into a folder whose data is being
    deleted. Its random token lets the remover delete exactly its own tombstone later.

    Example:
        >>> is_tombstone(tombstone())
        True
    """
    return _TOMBSTONE_PREFIX + f', "token": "{uuid.uuid4().hex}", "reason": "an abandoned save is being removed"}}\n'.encode()


def is_tombstone(data: bytes | None) -> bool:
    """True if ``data`` (a manifest file's bytes) is a tombstone."""
    return data is not None and data.startswith(_TOMBSTONE_PREFIX)


@dataclass(frozen=True)
class FileEntry:
    """A data file of a checkpoint, relative to the checkpoint's folder."""

    path: str
    size: int
    crc32c: int


@dataclass(frozen=True)
class CheckpointInfo:
    """What a committed checkpoint is: read from its manifest.

    Example:
        >>> info = CheckpointInfo(name="step_00000003", step=3, format="safetensors",
        ...                       files=(FileEntry("state-0123abcd.safetensors", 8, 0),))
        >>> CheckpointInfo.from_json(info.to_json(), url="memory://r/step_00000003").step
        3
    """

    name: str
    step: int
    format: str
    metrics: dict[str, float] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = ()
    monitor: tuple[str, str] | None = None  # (metric, "min" | "max") the saving manager ranked by
    created: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    url: str = ""

    @property
    def size(self) -> int:
        """Bytes in all data files."""
        return sum(f.size for f in self.files)

    def metric(self, name: str) -> float | None:
        """The metric ``name`` if it is a finite number, else None (never "best")."""
        value = self.metrics.get(name)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    def to_json(self) -> bytes:
        doc = {
            "manifest_version": MANIFEST_VERSION,
            "name": self.name,
            "step": self.step,
            "format": self.format,
            "created": self.created.isoformat(),
            "metrics": {k: _encode_metric(v) for k, v in self.metrics.items()},
            "monitor": None if self.monitor is None else {"metric": self.monitor[0], "mode": self.monitor[1]},
            "files": [{"path": f.path, "size": f.size, "crc32c": f"{f.crc32c:08x}"} for f in self.files],
        }
        return json.dumps(doc, indent=1, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes, url: str) -> CheckpointInfo:
        """Parse a manifest; raise :class:`CorruptCheckpointError` naming ``url`` if it is bad."""
        try:
            doc = json.loads(data)
            if doc.get("manifest_version") != MANIFEST_VERSION:
                raise ValueError(f"unsupported manifest_version {doc.get('manifest_version')!r}")
            if not doc["files"]:
                raise ValueError("it lists no data file")
            return cls(
                name=str(doc["name"]),
                step=_int(doc["step"]),
                format=str(doc["format"]),
                metrics={str(k): _decode_metric(v) for k, v in doc["metrics"].items()},
                files=tuple(
                    FileEntry(str(f["path"]), _int(f["size"]), int(f["crc32c"], 16)) for f in doc["files"]
                ),
                created=datetime.fromisoformat(doc["created"]),
                url=url,
                monitor=_monitor(doc.get("monitor")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptCheckpointError(f"{url}/{MANIFEST_NAME} is not a valid manifest: {err!r}") from err


def _monitor(value: Any) -> tuple[str, str] | None:
    """The optional ``monitor`` field (absent in manifests written before it existed)."""
    if value is None:
        return None
    if value.get("mode") not in ("min", "max") or not isinstance(value.get("metric"), str):
        raise ValueError(f"monitor must be {{'metric': str, 'mode': 'min' | 'max'}}, got {value!r}")
    return value["metric"], value["mode"]


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _encode_metric(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def _decode_metric(value: Any) -> float:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {value!r} is not a number")
    return float(value)
