"""Helpers shared by the broker tests: bounded waits, a recording callback, and
a harness that makes transports and queue names and deletes them afterwards."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu import Queue
from kombu.message import Message

from workflows_celery import routing
from workflows_celery.deadletter import dead_letter_queue
from workflows_celery.redaction import mask_url
from workflows_celery.transport import CeleryTransport

logger = logging.getLogger(__name__)

#: Seconds any single expected outcome may take; generous, because the test
#: machine is shared and noisy.
TIMEOUT_S = 15.0

#: Seconds a message may seem to arrive before its ETA. The test reads the clock
#: before Celery computes the ETA, so this only absorbs float rounding.
EARLY_TOLERANCE_S = 0.05

#: Seconds to keep watching for a message that must not arrive, once a later
#: message on the same queue has already arrived.
QUIET_PERIOD_S = 0.3


def wait_for(predicate: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` has passed; return its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def stays_false(predicate: Callable[[], bool], period_s: float = QUIET_PERIOD_S) -> bool:
    """Return True when ``predicate`` stays false for the whole of ``period_s``."""
    deadline = time.monotonic() + period_s
    while time.monotonic() < deadline:
        if predicate():
            return False
        time.sleep(0.01)
    return not predicate()


class Recorder:
    """A subscription callback that records every delivery with its arrival time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.deliveries: list[tuple[dict[str, Any], Any, float]] = []

    def __call__(self, header: Any, message: Any) -> None:
        with self._lock:
            self.deliveries.append((dict(header), message, time.time()))

    @property
    def messages(self) -> list[Any]:
        with self._lock:
            return [message for _, message, _ in self.deliveries]

    @property
    def headers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [header for header, _, _ in self.deliveries]

    def received(self, message: Any) -> bool:
        return message in self.messages

    def count(self, message: Any) -> int:
        return self.messages.count(message)

    def arrival(self, message: Any) -> float:
        with self._lock:
            return next(at for _, body, at in self.deliveries if body == message)

    def header_of(self, message: Any) -> dict[str, Any]:
        with self._lock:
            return next(header for header, body, _ in self.deliveries if body == message)


class Harness:
    """Makes connected transports and unique names on one broker, and cleans both up."""

    def __init__(self, app: Celery, suffix: str) -> None:
        self.app = app
        self.suffix = suffix
        self._transports: list[CeleryTransport] = []
        self._queues: list[Queue] = []

    def transport(self) -> CeleryTransport:
        transport = CeleryTransport(self.app)
        self._transports.append(transport)
        assert transport.connect(), f"cannot connect to {mask_url(self.app.conf.broker_url)}"
        return transport

    def queue(self, label: str) -> str:
        name = f"test.transport.{self.suffix}.{label}"
        self._queues.append(routing.task_queue(name))
        self._queues.append(routing.task_queue(dead_letter_queue(name)))
        return name

    def track_temporary(self, name: str) -> None:
        """Delete this temporary queue at the end, which Redis never does by itself."""
        self._queues.append(routing.temporary_queue(name))

    def topic(self, label: str) -> str:
        return f"test.transport.{self.suffix}.{label}"

    def close(self) -> None:
        # In parallel, because kombu's Redis transport waits for its pending
        # BRPOP (1 s by default) when it closes a channel.
        stoppers = [
            threading.Thread(target=transport.disconnect) for transport in self._transports
        ]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(TIMEOUT_S)
        with self.app.connection_for_write() as connection:
            for queue in self._queues:
                self._delete_queue(connection, queue)

    @staticmethod
    def _delete_queue(connection: Any, queue: Queue) -> None:
        # A channel each, because RabbitMQ closes the channel on which a queue
        # is not found.
        with connection.channel() as channel:
            bound = queue.bind(channel)
            try:
                # kombu's Redis transport deletes only the queues bound to an
                # exchange in this process, which excludes every queue here,
                # but a purge deletes the Redis list.
                bound.purge()
                bound.delete()
            except connection.channel_errors:
                # RabbitMQ has already deleted this auto-delete queue.
                logger.debug("Test queue %s already deleted", queue.name)


def delete_queues(app: Celery, names: list[str]) -> None:
    """Purge and delete durable queues by name, ignoring those that do not exist."""
    with app.connection_for_write() as connection:
        for name in names:
            # A channel each, because RabbitMQ closes the channel on which a
            # queue is not found.
            with connection.channel() as channel:
                bound = routing.task_queue(name).bind(channel)
                try:
                    bound.purge()
                    bound.delete()
                except connection.channel_errors:
                    logger.debug("Test queue %s already deleted", name)


def read_dead_letters(
    app: Celery, name: str, expected: int = 1, timeout_s: float = TIMEOUT_S
) -> list[Message]:
    """Take up to ``expected`` messages off the dead-letter queue of ``name``.

    The messages are not decoded, so bodies of any content type can be read.
    """
    found: list[Message] = []
    deadline = time.monotonic() + timeout_s
    with app.connection_for_read() as connection:
        with connection.channel() as channel:
            dead_letters = routing.task_queue(dead_letter_queue(name)).bind(channel)
            dead_letters.declare()
            while len(found) < expected and time.monotonic() < deadline:
                message = dead_letters.get(no_ack=True)
                if message is None:
                    time.sleep(0.05)
                    continue
                found.append(message)
    return found
