"""The ``celery worker`` side: the ``--services`` option and the bootstep that hosts services.

In the worker's main process the bootstep learns which queues and topics the
services read and adds them to the queues the worker consumes. The services
themselves run where the steps execute: in each prefork child (started on
``worker_process_init``), or in the main process for the solo and threads pools.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

import click
from celery import Celery, bootsteps
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.signals import worker_process_init, worker_process_shutdown
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from workflows.services.common_service import CommonService

from workflows_celery import routing
from workflows_celery.application import apply_broker_defaults
from workflows_celery.constants import (
    CELERY_DEFAULT_CONSUMER,
    COMMAND_TOPIC,
    DEFAULT_APP_NAME,
    DEFAULT_DELIVERY_LIMIT,
    SETTING_DELIVERY_LIMIT,
    SETTING_SERVICES,
)
from workflows_celery.control import names_instance, warm_shutdown
from workflows_celery.deadletter import dead_letter_raw
from workflows_celery.errors import ServiceNotFoundError
from workflows_celery.hosting import state_for
from workflows_celery.leases import (
    held_delivery_tags,
    renew,
    renewal_interval_s,
    uses_redis,
)
from workflows_celery.messages import Destination
from workflows_celery.services import (
    discover_subscriptions,
    load_service,
    parse_service_names,
)
from workflows_celery.status import STATUS_TICK_S, StatusReporter, host_id
from workflows_celery.transport import CeleryTransport

logger = logging.getLogger(__name__)

SERVICES_OPTION = click.Option(
    ["--services"],
    default=None,
    help=(
        "Workflows services this worker hosts, comma separated: entry-point names "
        "(e.g. SamplePipethrough) or import paths (package.module:Class). "
        f"Default: the {SETTING_SERVICES} setting."
    ),
)

DELIVERY_LIMIT_OPTION = click.Option(
    ["--delivery-limit"],
    type=click.IntRange(min=1),
    default=None,
    help=(
        "Deliveries of one message after which it goes to its dead-letter queue "
        f"dlq.<queue> (default: the {SETTING_DELIVERY_LIMIT} setting, or "
        f"{DEFAULT_DELIVERY_LIMIT})."
    ),
)

#: Seconds of ``worker_proc_alive_timeout`` left to a child after its services' start.
CHILD_START_MARGIN_S = 5.0

#: Apps whose workers start services in each forked child.
_forking_apps: list[Celery] = []


class WorkflowsServices(bootsteps.StartStopStep):
    """Worker bootstep that hosts workflows services and recipe step functions."""

    label = "workflows services"

    def __init__(
        self, worker: Any, services: Any = None, delivery_limit: int | None = None, **options: Any
    ) -> None:
        app = worker.app
        # ``celery -b URL`` sets the broker after the app was set up.
        apply_broker_defaults(app)
        if delivery_limit is not None:
            app.conf[SETTING_DELIVERY_LIMIT] = delivery_limit
        state = state_for(app)
        state.worker_fields = {
            "worker": worker.hostname,
            "pool": worker.pool_cls.__module__.rsplit(".", 1)[-1],
            "concurrency": worker.concurrency,
        }
        # Prefork children inherit this, so it stops the main process from any of them.
        state.shutdown_worker = warm_shutdown(os.getpid())
        names = parse_service_names(services) or parse_service_names(
            app.conf.get(SETTING_SERVICES)
        )
        state.service_classes = [_load_for_worker(name) for name in names] + list(
            state.function_steps
        )
        self.enabled = bool(state.service_classes)
        if not self.enabled:
            if app.main == DEFAULT_APP_NAME:
                logger.warning(
                    "This worker hosts no workflows service, so it runs no recipe step; "
                    "name them with --services, e.g. --services SamplePipethrough"
                )
            return

        subscriber = f"{worker.hostname}.{uuid.uuid4().hex[:8]}"
        destinations: dict[Destination, str] = {}
        for service_class in state.service_classes:
            for destination in discover_subscriptions(app, service_class):
                destinations.setdefault(destination, service_class.__name__)
        for destination, service_name in destinations.items():
            if destination.is_topic:
                queue = routing.topic_queue(destination.name, subscriber)
            else:
                queue = routing.task_queue(destination.name)
            app.amqp.queues.select_add(queue)
            logger.info("Worker consumes %s for %s", destination, service_name)

        state.start_in_children = issubclass(worker.pool_cls, PreforkPool)
        if state.start_in_children and app not in _forking_apps:
            _forking_apps.append(app)

    def start(self, worker: Any) -> None:
        state = state_for(worker.app)
        if self.enabled and not state.start_in_children:
            state.start_services(worker.app)

    def stop(self, worker: Any) -> None:
        state = state_for(worker.app)
        if self.enabled and not state.start_in_children:
            state.stop_services()

    # A cold shutdown (and the embedded worker's) terminates the steps
    # instead of stopping them: services still run in_shutdown().
    shutdown = terminate = stop


class LeaseRenewal(bootsteps.StartStopStep):
    """Worker bootstep that renews the visibility of the messages it holds on Redis.

    A thread of its own does it, because with the solo pool a running step
    blocks the worker's event loop and timer. See :mod:`workflows_celery.leases`.
    """

    label = "lease renewal"

    def __init__(self, worker: Any, **options: Any) -> None:
        self.enabled = uses_redis(worker.app)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(
                target=self._run, args=(worker,), name="lease renewal", daemon=True
            )
            self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stopping.set()

    shutdown = terminate = stop

    def _run(self, worker: Any) -> None:
        interval_s = renewal_interval_s(worker.app)
        while not self._stopping.wait(interval_s):
            self.renew(worker)

    def renew(self, worker: Any) -> None:
        """Renew the lease of every message the worker's consumer holds."""
        task_consumer = getattr(getattr(worker, "consumer", None), "task_consumer", None)
        if task_consumer is None:
            return
        try:
            tags = held_delivery_tags(task_consumer.channel)
            with worker.app.connection_for_write() as connection:
                renew(connection, tags)
        except Exception as error:  # the next renewal tries again
            logger.warning(
                "Could not renew the visibility of the held messages (%s); if this "
                "goes on, Redis gives them to another worker",
                error,
            )


