"""The embedded mode: kombu's in-memory broker and a Celery worker in this process.

It runs a recipe on a machine with nothing else installed. The worker uses the
solo pool in a background thread, so every step runs in this process and the
run's end is known exactly: it ends when no message is in flight.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, states
from celery import _state as celery_state
from celery.signals import after_task_publish, task_postrun, task_revoked
from celery.utils import timer2
from celery.worker import WorkController, loops
from celery.worker import state as worker_state

from workflows_celery.application import create_app
from workflows_celery.constants import (
    EMBEDDED_BROKER_URL,
    KWARG_QUEUE,
    KWARG_TOPIC,
    STEP_TASK_NAME,
)
from workflows_celery.hosting import state_for
from workflows_celery.messages import Destination, destination_from_kwargs, run_id_of
from workflows_celery.simulate import StepRecord
from workflows_celery.worker import WorkflowsConsumer

logger = logging.getLogger(__name__)

#: Seconds between two polls of the in-memory broker's queues.
EMBEDDED_POLL_INTERVAL_S = 0.005

#: Seconds to wait for the in-process worker to start consuming.
WORKER_START_TIMEOUT_S = 30.0

#: Seconds one wait for messages in the worker's loop, or for due delayed
#: messages in its timer thread, may last. This bounds how long the worker
#: takes to notice that it should stop.
EMBEDDED_WAIT_S = 0.05


class _ShortDrainConnection:
    """A kombu connection whose ``drain_events`` waits at most ``EMBEDDED_WAIT_S``."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def drain_events(self, timeout: float | None = None, **kwargs: Any) -> Any:
        if timeout is None or timeout > EMBEDDED_WAIT_S:
            timeout = EMBEDDED_WAIT_S
        return self._connection.drain_events(timeout=timeout, **kwargs)


class _EmbeddedConsumer(WorkflowsConsumer):
    """A worker consumer that stops within a fraction of a second.

    kombu's in-memory transport has no event loop support, so Celery runs
    ``celery.worker.loops.synloop`` (on the other brokers, see ``loop_args``). In Celery 5.7 each of its cycles waits up
    to 2 s for messages, and it runs one more cycle after it sees the shutdown
    flag, so with those waits leaving ``embedded_worker`` would take about 4 s.
    """

    def loop_args(self) -> tuple[Any, ...]:
        args = list(super().loop_args())
        if self.loop is loops.synloop:
            args[1] = _ShortDrainConnection(args[1])
        elif self.hub is not None and not getattr(self, "_wakes", False):
            # On Redis and RabbitMQ the event loop sleeps until its next timer,
            # up to about 10 s when idle, before it sees the shutdown flag.
            self.hub.call_repeatedly(EMBEDDED_WAIT_S, _wake_up)
            self._wakes = True
        return tuple(args)


def _wake_up() -> None:
    """Do nothing: a timer entry that only makes the event loop look at its flags."""


class _EmbeddedTimer(timer2.Timer):
    """The worker's timer thread for delayed messages, waking every ``EMBEDDED_WAIT_S``.

    In Celery 5.7 an idle ``celery.utils.timer2.Timer`` waits up to 1 s for a
    new entry and checks for shutdown only between waits, so stopping it could
    take a second.
    """

    def _next_entry(self) -> float | None:
        # Celery's own ``Timer._next_entry``, with a shorter wait.
        with self.not_empty:
            delay, entry = next(self.scheduler)
            if entry is None:
                if delay is None:
                    self.not_empty.wait(EMBEDDED_WAIT_S)
                return delay
        return self.schedule.apply_entry(entry)

    __next__ = next = _next_entry


