"""Status heartbeats of hosted services, as workflows' frontend broadcasts them.

Each hosted service instance broadcasts the workflows status dict on the
``transient.status`` topic at once when its state changes, and every
:data:`STATUS_INTERVAL_S` seconds otherwise. An idle state is announced only
once it has lasted half a second, so a busy service does not flicker. Each message expires after
15 seconds. Monitors written for workflows read these messages unchanged. The
``celery`` field adds what Celery users look for: the worker's node name, its
pool and concurrency, and the messages this instance has processed.

A heartbeat that cannot be sent (the broker is down) is logged once and tried
again at the next tick, so heartbeats resume by themselves with the broker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import workflows
import workflows.util
from workflows.frontend.utilization import UtilizationStatistics
from workflows.services.common_service import CommonService

logger = logging.getLogger(__name__)

#: Seconds between two heartbeats of an unchanged state, as in workflows' frontend.
STATUS_INTERVAL_S = 6.0

#: Seconds an idle state must last before it is announced, as in workflows' frontend.
IDLE_ANNOUNCE_DELAY_S = 0.5

#: Seconds between two checks of whether a heartbeat is due.
STATUS_TICK_S = 0.5


def host_id(suffix: str) -> str:
    """Return a ``host`` field: workflows' id of this process, then ``suffix``.

    workflows runs one service per process, so its id names the process. A
    worker process may host several services, so the class name is added.
    """
    return f"{workflows.util.generate_unique_host_id()}.{suffix}"


class StatusReporter:
    """Broadcasts the status of one hosted service instance, or of one worker.

    Args:
        broadcast: Sends one status dict (``CeleryTransport.broadcast_status``).
        host: The ``host`` field, unique to the instance.
        service_name: The service's human-readable name.
        service_class: The name of the service's class.
        worker_fields: Celery fields of the worker (node name, pool, concurrency).
        processed: Returns the number of messages this instance has processed.
    """

    def __init__(
        self,
        broadcast: Callable[[Mapping[str, Any]], None],
        host: str,
        service_name: str,
        service_class: str,
        worker_fields: Mapping[str, Any],
        processed: Callable[[], int],
    ) -> None:
        self.host = host
        self._broadcast = broadcast
        self._service_name = service_name
        self._service_class = service_class
        self._worker_fields = dict(worker_fields)
        self._processed = processed
        self._lock = threading.Lock()
        self._utilization = UtilizationStatistics(summation_period=STATUS_INTERVAL_S)
        self._status = CommonService.SERVICE_STATUS_NEW
        self._announced: int | None = None
        self._last_broadcast = 0.0
        self._idle_since: float | None = None
        self._failing = False

    def update(self, status: int | None = None) -> None:
        """Record a new state, if given, and broadcast the status when it is due."""
        with self._lock:
            now = time.time()
            if status is not None and status != self._status:
                self._status = status
                self._utilization.update_status(status)
            if self._status == CommonService.SERVICE_STATUS_IDLE:
                if self._idle_since is None:
                    self._idle_since = now
                if now < self._idle_since + IDLE_ANNOUNCE_DELAY_S:
                    return
            else:
                self._idle_since = None
            changed = self._status != self._announced
            if not changed and now < self._last_broadcast + STATUS_INTERVAL_S:
                return
            report = self._report(self._status)
            try:
                self._broadcast(report)
            except Exception as error:  # the next tick tries again
                if not self._failing:
                    logger.warning(
                        "Could not broadcast the status of %s (%s); trying again until "
                        "the broker answers",
                        self.host,
                        error,
                    )
                self._failing = True
                return
            if self._failing:
                logger.info("Status broadcasts of %s resumed", self.host)
            self._failing = False
            self._announced = self._status
            self._last_broadcast = now

    def _report(self, status: int) -> dict[str, Any]:
        return {
            "host": self.host,
            "status": status,
            "statustext": CommonService.human_readable_state.get(status),
            "service": self._service_name,
            "serviceclass": self._service_class,
            "utilization": self._utilization.report(),
            "workflows": workflows.version(),
            "celery": {
                **self._worker_fields,
                "pid": os.getpid(),
                "processed": self._processed(),
            },
        }
