"""Workflows services hosted in a Celery worker process.

Each worker process that executes steps holds its own instance of every hosted
service (:class:`HostedService`), started with ``initializing()`` and stopped
with ``in_shutdown()``. The subscriptions made in ``initializing()`` are bound
to the process's :class:`Dispatcher`; every message then arrives as one
execution of the step task, which hands it to the bound callback.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from workflows.services.common_service import CommonService

from workflows_celery import deadletter, ledger, logcontext
from workflows_celery.constants import KWARG_MESSAGE
from workflows_celery.control import CommandListener
from workflows_celery.errors import (
    ConfigurationError,
    NotARecipeError,
    TransportNotConnectedError,
)
from workflows_celery.messages import (
    Destination,
    OutgoingMessage,
    destination_from_kwargs,
    run_id_of,
)
from workflows_celery.status import StatusReporter, host_id
from workflows_celery.transport import CeleryTransport, Settlement, SubscriptionBinder

logger = logging.getLogger(__name__)

#: Seconds between two attempts to start a service while the broker is unreachable.
START_RETRY_INTERVAL_S = 1.0

# Outcomes of a step message, which the step task returns for Celery's log.
OUTCOME_PROCESSED = "processed"
OUTCOME_PUBLISHED_AGAIN = "published again"
OUTCOME_DEAD_LETTERED = "dead-lettered"
OUTCOME_DROPPED = "dropped: no subscriber to the topic in this process"
OUTCOME_CANCELLED = "dropped: its run was cancelled"

#: The run ledger's outcome for each outcome of a step.
_LEDGER_OUTCOMES = {
    OUTCOME_PROCESSED: "done",
    OUTCOME_DEAD_LETTERED: "dead-lettered",
    OUTCOME_PUBLISHED_AGAIN: "retried",
    OUTCOME_DROPPED: "broadcast",
}



@dataclass
class Handler:
    """One subscription of one hosted service, as the dispatcher sees it."""

    host: HostedService
    transport: CeleryTransport
    subscription_id: int
    destination: Destination

    @property
    def acknowledgement(self) -> bool:
        """True when the service must ack or nack each message itself."""
        return self.transport.requires_ack(self.subscription_id)


class Dispatcher(SubscriptionBinder):
    """Maps each destination to the subscriptions that receive its messages in this process."""

    def __init__(self) -> None:
        self._handlers: dict[Destination, list[Handler]] = {}
        self._lock = threading.Lock()
        self.binding_host: HostedService | None = None

    def bind(self, transport: CeleryTransport, subscription_id: int, destination: Destination) -> None:
        host = self.binding_host
        if host is None:
            raise ConfigurationError(
                f"Subscription to {destination} made outside a hosted service's start"
            )
        with self._lock:
            handlers = self._handlers.setdefault(destination, [])
            if handlers and not destination.is_topic:
                logger.warning(
                    "Both %s and %s subscribe to %s in this worker; each message "
                    "goes to the first only",
                    handlers[0].host.name,
                    host.name,
                    destination,
                )
            handlers.append(Handler(host, transport, subscription_id, destination))

    def unbind(self, transport: CeleryTransport, subscription_id: int) -> None:
        # NOTE: the worker keeps consuming the queue; messages that arrive for it
        # afterwards are returned to the broker for another worker.
        with self._lock:
            for destination, handlers in list(self._handlers.items()):
                handlers[:] = [
                    h
                    for h in handlers
                    if not (h.transport is transport and h.subscription_id == subscription_id)
                ]
                if not handlers:
                    del self._handlers[destination]

    def unbind_transport(self, transport: CeleryTransport) -> None:
        """Stop routing messages to every subscription of ``transport``."""
        with self._lock:
            for destination, handlers in list(self._handlers.items()):
                handlers[:] = [h for h in handlers if h.transport is not transport]
                if not handlers:
                    del self._handlers[destination]

    def handlers_for(self, destination: Destination) -> list[Handler]:
        """Return the subscriptions that receive messages sent to ``destination``."""
        with self._lock:
            handlers = list(self._handlers.get(destination, ()))
        if destination.is_topic:
            return handlers
        return handlers[:1]

    def destinations(self) -> list[Destination]:
        """Return every destination with at least one subscription."""
        with self._lock:
            return list(self._handlers)


class HostedService:
    """One instance of a workflows service living in one worker process.

    Args:
        app: The worker's Celery app.
        service_class: The ``CommonService`` subclass to run, unmodified.
        dispatcher: Where the service's subscriptions are bound.
    """

    def __init__(
        self, app: Celery, service_class: type[CommonService], dispatcher: Dispatcher
    ) -> None:
        self.app = app
        self.service_class = service_class
        self.dispatcher = dispatcher
        self.service: CommonService | None = None
        self.transport: CeleryTransport | None = None
        self.status = CommonService.SERVICE_STATUS_NEW
        self.lock = threading.RLock()
        self.last_activity = time.monotonic()
        self.messages_processed = 0
        self.reporter: StatusReporter | None = None
        self._stopping = threading.Event()
        self._timer: threading.Thread | None = None

    @property
    def name(self) -> str:
        """The service's human-readable name."""
        if self.service is not None:
            return str(self.service.get_name())
        return str(getattr(self.service_class, "_service_name", self.service_class.__name__))

    def start(self) -> None:
        """Construct the service, run ``initializing()`` and start its idle timer."""
        service = self.service_class(environment={})
        transport = CeleryTransport(self.app)
        transport.binder = self.dispatcher
        service.transport = transport
        service.log.setLevel(service.log_verbosity)
        self.service, self.transport = service, transport
        if not transport.connect():
            raise TransportNotConnectedError(f"Service {self.name} cannot reach the broker")
        self.reporter = StatusReporter(
            transport.broadcast_status,
            host_id(self.service_class.__name__),
            self.name,
            self.service_class.__name__,
            state_for(self.app).worker_fields,
            lambda: self.messages_processed,
        )

        with self.lock:
            self.set_status(CommonService.SERVICE_STATUS_STARTING)
            self.dispatcher.binding_host = self
            try:
                with logcontext.step_fields(service, workflows_service=self.name):
                    service.initializing()
            finally:
                self.dispatcher.binding_host = None
                # Later subscriptions (made while processing) use the transport's
                # own consumer thread, as in any other process.
                transport.binder = None
            self.set_status(CommonService.SERVICE_STATUS_IDLE)
        self.last_activity = time.monotonic()
        self._timer = threading.Thread(
            target=self._run_idle_timer, name=f"{self.name} idle timer", daemon=True
        )
        self._timer.start()
        logger.info("Started service %s (%s)", self.name, self.service_class.__name__)

    def stop(self) -> None:
        """Run ``in_shutdown()`` and close the service's connections."""
        self._stopping.set()
        service, transport = self.service, self.transport
        if service is None or transport is None:
            return
        with self.lock:
            self.set_status(CommonService.SERVICE_STATUS_SHUTDOWN)
            try:
                with logcontext.step_fields(service, workflows_service=self.name):
                    service.in_shutdown()
                self.set_status(CommonService.SERVICE_STATUS_END)
            except Exception:
                self.set_status(CommonService.SERVICE_STATUS_ERROR)
                logger.error("Service %s failed in in_shutdown()", self.name, exc_info=True)
            finally:
                transport.disconnect()
        logger.info("Stopped service %s", self.name)

    def run(self, function: Callable[[], Any], fields: Mapping[str, Any]) -> Any:
        """Run a message callback with the service marked as processing."""
        with self.lock:
            self.set_status(CommonService.SERVICE_STATUS_PROCESSING)
            try:
                with logcontext.step_fields(self.service, workflows_service=self.name, **fields):
                    return function()
            finally:
                self.messages_processed += 1
                self.last_activity = time.monotonic()
                self.set_status(CommonService.SERVICE_STATUS_IDLE)

    def set_status(self, status: int) -> None:
        """Set the service's state and broadcast it when that is due."""
        self.status = status
        if self.reporter is not None:
            self.reporter.update(status)

    def _run_idle_timer(self) -> None:
        """Call the ``_register_idle`` callback after each idle period, as workflows does.

        The same thread sends the status heartbeats that fall due while the
        state stays the same.
        """
        while not self._stopping.is_set():
            if self.reporter is not None:
                self.reporter.update()
            service = self.service
            idle_time = getattr(service, "_idle_time", None)
            callback = getattr(service, "_idle_callback", None)
            if not idle_time or callback is None:
                self._stopping.wait(0.5)
                continue
            due = self.last_activity + float(idle_time)
            wait_s = due - time.monotonic()
            if wait_s > 0:
                self._stopping.wait(min(wait_s, 0.5))
                continue
            with self.lock:
                if self._stopping.is_set():
                    return
                self.set_status(CommonService.SERVICE_STATUS_TIMER)
                try:
                    with logcontext.step_fields(service, workflows_service=self.name):
                        callback()
                except Exception:
                    logger.error("Idle timer of service %s failed", self.name, exc_info=True)
                finally:
                    self.last_activity = time.monotonic()
                    self.set_status(CommonService.SERVICE_STATUS_IDLE)


