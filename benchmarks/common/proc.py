"""Linux ``/proc`` probes of this process: RSS, anonymous RSS, the kernel's high-water mark, I/O, CPU time.

No psutil. A measured child opens ``/proc/self/status`` once and re-reads it with ``os.pread``
(no allocation worth counting). The peak is the kernel's ``VmHWM`` after resetting it (writing
``5`` to ``/proc/self/clear_refs``), so it is exact rather than sampled; the sampling thread stays
as the cross-check, the ``RssAnon`` source, and the fallback where ``clear_refs`` is refused.
"""

from __future__ import annotations

import os
import resource
import threading
import time

MiB = 2**20


class ProcStatus:
    """Fields of ``/proc/self/status``, in bytes, through one open descriptor."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/self/status", os.O_RDONLY)

    def fields(self, *names: bytes) -> list[int]:
        data = os.pread(self.fd, 8192, 0)
        out = []
        for name in names:
            i = data.index(name + b":")
            out.append(int(data[i + len(name) + 1 : data.index(b"kB", i)]) * 1024)
        return out

    def rss(self) -> int:
        return self.fields(b"VmRSS")[0]

    def anon(self) -> int:
        return self.fields(b"RssAnon")[0]

    def hwm(self) -> int:
        return self.fields(b"VmHWM")[0]

    def reset_hwm(self) -> bool:
        """Reset VmHWM to the current RSS; True if the kernel accepted it."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        hwm, rss = self.fields(b"VmHWM", b"VmRSS")
        return hwm <= rss + 4 * MiB


class Sampler(threading.Thread):
    """Samples VmRSS and RssAnon every ``interval`` seconds until ``stop()``; keeps the maxima.

    Subclasses extend ``sample()`` to look at something else at the same moments (tracemalloc).
    """

    def __init__(self, probe: ProcStatus, interval: float) -> None:
        super().__init__(daemon=True)
        self.probe, self.interval = probe, interval
        self.stop_event = threading.Event()
        self.max_rss = self.max_anon = self.n = 0
        self.t_max = 0.0  # seconds from start to the RSS maximum
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        rss, anon = self.probe.fields(b"VmRSS", b"RssAnon")
        self.n += 1
        if rss > self.max_rss:
            self.max_rss, self.t_max = rss, time.perf_counter() - self.t0
        self.max_anon = max(self.max_anon, anon)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def proc_io() -> dict[str, int]:
    """``/proc/self/io`` counters; ``read_bytes``/``write_bytes`` are what reached the block layer."""
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v)
    return out


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def minor_faults() -> int:
    """Minor page faults of this process so far (every thread): first touches of fresh memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's finished, waited-for children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (``/proc/stat``: user, nice,
    system, irq, softirq; idle, iowait and steal are not busy). The difference over an interval, minus
    what this process and its children used, is what other processes took: the load a result shared."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
