"""Commands to workers: stopping hosted services by host or by service, and cancelling runs.

workflows services stop when a message on the ``command`` topic names them:
``{"command": "shutdown", "host": ...}`` or ``{"command": "shutdown",
"service": <class name>}`` (with both, both must match), as ``zocalo.shutdown``
sends. Every worker process that hosts services listens there too, runs
``in_shutdown()`` of the services named, and when it has none left, stops its
worker with a warm shutdown, which stops the worker's other services as well.

``celery control workflows_shutdown TARGET`` does the same through Celery's
remote control, for the workers it reaches: TARGET is a service class name, or a
host (which contains dots).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.worker.control import control_command

from workflows_celery.constants import COMMAND_TOPIC

if TYPE_CHECKING:
    from workflows_celery.hosting import AppState, HostedService
    from workflows_celery.ledger import RunRecord

logger = logging.getLogger(__name__)

#: Field of a command that limits it to one Celery worker (its node name);
#: Celery's remote control adds it, workflows' own tools do not.
WORKER_FIELD = "worker"


#: The command that announces a cancelled run to workers, with the run ID in ``run``.
CANCEL_COMMAND = "cancel"


def cancel_run(app: Celery, run_id: str) -> RunRecord:
    """Cancel a run in the ledger, and tell every worker at once on the command topic.

    As with Celery's ``revoke``, a step that a worker took before the broadcast
    reached it still runs. Workers that miss the broadcast read the ledger's
    cancelled runs within a few seconds.

    Raises:
        ConfigurationError: the app has no run ledger.
        LedgerError: the run is not in the ledger, or has ended already.
    """
    from workflows_celery.ledger import require_ledger
    from workflows_celery.transport import CeleryTransport

    record = require_ledger(app).cancel(run_id)
    CeleryTransport(app).broadcast(COMMAND_TOPIC, {"command": CANCEL_COMMAND, "run": run_id})
    return record


def shutdown_command(target: str, worker: str | None = None) -> dict[str, Any]:
    """Return the command message that stops the service class or host ``target``."""
    message: dict[str, Any] = {"command": "shutdown"}
    message["host" if "." in target else "service"] = target
    if worker:
        message[WORKER_FIELD] = worker
    return message


def names_instance(
    command: Mapping[str, Any], host: str | None, service_class: str, worker: str | None
) -> bool:
    """Tell whether a shutdown command names one instance, as workflows' frontend matches them.

    With ``host`` and ``service`` both given, both must match; with neither,
    the command names nothing.
    """
    if command.get("command") != "shutdown":
        return False
    wanted_host, wanted_service = command.get("host"), command.get("service")
    if wanted_host is None and wanted_service is None:
        return False
    if command.get(WORKER_FIELD) not in (None, worker):
        return False
    return wanted_host in (None, host) and wanted_service in (None, service_class)


def matching_hosts(
    hosts: list[HostedService], command: Mapping[str, Any], worker: str | None
) -> list[HostedService]:
    """Return the hosted services a shutdown command names."""
    return [
        hosted
        for hosted in hosts
        if names_instance(
            command,
            hosted.reporter.host if hosted.reporter is not None else None,
            hosted.service_class.__name__,
            worker,
        )
    ]


class CommandListener:
    """Listens on the command topic in one worker process and stops the services named.

    Args:
        app: The worker's app.
        state: The process's hosted services.
    """

    def __init__(self, app: Celery, state: AppState) -> None:
        from workflows_celery.transport import CeleryTransport

        self.app = app
        self.state = state
        self.transport = CeleryTransport(app)

    def start(self) -> None:
        """Subscribe to the command topic, on a listener thread of this process."""
        self.transport.subscribe_broadcast(COMMAND_TOPIC, self.on_command)

    def stop(self) -> None:
        """Stop listening."""
        self.transport.disconnect()

    def on_command(self, header: Mapping[str, Any], message: Any) -> None:
        """Note a cancelled run, or stop the services a command names and the worker when none is left here."""
        if not isinstance(message, dict):
            return
        if message.get("command") == CANCEL_COMMAND:
            self._note_cancelled(message.get("run"))
            return
        state = self.state
        targets = matching_hosts(state.hosts, message, state.worker_fields.get("worker"))
        if not targets:
            return
        before = set(state.dispatcher.destinations())
        for hosted in targets:
            logger.info("Stopping service %s on command %s", hosted.name, message)
            state.stop_host(hosted)
        if not state.hosts:
            logger.info("This worker process hosts no service any more; stopping the worker")
            shutdown = state.shutdown_worker
            if shutdown is not None:
                shutdown()
            return
        # The worker would go on taking the stopped services' messages and,
        # with no service here to read them, send them round to the dead-letter queue.
        unread = [d for d in before - set(state.dispatcher.destinations()) if not d.is_topic]
        worker = state.worker_fields.get("worker")
        for destination in unread:
            # NOTE: this stops the whole worker reading the queue, also in its
            # other processes where an instance of the service still runs.
            logger.info("Worker %s stops reading %s", worker, destination)
            if worker:
                self.app.control.cancel_consumer(destination.name, destination=[worker])


    def _note_cancelled(self, run_id: Any) -> None:
        from workflows_celery.ledger import ledger_for

        recorder = ledger_for(self.app)
        if isinstance(run_id, str) and recorder is not None:
            logger.info("Run %s was cancelled; its messages are dropped from now on", run_id)
            recorder.note_cancelled(run_id)


def warm_shutdown(pid: int) -> Callable[[], None]:
    """Return a function that sends SIGTERM (warm shutdown) to the worker's main process ``pid``."""

    def shut_down() -> None:
        os.kill(pid, signal.SIGTERM)

    return shut_down


@control_command(
    args=[("target", str)],
    signature="<service class or host>",
)
def workflows_shutdown(state: Any, target: str) -> dict[str, str]:
    """Stop the workflows services named by TARGET on this worker (a service class or a host)."""
    from workflows_celery.transport import CeleryTransport

    consumer = state.consumer
    worker = consumer.hostname
    CeleryTransport(consumer.app).broadcast(COMMAND_TOPIC, shutdown_command(target, worker))
    return {"ok": f"shutdown of {target} requested on {worker}"}