@dataclass
class AppState:
    """The state workflows-celery keeps for one Celery app in this process."""

    service_names: list[Any] = field(default_factory=list)
    function_steps: list[type[CommonService]] = field(default_factory=list)
    dispatcher: Dispatcher = field(default_factory=Dispatcher)
    hosts: list[HostedService] = field(default_factory=list)
    service_classes: list[type[CommonService]] = field(default_factory=list)
    #: True in a worker whose pool forks children that start their own services.
    start_in_children: bool = False
    #: Celery fields of the worker, added to every status heartbeat.
    worker_fields: dict[str, Any] = field(default_factory=dict)
    #: Stops the worker once a process has no service left (None: do nothing).
    shutdown_worker: Callable[[], None] | None = None
    command_listener: CommandListener | None = None

    def start_services(self, app: Celery, *, retry_for_s: float = 0.0) -> None:
        """Start one instance of every hosted service in this process.

        Args:
            app: The worker's app.
            retry_for_s: Seconds to keep trying while the broker cannot be
                reached (it may be restarting).

        Raises:
            TransportNotConnectedError: the broker could not be reached in time.
        """
        logcontext.install()
        deadline = time.monotonic() + retry_for_s
        for service_class in self.service_classes:
            while True:
                host = HostedService(app, service_class, self.dispatcher)
                try:
                    host.start()
                    break
                except TransportNotConnectedError as error:
                    if time.monotonic() >= deadline:
                        raise
                    logger.warning("%s; trying again in %.0f s", error, START_RETRY_INTERVAL_S)
                    time.sleep(START_RETRY_INTERVAL_S)
            self.hosts.append(host)
        if self.hosts and self.command_listener is None:
            self.command_listener = CommandListener(app, self)
            self.command_listener.start()

    def stop_host(self, host: HostedService) -> None:
        """Stop one service; the worker no longer hands its messages to it."""
        if host in self.hosts:
            self.hosts.remove(host)
        if host.transport is not None:
            self.dispatcher.unbind_transport(host.transport)
        host.stop()

    def stop_services(self) -> None:
        """Stop every service started by :meth:`start_services`, newest first."""
        listener, self.command_listener = self.command_listener, None
        if listener is not None:
            listener.stop()
        while self.hosts:
            self.hosts.pop().stop()


