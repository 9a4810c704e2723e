"""Running services and recipes inside a test, and reading what each step sent.

:func:`embedded_harness` hosts services in an embedded worker (kombu's in-memory
broker and a worker thread in this process), so a test needs no broker and no
Docker. The harness starts runs, waits for them to end, and records every
message a step or the test published: which run and node sent it, to which
node and destination, with which payload. The pytest fixtures in
:mod:`workflows_celery.pytest_plugin` are built on it, and code that is not
run by pytest can use it directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, current_task

from workflows_celery.canvas import start_recipe
from workflows_celery.constants import (
    EMBEDDED_BROKER_URL,
    HEADER_RECIPE,
    KWARG_HEADERS,
    KWARG_MESSAGE,
    KWARG_QUEUE,
    STATUS_TOPIC,
)
from workflows_celery.deadletter import dead_letter_queue
from workflows_celery.embedded import FlightTracker, embedded_worker
from workflows_celery.messages import Destination, destination_from_kwargs, run_id_of
from workflows_celery.recipes import RecipeSource
from workflows_celery.simulate import StepRecord
from workflows_celery.transport import CeleryTransport

logger = logging.getLogger(__name__)

_STATUS = Destination(STATUS_TOPIC, is_topic=True)

#: Seconds a run may take to end before :meth:`Run.wait` gives up.
DEFAULT_RUN_TIMEOUT_S = 30.0


class RunTimeoutError(AssertionError):
    """Raised when a run or the harness still has messages in flight after the timeout.

    It is an ``AssertionError`` so that pytest reports it as a test failure.
    """


@dataclass(frozen=True)
class SentMessage:
    """One message as it was published.

    Attributes:
        run_id: The run it belongs to: the recipe's ``environment["ID"]``, or
            for a plain message sent during a step, that step's run.
        sender: The recipe node whose step sent it; ``None`` for a run's first
            messages and for messages sent from outside any step.
        node: The recipe node it is addressed to (``recipe-pointer``); ``None``
            for a message without a recipe.
        destination: The queue or topic it went to.
        payload: The payload the receiving callback gets.
        headers: The headers the sender gave.
    """

    run_id: str | None
    sender: int | None
    node: int | None
    destination: Destination
    payload: Any
    headers: dict[str, Any] = field(default_factory=dict)


def _sent_message(kwargs: dict[str, Any]) -> SentMessage | None:
    """Describe a published step task from its keyword arguments."""
    destination = destination_from_kwargs(kwargs)
    if destination is None:
        return None
    headers = kwargs.get(KWARG_HEADERS)
    headers = dict(headers) if isinstance(headers, dict) else {}
    message = kwargs.get(KWARG_MESSAGE)
    if destination == _STATUS:
        # Heartbeats come from the worker, even when one falls due during a step.
        return SentMessage(None, None, None, destination, message, headers)
    # The step running in this thread, if any, sent the message. Its recipe
    # path cannot tell: a checkpoint keeps the path it arrived with.
    step_run_id, sender = _running_step()
    if headers.get(HEADER_RECIPE) and isinstance(message, dict):
        return SentMessage(
            run_id=run_id_of(kwargs),
            sender=sender,
            node=_node_number(message.get("recipe-pointer")),
            destination=destination,
            payload=message.get("payload"),
            headers=headers,
        )
    return SentMessage(
        run_id=step_run_id, sender=sender, node=None, destination=destination, payload=message, headers=headers
    )


def _running_step() -> tuple[str | None, int | None]:
    """Return the run ID and node of the step task running in this thread, if any."""
    request_kwargs = getattr(getattr(current_task, "request", None), "kwargs", None)
    if not isinstance(request_kwargs, dict):
        return None, None
    message = request_kwargs.get(KWARG_MESSAGE)
    headers = request_kwargs.get(KWARG_HEADERS)
    if not isinstance(headers, dict) or not headers.get(HEADER_RECIPE) or not isinstance(message, dict):
        return run_id_of(request_kwargs), None
    return run_id_of(request_kwargs), _node_number(message.get("recipe-pointer"))


def _node_number(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class Run:
    """One run started by a :class:`WorkflowsHarness`, and what its steps did."""

    def __init__(self, harness: WorkflowsHarness, run_id: str) -> None:
        self.harness = harness
        self.id = run_id

    def __repr__(self) -> str:
        return f"<Run {self.id}>"

    def wait(self, timeout_s: float = DEFAULT_RUN_TIMEOUT_S) -> Run:
        """Wait until no message of this run is in flight, and return the run.

        A message counts as in flight until the step it starts has ended,
        including messages that wait out a ``transport-delay`` and checkpoints.
        Messages to queues and topics that no hosted service reads do not
        count: they are kept in :attr:`sent`.

        Raises:
            RunTimeoutError: messages of this run are still in flight after ``timeout_s``.
        """
        tracker = self.harness.tracker
        if not tracker.wait_until_idle(timeout_s, run_id=self.id):
            raise RunTimeoutError(
                f"run {self.id} still had {tracker.in_flight_by_run[self.id]} message(s) "
                f"in flight after {timeout_s} s; its steps so far: {self.nodes_run()}. "
                "Raise timeout_s if a step is slow or delayed, or check the worker log "
                "for a step that keeps failing"
            )
        return self

    @property
    def steps(self) -> list[StepRecord]:
        """The steps of this run that have ended, in the order they ended."""
        return [step for step in self.harness.steps if step.run_id == self.id]

    @property
    def sent(self) -> list[SentMessage]:
        """Every message of this run, in the order it was published."""
        return [message for message in self.harness.sent if message.run_id == self.id]

    def nodes_run(self) -> list[int]:
        """Return the nodes whose steps ended, sorted, once per step (a node may run several times)."""
        return sorted(step.node for step in self.steps)

    def sent_by(self, node: int | None) -> list[SentMessage]:
        """Return the messages that node ``node``'s steps sent (``None``: the run's first messages)."""
        return [message for message in self.sent if message.sender == node]

    def payloads_sent_by(self, node: int | None) -> list[Any]:
        """Return the payloads of :meth:`sent_by`."""
        return [message.payload for message in self.sent_by(node)]

    def payloads_to(self, node: int) -> list[Any]:
        """Return the payloads of the messages addressed to node ``node``."""
        return [message.payload for message in self.sent if message.node == node]


class WorkflowsHarness:
    """An embedded worker for tests, with what it was sent; see :func:`embedded_harness`."""

    def __init__(self, app: Celery, tracker: FlightTracker) -> None:
        self.app = app
        self.tracker = tracker
        self._lock = threading.Lock()
        self._sent: list[SentMessage] = []
        self._transport: CeleryTransport | None = None
        tracker.on_sent = self._record

    def _record(self, kwargs: dict[str, Any], routing_key: str | None) -> None:
        queue = kwargs.get(KWARG_QUEUE)
        if isinstance(queue, str) and routing_key and routing_key != queue:
            # A message moved to its dead-letter queue was counted when first sent.
            return
        sent = _sent_message(kwargs)
        if sent is not None:
            with self._lock:
                self._sent.append(sent)

    @property
    def sent(self) -> list[SentMessage]:
        """Every message published on this harness's app, in order."""
        with self._lock:
            return list(self._sent)

    @property
    def steps(self) -> list[StepRecord]:
        """Every recipe step that has ended, in order."""
        return list(self.tracker.steps)

    @property
    def dead_lettered(self) -> dict[str, int]:
        """How many messages went to a dead-letter queue, by the queue they came from."""
        return dict(self.tracker.dead_lettered)

    def sent_to(self, destination: str, *, topic: bool = False) -> list[SentMessage]:
        """Return the messages sent to the queue (or with ``topic``, the topic) ``destination``."""
        expected = Destination(destination, is_topic=topic)
        return [message for message in self.sent if message.destination == expected]

    def start(
        self,
        recipe: RecipeSource,
        parameters: Mapping[str, Any] | None = None,
        *,
        environment: Mapping[str, Any] | None = None,
    ) -> Run:
        """Start a run of ``recipe`` and return it without waiting.

        Raises:
            InvalidRecipeError: the recipe is invalid or a destination is unresolved.
        """
        run_id = start_recipe(recipe, parameters, environment=environment, app=self.app)
        return Run(self, run_id)

    def run(
        self,
        recipe: RecipeSource,
        parameters: Mapping[str, Any] | None = None,
        *,
        environment: Mapping[str, Any] | None = None,
        timeout_s: float = DEFAULT_RUN_TIMEOUT_S,
    ) -> Run:
        """Start a run of ``recipe``, wait until it ends, and return it.

        Raises:
            InvalidRecipeError: the recipe is invalid or a destination is unresolved.
            RunTimeoutError: the run did not end within ``timeout_s``.
        """
        return self.start(recipe, parameters, environment=environment).wait(timeout_s)

    def send(self, queue: str, message: Any, *, headers: Mapping[str, Any] | None = None) -> None:
        """Send a plain message (no recipe) to ``queue``, as a workflows client would."""
        if self._transport is None:
            self._transport = CeleryTransport(self.app)
            self._transport.connect()
        self._transport.send(queue, message, headers=dict(headers or {}))

    def wait_until_idle(self, timeout_s: float = DEFAULT_RUN_TIMEOUT_S) -> None:
        """Wait until no message of any run, nor any plain message, is in flight.

        Raises:
            RunTimeoutError: messages are still in flight after ``timeout_s``.
        """
        if not self.tracker.wait_until_idle(timeout_s):
            raise RunTimeoutError(
                f"{self.tracker.in_flight} message(s) still in flight after {timeout_s} s"
            )

    def close(self) -> None:
        """Disconnect the harness's own sending transport."""
        if self._transport is not None:
            self._transport.disconnect()
            self._transport = None
        self.tracker.on_sent = None