class _EmbeddedWorkController(WorkController):
    """A worker that signals when its consumer is ready."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.consumer_ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.consumer_ready.set()


class FlightTracker:
    """Counts the workflows messages of one app that are sent and not yet processed.

    A message counts from its publication until the step task that carries it
    ends without being requeued, or Celery drops it as expired. Messages to a
    queue that no hosted service reads are counted apart as undeliverable.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._lock = threading.Condition()
        self.in_flight = 0
        self.sent = 0
        self.processed = 0
        self.undeliverable: dict[str, int] = {}
        #: Messages moved to a dead-letter queue, by original queue.
        self.dead_lettered: dict[str, int] = {}
        self.steps: list[StepRecord] = []
        #: Messages in flight by run ID, for runs started from a recipe.
        self.in_flight_by_run: Counter[str] = Counter()
        #: Called with each step message's keyword arguments and routing key
        #: as it is published, for callers that record what was sent.
        self.on_sent: Callable[[dict[str, Any], str | None], None] | None = None

    def connect(self) -> None:
        """Start counting."""
        after_task_publish.connect(self._on_publish, sender=STEP_TASK_NAME, weak=False)
        task_postrun.connect(self._on_postrun, weak=False)
        task_revoked.connect(self._on_revoked, weak=False)

    def disconnect(self) -> None:
        """Stop counting."""
        after_task_publish.disconnect(self._on_publish, sender=STEP_TASK_NAME)
        task_postrun.disconnect(self._on_postrun)
        task_revoked.disconnect(self._on_revoked)

    def wait_until_idle(self, timeout_s: float | None = None, *, run_id: str | None = None) -> bool:
        """Block until no message (of run ``run_id``, if given) is in flight; return False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while (self.in_flight_by_run[run_id] if run_id is not None else self.in_flight) > 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining if remaining is not None else 1.0)
            return True

    def _on_publish(
        self, sender: Any = None, body: Any = None, routing_key: Any = None, **_: Any
    ) -> None:
        if isinstance(body, (str, bytes)):
            # Step messages are published with their body encoded to JSON already.
            body = json.loads(body)
        kwargs = body[1] if isinstance(body, (list, tuple)) and len(body) > 1 else {}
        if not isinstance(kwargs, dict):
            return
        served = set(state_for(self.app).dispatcher.destinations())
        run_id = run_id_of(kwargs)
        with self._lock:
            self.sent += 1
            queue = kwargs.get(KWARG_QUEUE)
            counted = False
            if isinstance(queue, str) and routing_key and routing_key != queue:
                # Published to another queue than the one it names: a dead letter.
                self.dead_lettered[queue] = self.dead_lettered.get(queue, 0) + 1
            elif KWARG_TOPIC in kwargs:
                # A broadcast nobody here listens to is dropped, as in workflows.
                counted = Destination(kwargs[KWARG_TOPIC], is_topic=True) in served
            elif Destination(str(kwargs.get(KWARG_QUEUE)), is_topic=False) in served:
                counted = True
            else:
                queue = str(kwargs.get(KWARG_QUEUE))
                self.undeliverable[queue] = self.undeliverable.get(queue, 0) + 1
            if counted:
                self.in_flight += 1
                if run_id is not None:
                    self.in_flight_by_run[run_id] += 1
        if self.on_sent is not None:
            self.on_sent(kwargs, routing_key)

    def _on_postrun(
        self,
        sender: Any = None,
        state: Any = None,
        retval: Any = None,
        kwargs: Any = None,
        **_: Any,
    ) -> None:
        if getattr(sender, "name", None) != STEP_TASK_NAME:
            return
        if state == states.REJECTED and getattr(retval, "requeue", False):
            return
        record = _step_record(kwargs or {})
        with self._lock:
            if record is not None:
                self.steps.append(record)
        self._finish_one(run_id_of(kwargs or {}))

    def _on_revoked(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        if getattr(request, "task_name", None) == STEP_TASK_NAME or getattr(sender, "name", None) == STEP_TASK_NAME:
            kwargs = getattr(request, "kwargs", None)
            self._finish_one(run_id_of(kwargs) if isinstance(kwargs, dict) else None)

    def _finish_one(self, run_id: str | None) -> None:
        with self._lock:
            self.in_flight = max(self.in_flight - 1, 0)
            if run_id is not None and self.in_flight_by_run[run_id] > 0:
                self.in_flight_by_run[run_id] -= 1
                if not self.in_flight_by_run[run_id]:
                    del self.in_flight_by_run[run_id]
            self.processed += 1
            self._lock.notify_all()


@contextmanager
def embedded_worker(
    services: list[Any], *, app: Celery | None = None, loglevel: str = "WARNING"
) -> Iterator[tuple[Celery, FlightTracker]]:
    """Run a worker hosting ``services`` in this process, on the in-memory broker.

    Yields the app (to send with) and the tracker of messages in flight.
    """
    app = app or create_app(EMBEDDED_BROKER_URL, main="workflows_celery.embedded")
    app.conf.worker_hijack_root_logger = False
    # kombu's in-memory transport polls its queues; its default of one poll a
    # second would add up to a second to every step.
    app.conf.broker_transport_options = {
        **(app.conf.broker_transport_options or {}),
        "polling_interval": EMBEDDED_POLL_INTERVAL_S,
    }
    tracker = FlightTracker(app)
    tracker.connect()
    worker = _EmbeddedWorkController(
        app=app,
        # A node name of its own, so that two embedded workers on one broker do
        # not compete for the same exclusive remote-control queue.
        hostname=f"embedded-{uuid.uuid4().hex[:12]}@{socket.gethostname()}",
        pool="solo",
        concurrency=1,
        loglevel=loglevel,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        ready_callback=None,
        consumer_cls=_EmbeddedConsumer,
        timer_cls=_EmbeddedTimer,
        timer_precision=EMBEDDED_WAIT_S,
        services=services,
        quiet=True,
    )
    # A shutdown command stops the services it names, but never this process.
    state_for(app).shutdown_worker = None

    def work() -> None:
        # Celery's pools look the task up in the current app of the thread
        # that runs it (the worker thread, or its timer thread for delayed
        # messages), so this app becomes the current and the default one.
        app.set_default()
        app.set_current()
        worker.start()

    previous_default_app = celery_state.default_app
    thread = threading.Thread(target=work, name="embedded worker", daemon=True)
    thread.start()
    try:
        if not worker.consumer_ready.wait(WORKER_START_TIMEOUT_S):
            raise RuntimeError("the embedded worker did not start within 30 s")
        yield app, tracker
    finally:
        worker_state.should_terminate = 0
        thread.join(30)
        worker_state.should_terminate = None
        # Otherwise ``celery.current_app`` would stay this stopped app in every
        # thread that has no current app of its own.
        celery_state.set_default_app(previous_default_app)
        tracker.disconnect()


def _step_record(kwargs: dict[str, Any]) -> StepRecord | None:
    """Describe the recipe step a step task ran, from its keyword arguments."""
    destination = destination_from_kwargs(kwargs)
    message = kwargs.get("message")
    headers = kwargs.get("headers") or {}
    if destination is None or not headers.get("workflows-recipe") or not isinstance(message, dict):
        return None
    try:
        node = int(message["recipe-pointer"])
        path = tuple(int(n) for n in message.get("recipe-path") or ())
    except (KeyError, TypeError, ValueError):
        return None
    recipe = message.get("recipe") or {}
    step = recipe.get(str(node), recipe.get(node)) if isinstance(recipe, dict) else None
    service = step.get("service") if isinstance(step, dict) else None
    return StepRecord(
        node=node,
        service=str(service or "-"),
        destination=destination,
        recipe_path=path,
        finished_at=time.monotonic(),
        run_id=run_id_of(kwargs),
    )