_states: weakref.WeakKeyDictionary[Celery, AppState] = weakref.WeakKeyDictionary()


def state_for(app: Celery) -> AppState:
    """Return the workflows-celery state of ``app``, creating it on first use."""
    state = _states.get(app)
    if state is None:
        state = _states[app] = AppState()
    return state


def run_step(task: Task, **kwargs: Any) -> str:
    """Body of the step task: run the step, and record it in the run ledger.

    A recipe message of a cancelled run is dropped here, before any service
    receives it. See :func:`_run_step` for the step itself.
    """
    recorder = ledger.ledger_for(task.app)
    run_id = run_id_of(kwargs) if recorder is not None else None
    destination = destination_from_kwargs(kwargs)
    if recorder is None or run_id is None or destination is None:
        return _run_step(task, **kwargs)

    request = task.request
    message = kwargs.get(KWARG_MESSAGE)
    started_at = time.time()

    def record(outcome: str, sends: list[OutgoingMessage], error: str | None = None) -> None:
        recorder.record_step(run_id, _ledger_step(request, destination, message, started_at, outcome, error), sends)

    if not destination.is_topic and recorder.is_cancelled(run_id):
        logger.info("Dropped message %s on %s: run %s was cancelled", request.id, destination, run_id)
        record(ledger.STEP_CANCELLED, [])
        return OUTCOME_CANCELLED

    with ledger.step_sends(run_id) as sends:
        outcome = ledger.STEP_RETRIED
        try:
            result = _run_step(task, **kwargs)
            outcome = _LEDGER_OUTCOMES.get(result, ledger.STEP_RETRIED)
            return result
        except Reject:
            raise
        except Exception as error:
            # _run_step dead-letters the message of a queue before it raises.
            outcome = ledger.STEP_DEAD_LETTERED
            sends.error = sends.error or repr(error)
            raise
        finally:
            # A broadcast was never counted as in flight, so it cannot end or fail the run.
            record(ledger.STEP_BROADCAST if destination.is_topic else outcome, sends.messages, sends.error)


