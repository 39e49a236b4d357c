"""What a store's error means to the user: one line that names the cause and what to do.

:meth:`FsspecStorage._errors <ckptstore.storage.FsspecStorage>` passes every exception raised
by fsspec or a store's client through :func:`explain`. The hints follow the real cause, which
the client's own message often hides: botocore's ``NoCredentialsError`` is not a network
problem, and an option s3fs does not know reaches ``AioSession`` as a bare ``TypeError``.
"""

from __future__ import annotations

import errno
import re

from .errors import CheckpointNotFound, CkptStoreError, ConfigError, StorageError

_CLIENT_LIBRARIES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "requests", "urllib3"}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"}
_UNKNOWN_OPTION = re.compile(r"unexpected keyword argument '(\w+)'")
_CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a profile in ~/.aws/credentials), "
          "or pass storage_options key= and secret= (CLI: --storage-option key=... --storage-option secret=...)",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run "
          "`gcloud auth application-default login`, or pass storage_options token= (a key file path, or 'anon')",
}
_CLIENT_OPTIONS = {  # options people pass at the top level that belong to the client underneath
    "s3": ("client_kwargs", {"region_name", "endpoint_url", "verify", "use_ssl", "aws_session_token", "config"}),
}


def explain(err: Exception, op: str, where: str, protocol: str) -> CkptStoreError | None:
    """The ckptstore error for ``err``, raised by ``op`` ("read", "write", ...) on ``where``; None: not the store's.

    Example:
        >>> explain(TypeError("AioSession.__init__() got an unexpected keyword argument 'region_name'"),
        ...         "list", "s3://b/run", "s3")
        ConfigError("storage option 'region_name' is not one s3 takes at the top level; pass it as client_kwargs={'region_name': ...}")
    """
    name = type(err).__name__
    if name in _NO_CREDENTIALS and from_client(err):
        hint = _CREDENTIALS_HINT.get(_family(protocol), "pass the credentials in storage_options")
        return StorageError(f"cannot {op} {where}: no credentials were found ({name}); {hint}")
    unknown = _UNKNOWN_OPTION.search(str(err)) if isinstance(err, TypeError) else None
    if unknown:
        return ConfigError(_unknown_option(unknown.group(1), protocol))
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        if op in ("read", "list"):
            return CheckpointNotFound(f"{where} does not exist")
        if isinstance(err, NotADirectoryError):
            return StorageError(f"cannot {op} {where}: part of the path is a file, not a folder; fix the path")
        if "upload_id=" in str(err) or "NoSuchUpload" in str(err):
            return StorageError(f"cannot {op} {where}: the store no longer knows the upload (it expired, or an earlier "
                                "try whose reply was lost completed it); nothing was committed, try the save again")
        return StorageError(f"cannot {op} {where}: the bucket or parent folder does not exist ({_first_line(err)}); "
                            "create it or fix the URL")
    if isinstance(err, PermissionError) or _gcs_forbidden(err, protocol):
        return StorageError(f"cannot {op} {where}: access denied ({_first_line(err)}); check the credentials "
                            "(environment or storage_options) and the bucket policy")
    if isinstance(err, OSError):
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageError(f"cannot {op} {where}: no space left on the device; free space or "
                                "lower keep_last. Earlier checkpoints are intact.")
        hint = "; check the URL, the endpoint and the network" if isinstance(err, ConnectionError) or from_client(err) else ""
        return StorageError(f"cannot {op} {where}: {_first_line(err)}{hint}")
    if from_client(err):
        return StorageError(f"cannot {op} {where}: {name}: {_first_line(err)}; check the URL, the endpoint and the network")
    return None


def from_client(err: Exception) -> bool:
    """Raised by a store's client library (botocore's EndpointConnectionError, gcsfs's HttpError, ...)."""
    return type(err).__module__.partition(".")[0] in _CLIENT_LIBRARIES


def _gcs_forbidden(err: Exception, protocol: str) -> bool:
    """gcsfs raises a plain ``OSError("Forbidden: <url>\\n<reply>")`` for a 403."""
    return _family(protocol) == "gs" and type(err) is OSError and str(err).startswith("Forbidden:")


def _first_line(err: Exception) -> str:
    """The first line of an error's text: clients append the server's whole reply (XML, JSON) after it."""
    return str(err).strip().partition("\n")[0]


def _family(protocol: str) -> str:
    return {"s3a": "s3", "gcs": "gs"}.get(protocol, protocol)


def _unknown_option(option: str, protocol: str) -> str:
    family = _family(protocol)
    nested, known = _CLIENT_OPTIONS.get(family, ("", set()))
    if option in known:
        return (f"storage option {option!r} is not one {family} takes at the top level; "
                f"pass it as {nested}={{{option!r}: ...}}")
    return f"storage option {option!r} is not one {family} takes; see the fsspec documentation of the {family} filesystem"
