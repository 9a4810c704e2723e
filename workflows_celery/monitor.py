"""Collecting status heartbeats and showing them, for ``workflows-celery status``.

Every hosted service broadcasts its status on the ``transient.status`` topic
(see :mod:`workflows_celery.status`). A :class:`StatusBoard` subscribed there
keeps the latest status of each ``host``. An entry not heard from for
:data:`GONE_AFTER_S` seconds is shown as gone, and dropped after
:data:`DROP_AFTER_S` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from workflows.services.common_service import CommonService

#: Seconds without a heartbeat after which an entry is shown as gone (a
#: heartbeat expires after 15 s, so a live service is never that late).
GONE_AFTER_S = 15.0

#: Seconds without a heartbeat after which an entry is dropped.
DROP_AFTER_S = 60.0


@dataclass
class _Entry:
    status: dict[str, Any]
    seen: float


class StatusBoard:
    """The latest status of every service instance heard from; a subscription callback.

    Args:
        clock: Returns the current time in seconds since the epoch.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def __call__(self, header: Mapping[str, Any], message: Any) -> None:
        if not isinstance(message, dict) or "host" not in message:
            return
        with self._lock:
            self._entries[str(message["host"])] = _Entry(dict(message), self._clock())

    def snapshot(self) -> list[dict[str, Any]]:
        """Return each entry's status with ``last_seen_s`` and ``gone``, sorted by host."""
        now = self._clock()
        rows = []
        with self._lock:
            for host in sorted(self._entries):
                entry = self._entries[host]
                age = now - entry.seen
                if age > DROP_AFTER_S:
                    del self._entries[host]
                    continue
                rows.append(
                    {**entry.status, "last_seen_s": round(age, 1), "gone": age > GONE_AFTER_S}
                )
        return rows


def busy_share(utilization: Any) -> float | None:
    """Return the share of the last interval spent processing, from a status's ``utilization``."""
    if not isinstance(utilization, dict):
        return None
    # JSON turns the integer state codes into strings.
    code = CommonService.SERVICE_STATUS_PROCESSING
    share = utilization.get(code, utilization.get(str(code)))
    return float(share) if isinstance(share, (int, float)) else 0.0


def format_table(rows: list[dict[str, Any]]) -> str:
    """Format a snapshot as an aligned table, one line per service instance."""
    header = ("HOST", "SERVICE", "STATE", "BUSY", "PROCESSED", "WORKER", "LAST SEEN")
    lines = [header]
    for row in rows:
        fields = row.get("celery")
        celery: dict[str, Any] = fields if isinstance(fields, dict) else {}
        busy = busy_share(row.get("utilization"))
        lines.append(
            (
                str(row.get("host", "")),
                str(row.get("service", "")),
                "gone" if row.get("gone") else str(row.get("statustext", row.get("status", ""))),
                "" if busy is None else f"{busy:.0%}",
                str(celery.get("processed", "")),
                str(celery.get("worker", "")),
                f"{row.get('last_seen_s', 0):.0f} s ago",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    if not rows:
        text.append("(no service heard from)")
    return "\n".join(text)
