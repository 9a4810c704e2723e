"""Services that the worker tests load by import path (``tests.services_for_tests:Name``).

The worker subprocess imports this module, so it must not import anything from
the test suite itself.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from workflows.services.common_service import CommonService

#: Environment variable naming the folder where ``LifecycleMarker`` writes its markers.
MARKER_DIR_VARIABLE = "WORKFLOWS_CELERY_TEST_MARKER_DIR"


class LifecycleMarker(CommonService):
    """Write a marker file each time ``initializing()`` or ``in_shutdown()`` runs.

    Each marker is a JSON file with the event, the process ID and whether the
    service ran on a dry-run transport (the worker's main process does that once
    to learn which queues the service reads).
    """

    _service_name = "Lifecycle marker"
    _logger_name = "workflows.service.lifecycle_marker"

    def initializing(self) -> None:
        self._write_marker("initializing")

    def in_shutdown(self) -> None:
        self._write_marker("in_shutdown")

    def _write_marker(self, event: str) -> None:
        folder = Path(os.environ[MARKER_DIR_VARIABLE])
        marker = {
            "event": event,
            "pid": os.getpid(),
            "dry_run": bool(getattr(self._transport, "dry_run", False)),
        }
        path = folder / f"{event}.{os.getpid()}.{uuid.uuid4().hex}.json"
        path.write_text(json.dumps(marker))
        self.log.info("Wrote marker %s", path.name)


class Rejector(CommonService):
    """Reject every recipe message on queue ``test.rejector`` without requeue."""

    _service_name = "Rejector"

    def initializing(self) -> None:
        import workflows.recipe

        workflows.recipe.wrap_subscribe(
            self._transport, "test.rejector", self.reject, acknowledgement=True
        )

    def reject(self, rw: object, header: dict[str, object], payload: object) -> None:
        self._transport.nack(header, requeue=False)


class DelayedForwarder(CommonService):
    """Forward every recipe message on queue ``test.forwarder`` after the payload's ``delay`` seconds.

    A payload with ``checkpoint`` set first checks in once with that delay.
    """

    _service_name = "Delayed forwarder"

    def initializing(self) -> None:
        import workflows.recipe

        workflows.recipe.wrap_subscribe(self._transport, "test.forwarder", self.forward)

    def forward(self, rw: Any, header: dict[str, object], payload: Any) -> None:
        if payload.get("checkpoint"):
            # Come back to this node once, after the delay, then forward.
            rw.checkpoint({**payload, "checkpoint": False}, delay=payload["delay"])
        else:
            rw.send(payload, delay=payload["delay"])


class FanOut(CommonService):
    """Send ``items`` messages to the ``item`` output for every recipe message on ``test.fanout``."""

    _service_name = "Fan-out"

    def initializing(self) -> None:
        import workflows.recipe

        workflows.recipe.wrap_subscribe(self._transport, "test.fanout", self.split)

    def split(self, rw: Any, header: dict[str, object], payload: Any) -> None:
        for item in range(payload["items"]):
            rw.send_to("item", {"item": item, "delay": payload["delay"], "checkpoint": True})


#: Environment variable that makes ``SuddenDeath`` hang instead of killing itself.
SUDDEN_DEATH_HANG_VARIABLE = "WORKFLOWS_CELERY_TEST_SUDDEN_DEATH_HANG"

#: Seconds ``SuddenDeath`` hangs, far longer than any test waits.
HANG_S = 300

#: Environment variable naming the queues of ``SuddenDeath`` (``<prefix>.in``, ``<prefix>.out``).
SUDDEN_DEATH_PREFIX_VARIABLE = "WORKFLOWS_CELERY_TEST_SUDDEN_DEATH_PREFIX"


class SuddenDeath(CommonService):
    """Kill its own process with SIGKILL the first time it sees a message.

    Later deliveries of the message are forwarded, with their headers, to
    ``<prefix>.out``. A marker file in the marker folder remembers the first one.
    """

    _service_name = "Sudden death"

    def initializing(self) -> None:
        prefix = os.environ[SUDDEN_DEATH_PREFIX_VARIABLE]
        self._out = f"{prefix}.out"
        self._transport.subscribe(f"{prefix}.in", self.receive, acknowledgement=True)

    def receive(self, header: dict[str, object], message: object) -> None:
        marker = Path(os.environ[MARKER_DIR_VARIABLE]) / f"died-{header['message-id']}"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            if os.environ.get(SUDDEN_DEATH_HANG_VARIABLE):
                # The test kills the whole worker while this step hangs.
                time.sleep(HANG_S)
            else:
                os.kill(os.getpid(), 9)
        self._transport.send(self._out, {"message": message, "header": dict(header)})
        self._transport.ack(header)
