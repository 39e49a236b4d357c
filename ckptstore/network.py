"""How long one request to an object store may take, and how often it is tried.

A real bucket now and then resets a connection, answers 500 / 503 SlowDown / 429, or stalls
without closing. The client libraries already retry the transient failures, with jittered
exponential backoff; what they leave open is the bound. Out of the box s3fs retries every call
5 times around botocore's own 5 attempts (25 tries of 15 s each for one stalled request:
a save was measured held for 836 s), and gcsfs sends its requests with *no* timeout at all
(``requests_timeout=None`` reaches aiohttp as "no limit"), so one stalled GCS connection
holds a save or a load for as long as the connection lives.

:func:`with_defaults` fills in, for S3 and GCS only, the options below; every option the caller
gave in ``storage_options`` wins. :func:`tune` sets what s3fs only takes as an attribute.

* **S3** (botocore's retry mode, ``legacy`` unless ``AWS_RETRY_MODE`` or the caller picks
  another: it retries connection errors, read timeouts, 500/502/503/504, 429 and the
  throttling codes such as SlowDown, waiting ``rand(0, 1) × 2^(n-1)`` s before try ``n+1``):
  ``config_kwargs={"connect_timeout": 5, "read_timeout": 15, "retries": {"total_max_attempts":
  4}}``, and s3fs's own retry loop (which also re-reads a body cut mid-download, and retries
  SlowDown once more) cut from 5 to 2 rounds: at most 8 tries of one request (4 of one that
  gets an error status other than SlowDown).
* **GCS** (gcsfs retries each request 6 times on 408/429/5xx and connection errors, waiting
  ``2^(n-1) + rand(0, 1)`` s, fixed in gcsfs): ``requests_timeout=aiohttp.ClientTimeout(
  sock_connect=5, sock_read=15, total=271)`` (the total: see :func:`with_defaults`).

Permanent failures (403, 404, a missing bucket, bad credentials) are not retried by either
library and fail at once. A read timeout counts from the end of the request: an upload of a
large part is never cut for being slow, only a reply that stops coming.

Example:
    >>> with_defaults("s3", {"key": "k"})["config_kwargs"]["retries"]
    {'total_max_attempts': 4}
    >>> with_defaults("s3", {"config_kwargs": {"read_timeout": 60}})["config_kwargs"]["read_timeout"]
    60
    >>> round(request_bound_s("s3"), 2), request_bound_s("gs")
    (134.27, 126.0)
    >>> request_bound_s("file")
    Traceback (most recent call last):
    ValueError: no network bound for protocol 'file'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0  # no byte of a reply for this long: the connection has stalled
S3_BOTOCORE_ATTEMPTS = 4
S3_S3FS_ROUNDS = 2
GCSFS_ATTEMPTS = 6  # gcsfs's own, not configurable per filesystem
# the largest single GCS request ckptstore makes: an upload chunk or a prefetched range is a part
# (8 MiB by default), a partial or in-place load's range at most max_buffer / 4 (64 MiB by default)
LARGEST_GCS_REQUEST = 64 * 2**20
MIN_PART_BYTES = 5 * 2**20  # S3's smallest part (all but the last)
_S3 = frozenset({"s3", "s3a"})
_GCS = frozenset({"gs", "gcs"})


@dataclass(frozen=True)
class Transfers:
    """How one file moves over the network: ``in_flight`` parts (uploads to S3) or ranges
    (whole-file reads from S3 and GCS) of ``part_bytes`` each at once.

    Memory: a save holds ``(in_flight + 1) × part_bytes`` (the part being filled and those
    uploading: 40 MiB by default), a read ``in_flight × part_bytes``. More in flight helps on a
    link with latency and a per-connection cap; on loopback it changes little. GCS uploads go
    one chunk after another whatever ``in_flight`` says (a resumable upload is sequential).
    ``stalled_below``: an S3 part (or single PUT) whose body moves slower than this many bytes
    per second is cut and re-sent (3 tries): a server that stops reading mid-upload would
    otherwise hold the save with no timeout at all.

    Example:
        >>> Transfers(part_bytes=16 << 20, in_flight=8).part_bytes
        16777216
    """

    part_bytes: int = 8 * 2**20
    in_flight: int = 4
    stalled_below: int = 256 * 2**10  # bytes/s: an S3 part upload slower than this is cut and re-sent

    def __post_init__(self) -> None:
        if type(self.part_bytes) is not int or self.part_bytes < MIN_PART_BYTES:
            raise ConfigError(f"`part_bytes` must be an int of at least {MIN_PART_BYTES} (S3's smallest part), "
                              f"got {self.part_bytes!r}")
        if type(self.in_flight) is not int or self.in_flight < 1:
            raise ConfigError(f"`in_flight` must be an int of at least 1, got {self.in_flight!r}")
        if type(self.stalled_below) is not int or self.stalled_below < 1:
            raise ConfigError(f"`stalled_below` must be an int of at least 1 (bytes/s), got {self.stalled_below!r}")


def with_defaults(protocol: str, options: dict[str, Any], transfers: Transfers | None = None) -> dict[str, Any]:
    """``options`` with ckptstore's timeouts and retry counts added where the caller set none.

    On GCS each request also gets a total of ``READ_TIMEOUT_S + LARGEST_GCS_REQUEST /
    transfers.stalled_below`` seconds (271 s by default): aiohttp's read timeout starts once a
    body is sent, so without it a server that stops reading mid-chunk would hold an upload
    forever (S3 parts get their own, tighter bound in :mod:`ckptstore.multipart`).

    On S3, ``max_concurrency=1`` too: with more, s3fs asks for an object's size (a HEAD, one
    more round trip) before every whole read, to split it into parts, and every manifest is a
    whole read of a few hundred bytes. Large reads and uploads are ckptstore's own, concurrent
    as ``transfers`` says.
    """
    if protocol in _S3:
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        config.setdefault("read_timeout", READ_TIMEOUT_S)
        config.setdefault("retries", {"total_max_attempts": S3_BOTOCORE_ATTEMPTS})
        return {"max_concurrency": 1, **options, "config_kwargs": config}
    if protocol in _GCS and options.get("requests_timeout") is None:
        import aiohttp  # gcsfs's own HTTP client

        total = READ_TIMEOUT_S + LARGEST_GCS_REQUEST / (transfers or Transfers()).stalled_below
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        return {**options, "requests_timeout": timeout}
    return options


def tune(fs: Any, protocol: str) -> None:
    """Set the retry rounds s3fs takes only as an attribute (on ckptstore's own filesystem instance)."""
    if protocol in _S3:
        fs.retries = S3_S3FS_ROUNDS


def request_bound_s(protocol: str, read_timeout_s: float = READ_TIMEOUT_S) -> float:
    """The longest one request can take against a store that stalls every reply, with the defaults.

    Each try waits at most ``read_timeout_s`` for a reply; the backoffs between tries are at
    their longest. A save or a load that meets such a store raises within this bound at its
    first request; one that meets a few stalls loses ``read_timeout_s`` per stall.
    """
    if protocol in _S3:
        botocore_waits = sum(2.0 ** (n - 1) for n in range(1, S3_BOTOCORE_ATTEMPTS))
        s3fs_waits = sum(min(1.7**i * 0.1, 15) for i in range(S3_S3FS_ROUNDS))
        return S3_S3FS_ROUNDS * (S3_BOTOCORE_ATTEMPTS * read_timeout_s + botocore_waits) + s3fs_waits
    if protocol in _GCS:
        waits = sum(min(1.0 + 2.0 ** (n - 1), 32) for n in range(1, GCSFS_ATTEMPTS))
        return GCSFS_ATTEMPTS * read_timeout_s + waits
    raise ValueError(f"no network bound for protocol {protocol!r}")