#: Service class name in the status of a worker that hosts no service.
WORKER_SERVICE_CLASS = "celery"


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Worker bootstep that broadcasts a workflows status for a worker hosting no service.

    Hosted services broadcast their own status. A worker without any (one that
    runs only plain Celery tasks) appears with this one, as service "Celery
    worker", busy while it runs tasks. A thread of its own sends it, so no
    ``celery beat`` is needed and a blocked event loop does not stop it. The
    worker also stops on a shutdown command naming its host or the class
    ``celery``.
    """

    label = "workflows status"

    def __init__(self, worker: Any, **options: Any) -> None:
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._reporter: StatusReporter | None = None
        self._transport: CeleryTransport | None = None
        self._worker_name = ""

    def start(self, worker: Any) -> None:
        state = state_for(worker.app)
        if state.service_classes or self._thread is not None:
            return
        transport = self._transport = CeleryTransport(worker.app)
        self._worker_name = str(state.worker_fields.get("worker", ""))
        self._reporter = StatusReporter(
            transport.broadcast_status,
            host_id(WORKER_SERVICE_CLASS),
            "Celery worker",
            WORKER_SERVICE_CLASS,
            state.worker_fields,
            lambda: sum(worker_state.total_count.values()),
        )
        # A shutdown naming this worker's host, or the class "celery", stops it.
        transport.subscribe_broadcast(COMMAND_TOPIC, self._on_command)
        self._thread = threading.Thread(
            target=self._run, name="workflows status", daemon=True
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(STATUS_TICK_S * 4)
        if self._reporter is not None:
            self._reporter.update(CommonService.SERVICE_STATUS_END)
        if self._transport is not None:
            self._transport.disconnect()

    def _on_command(self, header: Any, message: Any) -> None:
        reporter = self._reporter
        if not isinstance(message, dict) or reporter is None:
            return
        if names_instance(message, reporter.host, WORKER_SERVICE_CLASS, self._worker_name):
            logger.info("Stopping worker %s on command %s", self._worker_name, message)
            warm_shutdown(os.getpid())()

    shutdown = terminate = stop

    def _run(self) -> None:
        reporter = self._reporter
        assert reporter is not None
        while not self._stopping.wait(STATUS_TICK_S):
            busy = bool(worker_state.active_requests)
            reporter.update(
                CommonService.SERVICE_STATUS_PROCESSING if busy else CommonService.SERVICE_STATUS_IDLE
            )


def _load_for_worker(name: Any) -> Any:
    """Load a service, turning a bad name into a usage error on the command line."""
    try:
        return load_service(name)
    except ServiceNotFoundError as error:
        if click.get_current_context(silent=True) is not None:
            raise click.UsageError(str(error)) from error
        raise


class WorkflowsConsumer(Consumer):
    """The worker's consumer, keeping every message it cannot run in a dead-letter queue.

    Celery logs such messages (bad JSON, a content type it does not accept such
    as pickle, no headers, an unknown task) and drops them. Here each is copied
    to its dead-letter queue and only then removed. When the copy fails, the
    message goes back to its queue instead, so it is never lost.
    """

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _keep(self.app, message, "undecodable", repr(exc))

    def on_unknown_message(self, body: Any, message: Any) -> None:
        _keep(self.app, message, "not a task message", "no task name in its headers")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        _keep(self.app, message, "unknown task", repr(exc))

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        _keep(self.app, message, "invalid task message", repr(exc))


def _keep(app: Celery, message: Any, reason: str, error: str) -> None:
    """Move a message the worker cannot run to its dead-letter queue, or back to its queue."""
    try:
        dead_letter_raw(app, message, reason, error)
    except Exception:
        logger.error(
            "Could not copy a message the worker cannot run (%s: %s) to its dead-letter "
            "queue; it goes back to its queue",
            reason,
            error,
            exc_info=True,
        )
        message.reject_log_error(logger, app.connection_for_write().connection_errors, requeue=True)
        return
    message.ack_log_error(logger, app.connection_for_write().connection_errors)


def install_worker_support(app: Celery) -> None:
    """Add the ``--services`` option and the hosting bootstep to ``app``'s workers."""
    if app.conf.worker_consumer == CELERY_DEFAULT_CONSUMER:
        app.conf.worker_consumer = f"{__name__}:WorkflowsConsumer"
    if WorkflowsServices not in app.steps["worker"]:
        app.user_options["worker"].add(SERVICES_OPTION)
        app.user_options["worker"].add(DELIVERY_LIMIT_OPTION)
        app.steps["worker"].add(WorkflowsServices)
        app.steps["worker"].add(LeaseRenewal)
        app.steps["worker"].add(WorkerHeartbeat)


@worker_process_init.connect
def _start_services_in_child(**_: Any) -> None:
    for app in _forking_apps:
        # Celery gives a new child worker_proc_alive_timeout to start.
        retry_for_s = max(float(app.conf.worker_proc_alive_timeout) - CHILD_START_MARGIN_S, 0.0)
        try:
            state_for(app).start_services(app, retry_for_s=retry_for_s)
        except Exception:
            # Celery would log this and give the child tasks anyway, which it
            # could not run without its services. The pool starts another child.
            logger.critical("Could not start the services of this worker process", exc_info=True)
            # Not at once, so that a service that always fails to start does not
            # make the pool replace its children as fast as it can.
            time.sleep(CHILD_START_MARGIN_S / 5)
            os._exit(1)


@worker_process_shutdown.connect
def _stop_services_in_child(**_: Any) -> None:
    for app in _forking_apps:
        state_for(app).stop_services()