@contextmanager
def embedded_harness(
    services: list[Any], *, app: Celery | None = None, loglevel: str = "WARNING"
) -> Iterator[WorkflowsHarness]:
    """Host ``services`` in an embedded worker for the duration of a ``with`` block.

    Args:
        services: Service classes, entry-point names or ``module:Class`` paths.
        app: An app on the in-memory broker (``memory://``), for example one on
            which ``recipe_step`` functions are registered; a new one by default.
        loglevel: Log level of the embedded worker.

    The in-memory broker keeps its queues for the life of the process. Queues
    that received messages no hosted service read are purged when the block
    ends, so one test's leftovers never reach the next test's services.
    """
    if app is None:
        from workflows_celery.application import create_app

        app = create_app(EMBEDDED_BROKER_URL, main="workflows_celery.testing")
    with embedded_worker(services, app=app, loglevel=loglevel) as (worker_app, tracker):
        harness = WorkflowsHarness(worker_app, tracker)
        try:
            yield harness
        finally:
            harness.close()
            _purge_leftovers(worker_app, tracker)


def _purge_leftovers(app: Celery, tracker: FlightTracker) -> None:
    """Empty the in-memory queues that received messages no hosted service read."""
    names = set(tracker.undeliverable) | {dead_letter_queue(name) for name in tracker.dead_lettered}
    if not names:
        return
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in sorted(names):
            purged = channel.queue_purge(name)
            if purged:
                logger.debug("Purged %d message(s) left on queue %s", purged, name)
