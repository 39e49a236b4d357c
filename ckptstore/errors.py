"""The exception tree.

Every class also subclasses the builtin it means, so ``except FileNotFoundError`` in a
caller's code keeps working::

    Exception
    └── CkptStoreError
        ├── CheckpointNotFound      (FileNotFoundError)   no such checkpoint / file
        ├── CheckpointExists        (FileExistsError)     the step is already committed
        ├── CorruptCheckpointError  (ValueError)          bytes do not match the manifest
        ├── UnsafeCheckpointError   (ValueError)          would need unpickling untrusted code
        ├── UnsupportedValueError   (TypeError)           a state value no format can hold
        ├── InvalidNameError        (ValueError)          a name that escapes the root
        ├── ConfigError             (ValueError)          an option out of range or unknown
        ├── StateMismatchError      (ValueError)          a saved value does not fit the target
        ├── StorageError            (OSError)             the store refused: bucket, creds, disk
        ├── RankError               (RuntimeError)        another rank of the job failed or died
        └── MissingDependency       (ImportError)         an optional extra is not installed

Messages say what went wrong, where, and what to do about it.
"""

from __future__ import annotations


class CkptStoreError(Exception):
    """Base class of every error ckptstore raises on purpose."""


class CheckpointNotFound(CkptStoreError, FileNotFoundError):
    """The asked-for checkpoint or file does not exist (or was never committed)."""


class CheckpointExists(CkptStoreError, FileExistsError):
    """A checkpoint with this step or name is already committed."""


class CorruptCheckpointError(CkptStoreError, ValueError):
    """Stored bytes are truncated, altered or inconsistent with their manifest."""


class UnsafeCheckpointError(CkptStoreError, ValueError):
    """Loading would unpickle arbitrary objects and the caller did not opt in."""


class UnsupportedValueError(CkptStoreError, TypeError):
    """A value in the state is of a type no checkpoint format can store safely."""


class InvalidNameError(CkptStoreError, ValueError):
    """A checkpoint name or path would escape its root (``..``, absolute, URL scheme)."""


class ConfigError(CkptStoreError, ValueError):
    """An option is out of range, inconsistent or unknown (such as the format name)."""


class StateMismatchError(CkptStoreError, ValueError):
    """A saved value cannot be restored into the given target (type or shape differs)."""


class StorageError(CkptStoreError, OSError):
    """The store refused an operation: missing bucket, bad credentials, full disk, ..."""


class RankError(CkptStoreError, RuntimeError):
    """Another rank of a ``torch.distributed`` job failed, died or did not answer in time."""


class MissingDependency(CkptStoreError, ImportError):
    """An optional dependency (an extra such as ``ckptstore[s3]``) is not installed."""