def _ledger_step(
    request: Any,
    destination: Destination,
    message: Any,
    started_at: float,
    outcome: str,
    error: str | None,
) -> ledger.LedgerStep:
    """Describe a step for the run ledger."""
    node = service = sender = None
    if isinstance(message, Mapping):
        node = _int_or_none(message.get("recipe-pointer"))
        path = message.get("recipe-path") or []
        sender = _int_or_none(path[-1]) if path else None
        recipe = message.get("recipe")
        step = recipe.get(str(node), recipe.get(node)) if isinstance(recipe, Mapping) else None
        service = step.get("service") if isinstance(step, Mapping) else None
    return ledger.LedgerStep(
        node=node,
        service=str(service or "-"),
        destination=str(destination),
        worker=str(getattr(request, "hostname", None) or socket.gethostname()),
        started_at=started_at,
        ended_at=time.time(),
        outcome=outcome,
        sender=sender,
        message_id=str(request.id),
        error=error,
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _run_step(task: Task, **kwargs: Any) -> str:
    """Hand one message to the subscriptions of its destination.

    A message that must be processed again is published again with its
    delivery count raised. One that cannot be processed goes to its dead-letter
    queue (see :mod:`workflows_celery.deadletter`). The original is acked either
    way, unless the broker could not be reached: then it is returned to the
    broker, which delivers it again.

    Returns:
        What became of the message, in a few words, which Celery logs as the
        task's result ("processed", "dead-lettered", ...).
    """
    request = task.request
    app = task.app
    destination = destination_from_kwargs(kwargs)
    if destination is None:
        routing_key = (request.delivery_info or {}).get("routing_key") or "unknown"
        logger.error("Step message %s names no queue or topic: %.1000r", request.id, kwargs)
        deadletter.dead_letter(
            app,
            Destination(str(routing_key)),
            {},
            kwargs,
            message_id=str(request.id),
            reason=deadletter.REASON_REJECTED,
            error="the step message names no queue or topic",
        )
        return OUTCOME_DEAD_LETTERED
    headers = dict(kwargs.get("headers") or {})
    message = kwargs.get("message")
    delivery = _Redelivery(app, destination, headers, message, request)

    if (request.delivery_info or {}).get("redelivered") and not destination.is_topic:
        # The broker delivers it again because a worker or a connection was
        # lost while it was being processed: that delivery counts too.
        return delivery.again("delivered again after a lost worker or connection")

    handlers = state_for(app).dispatcher.handlers_for(destination)
    if not handlers:
        if destination.is_topic:
            logger.debug("No subscriber to %s in this process; broadcast dropped", destination)
            return OUTCOME_DROPPED
        logger.error(
            "No service in this worker process reads %s (message %s)", destination, request.id
        )
        return delivery.again("no service in the worker process reads it")

    fields = logcontext.recipe_fields(headers, message)
    for handler in handlers:
        try:
            outcome = _deliver(handler, request, destination, headers, message, fields)
        except NotARecipeError as error:
            # Logged as it is dead-lettered.
            return delivery.dead(deadletter.REASON_REJECTED, str(error))
        except TransportNotConnectedError as error:
            # The broker went away in the middle of the step. Nothing of its
            # transaction was published, so the message goes back to be done again.
            logger.warning(
                "Step for message %s on %s returned to the queue: %s",
                request.id,
                destination,
                error,
            )
            raise Reject(str(error), requeue=True) from error
        except Exception as error:
            if not destination.is_topic:
                delivery.dead(deadletter.REASON_FAILED, f"{handler.host.name} raised {error!r}")
            raise
        if outcome is None or outcome.acked:
            continue
        if outcome.nacked and not outcome.requeue:
            detail = f": {outcome.reason}" if outcome.reason else ""
            return delivery.dead(deadletter.REASON_REJECTED, f"rejected by {handler.host.name}{detail}")
        if outcome.nacked:
            return delivery.again(f"nacked by {handler.host.name}")
        logger.warning(
            "Service %s returned without ack or nack for message %s on %s",
            handler.host.name,
            request.id,
            destination,
        )
        return delivery.again(f"{handler.host.name} returned without ack or nack")
    return OUTCOME_PROCESSED


class _Redelivery:
    """The message a step task is running, ready to be published again or dead-lettered."""

    def __init__(
        self,
        app: Celery,
        destination: Destination,
        headers: dict[str, Any],
        message: Any,
        request: Any,
    ) -> None:
        self.app = app
        self.destination = destination
        self.headers = headers
        self.message = message
        self.message_id = str(request.id)
        self.eta = request.eta
        self.expires = request.expires

    def again(self, why: str) -> str:
        """Publish the message again, or dead-letter it at the delivery limit; return which."""
        ledger.note_step_error(why)
        published = deadletter.redeliver(
            self.app,
            self.destination,
            self.headers,
            self.message,
            message_id=self.message_id,
            why=why,
            eta=self.eta if isinstance(self.eta, str) else None,
            expires_at=self.expires if isinstance(self.expires, str) else None,
        )
        return OUTCOME_PUBLISHED_AGAIN if published else OUTCOME_DEAD_LETTERED

    def dead(self, reason: str, error: str) -> str:
        """Move the message to its dead-letter queue."""
        ledger.note_step_error(error)
        deadletter.dead_letter(
            self.app,
            self.destination,
            self.headers,
            self.message,
            message_id=self.message_id,
            reason=reason,
            error=error,
        )
        return OUTCOME_DEAD_LETTERED


def _deliver(
    handler: Handler,
    request: Any,
    destination: Destination,
    headers: dict[str, Any],
    message: Any,
    fields: Mapping[str, Any],
) -> Settlement | None:
    """Run one subscription's callback; return how an acknowledged message was settled."""
    outcome = Settlement()

    def settle(result: Settlement) -> None:
        outcome.acked, outcome.nacked, outcome.requeue = result.acked, result.nacked, result.requeue
        outcome.reason = result.reason

    message_id = str(request.id)
    try:
        handler.host.run(
            lambda: handler.transport.deliver(
                handler.subscription_id,
                destination,
                headers,
                message,
                message_id=message_id,
                delivery_info=request.delivery_info,
                settle=settle,
            ),
            fields,
        )
    finally:
        # NOTE: a service that acks later, after its callback returned, is not
        # supported here: the step ends with the callback.
        handler.transport.forget_delivery(handler.subscription_id, message_id)
    return outcome if handler.acknowledgement else None
