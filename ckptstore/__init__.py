"""ckptstore: save and restore PyTorch training state on any fsspec store.

Example:
    >>> import torch, ckptstore
    >>> mgr = ckptstore.CheckpointManager("memory://doc/init", keep_last=3)
    >>> _ = mgr.save({"model": torch.nn.Linear(2, 2), "epoch": 0}, step=0)
    >>> [c.step for c in mgr.checkpoints()]
    [0]
"""

from .errors import (
    CheckpointExists,
    CheckpointNotFound,
    CkptStoreError,
    ConfigError,
    CorruptCheckpointError,
    InvalidNameError,
    MissingDependency,
    StateMismatchError,
    RankError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from .files import delete, exists, load, save
from .manager import CheckpointManager
from .manifest import CheckpointInfo
from .network import Transfers
from .partial import LoadReport, load_partial
from .rng import RNGState

__version__ = "0.1.0"

__all__ = [
    "CheckpointExists",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFound",
    "CkptStoreError",
    "ConfigError",
    "CorruptCheckpointError",
    "InvalidNameError",
    "LoadReport",
    "MissingDependency",
    "RNGState",
    "RankError",
    "StateMismatchError",
    "StorageError",
    "Transfers",
    "UnsafeCheckpointError",
    "UnsupportedValueError",
    "delete",
    "exists",
    "load",
    "load_partial",
    "save",
]
