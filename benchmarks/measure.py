"""Measuring tools: worker memory, finished runs read from the sink, percentiles."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

from soak.brokers import descendants


class BenchmarkError(RuntimeError):
    """A benchmark phase could not finish: a worker did not start or runs went missing."""


def rss_bytes(pid: int) -> int:
    """Return the resident memory of process ``pid`` in bytes (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(roots: Iterable[int]) -> float:
    """Return the CPU time (user and system) used so far by the trees of ``roots``, in seconds."""
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    total = 0
    for root in roots:
        for pid in [root, *descendants(root)]:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            # utime and stime are fields 14 and 15, counted after the command name.
            fields = stat.rsplit(")", 1)[-1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks_per_s


class MemorySampler:
    """Sample the summed resident memory of some process trees and keep the peak.

    Args:
        roots: PIDs of the worker processes; their descendants count too.
        interval_s: Seconds between two samples.
    """

    def __init__(self, roots: Iterable[int], interval_s: float = 0.1) -> None:
        self.roots = list(roots)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join()

    def sample(self) -> int:
        """Return the summed resident memory of the trees now, in bytes."""
        pids = set(self.roots)
        for root in self.roots:
            pids.update(descendants(root))
        return sum(rss_bytes(pid) for pid in pids)

    def _run(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self.sample())
            if self._stopping.wait(self.interval_s):
                return


def collect_runs(
    sink: redis.Redis, key: str, count: int, timeout_s: float, log_path: Path
) -> list[dict[str, Any]]:
    """Pop ``count`` finished runs from the sink list ``key``, waiting up to ``timeout_s``.

    Raises:
        BenchmarkError: fewer runs finished in time.
    """
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise BenchmarkError(
                f"only {len(records)} of {count} runs finished within {timeout_s:.0f} s "
                f"(sink {key}); see the worker log {log_path}"
            )
        item = sink.blpop([key], timeout=max(min(left_s, 1.0), 0.01))
        if item is not None:
            records.append(json.loads(item[1]))
    return records


def percentile(values: list[float], fraction: float) -> float:
    """Return the ``fraction`` percentile of ``values`` (nearest rank)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(fraction * len(ordered)) - 1, 0)
    return ordered[rank]
