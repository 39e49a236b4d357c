"""Preemption notices: a signal, or the cloud's metadata server saying the machine is going away.

A spot or preemptible machine gets a notice before it is reclaimed: AWS posts
``spot/instance-action`` two minutes ahead, GCP sets ``instance/preempted`` thirty seconds
ahead, Azure lists a ``Preempt`` scheduled event; schedulers and GCP also send SIGTERM.
:class:`PreemptionWatcher` turns each into one flag that the training loop reads
(``CheckpointManager.reached_preemption(step)``) between steps:

* **Signals** get a handler that only records which signal came: no I/O, no locks, nothing
  that can deadlock inside a handler. The process keeps running, so the loop can save.
* **Clouds** are polled by a daemon thread every ``poll_seconds``, with the headers each
  metadata server demands (an IMDSv2 token for AWS, ``Metadata-Flavor: Google``,
  ``Metadata: true`` for Azure). A cloud whose metadata server does not answer the first
  probe (the job is not on that cloud) is not asked again, so off-cloud the watcher costs one
  short probe per cloud.

``endpoints`` replaces a cloud's metadata host (``{"aws": "http://127.0.0.1:8080"}``): the
tests run real HTTP servers on 127.0.0.1 that answer as the clouds do.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

from .errors import ConfigError

log = logging.getLogger("ckptstore")

METADATA_HOSTS = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}
PROBE_TIMEOUT_S = 1.0


class _NotThisCloud(Exception):
    """The metadata server did not answer at all: the job does not run on this cloud."""


def _request(url: str, method: str = "GET", headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of one HTTP request; raises _NotThisCloud if nothing answered."""
    req = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError) as err:
        raise _NotThisCloud(str(err)) from err


def aws_notice(host: str) -> str | None:
    """AWS: an IMDSv2 token, then ``spot/instance-action`` (404 until a notice is posted)."""
    status, token = _request(f"{host}/latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    if status != 200:
        raise _NotThisCloud(f"token request answered {status}")
    status, body = _request(f"{host}/latest/meta-data/spot/instance-action",
                            headers={"X-aws-ec2-metadata-token": token.decode()})
    if status != 200:
        return None
    action = json.loads(body or b"{}")
    return f"AWS spot {action.get('action', 'interruption')} at {action.get('time', '?')}"


def gcp_notice(host: str) -> str | None:
    """GCP: ``instance/preempted`` is ``TRUE`` once the machine is being preempted."""
    status, body = _request(f"{host}/computeMetadata/v1/instance/preempted", headers={"Metadata-Flavor": "Google"})
    if status != 200:
        raise _NotThisCloud(f"answered {status}")
    return "GCP preemption" if body.strip().upper() == b"TRUE" else None


def azure_notice(host: str) -> str | None:
    """Azure: a scheduled event of type ``Preempt``."""
    status, body = _request(f"{host}/metadata/scheduledevents?api-version=2020-07-01", headers={"Metadata": "true"})
    if status != 200:
        raise _NotThisCloud(f"answered {status}")
    events = json.loads(body or b"{}").get("Events", [])
    preempt = next((e for e in events if e.get("EventType") == "Preempt"), None)
    return None if preempt is None else f"Azure Preempt event at {preempt.get('NotBefore', '?')}"


CLOUDS: dict[str, Callable[[str], str | None]] = {"aws": aws_notice, "gcp": gcp_notice, "azure": azure_notice}


class PreemptionWatcher:
    """Watches for a preemption notice (see module doc); :attr:`notice` says which came first.

    Example:
        >>> watcher = PreemptionWatcher(signals=(), clouds=()).start()
        >>> watcher.notice is None
        True
        >>> watcher.stop()
    """

    def __init__(
        self, signals: Iterable[signal.Signals] = (signal.SIGTERM,), clouds: Iterable[str] = ("aws", "gcp", "azure"),
        poll_seconds: float = 5.0, endpoints: Mapping[str, str] | None = None,
    ) -> None:
        self.signals = tuple(signals)
        unknown = set(clouds) - set(CLOUDS) | set(endpoints or {}) - set(CLOUDS)
        if unknown:
            raise ConfigError(f"unknown cloud(s) {sorted(unknown)}; known: {sorted(CLOUDS)}")
        if not poll_seconds > 0:
            raise ConfigError(f"`poll_seconds` must be > 0, got {poll_seconds!r}")
        self.clouds = tuple(clouds)
        self.hosts = {c: (endpoints or {}).get(c, METADATA_HOSTS[c]).rstrip("/") for c in self.clouds}
        self.poll_seconds = poll_seconds
        self.notice: str | None = None  # set once, by a signal handler or the poller
        self.active_clouds: tuple[str, ...] = self.clouds  # those whose metadata server answered
        self._previous: dict[signal.Signals, Any] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PreemptionWatcher:
        """Install the signal handlers (main thread only) and start polling the clouds."""
        if self.signals and threading.current_thread() is not threading.main_thread():
            raise ConfigError("watch_preemption installs signal handlers, which only the main thread can do")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.clouds:
            self._thread = threading.Thread(target=self._poll, name="ckptstore-preemption", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Put the previous signal handlers back and stop polling."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._stopped.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.notice is None:  # one assignment: safe in a handler
            self.notice = signal.Signals(signum).name

    def _poll(self) -> None:
        first = True
        while not self._stopped.is_set() and self.notice is None and self.active_clouds:
            for cloud in self.active_clouds:
                try:
                    found = CLOUDS[cloud](self.hosts[cloud])
                except _NotThisCloud as err:
                    if first:  # not on this cloud: never asked again
                        self.active_clouds = tuple(c for c in self.active_clouds if c != cloud)
                        log.debug("no %s metadata server at %s (%s)", cloud, self.hosts[cloud], err)
                    continue
                except ValueError as err:  # an answer that is not JSON: ask again next time
                    log.debug("%s metadata server answered oddly: %s", cloud, err)
                    continue
                if found is not None and self.notice is None:
                    self.notice = found
                    log.warning("preemption notice: %s", found)
                    return
            first = False
            self._stopped.wait(self.poll_seconds)
