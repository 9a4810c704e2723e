"""A kombu consumer thread for processes that subscribe outside a Celery worker.

Scripts, monitors and web apps that call ``subscribe`` get their messages from
this thread. kombu connections are not thread-safe, so every broker operation
(consume, ack, reject) runs on the thread itself: other threads post requests to
it and, where they need the outcome, wait on a future.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import kombu.exceptions
from celery import Celery
from kombu import Consumer, Queue
from kombu.message import Message

from workflows_celery.constants import STEP_TASK_NAME
from workflows_celery.leases import (
    held_delivery_tags,
    renew,
    renewal_interval_s,
    uses_redis,
)
from workflows_celery.messages import Destination, destination_from_kwargs

logger = logging.getLogger(__name__)

#: Seconds one wait for broker events may block, which bounds how long a
#: posted ack or a new subscription waits for the thread.
POLL_INTERVAL_S = 0.05

#: Seconds between attempts to reach the broker again after a connection loss.
RECONNECT_INTERVAL_S = 1.0

#: Seconds to wait for Redis to confirm a topic subscription (PSUBSCRIBE).
SUBSCRIBE_CONFIRM_TIMEOUT_S = 5.0

DeliveryHandler = Callable[[int, Destination, dict[str, Any], Any, Message], None]


@dataclass
class _Subscription:
    queue: Queue
    prefetch_count: int
    auto_ack: bool
    consumer: Consumer | None = None
    #: Messages received but held back until their ETA.
    held_for_eta: int = 0


def _parse_time(value: Any) -> float | None:
    """Convert a Celery ETA or expiry header (ISO 8601) to a Unix timestamp."""
    if not value:
        return None
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


class Listener(threading.Thread):
    """Consume workflows messages from a broker on a background thread.

    Args:
        app: The Celery app whose broker settings are used.
        on_delivery: Called on this thread with the subscription id, the
            destination, the sender's headers, the message and the kombu message
            for every message that is due.
    """

    def __init__(self, app: Celery, on_delivery: DeliveryHandler) -> None:
        super().__init__(name="workflows-celery listener", daemon=True)
        self._app = app
        self._on_delivery = on_delivery
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._subscriptions: dict[int, _Subscription] = {}
        self._delayed: list[tuple[float, int, int, Message]] = []
        self._delay_order = itertools.count()
        self._stopping = threading.Event()
        self._connection: Any = None
        self.connected = threading.Event()

    # -- API for other threads ------------------------------------------------

    def call(self, function: Callable[[], Any], timeout_s: float | None = 30.0) -> Any:
        """Run ``function`` on the listener thread and return its result."""
        if threading.get_ident() == self.ident:
            return function()
        future: Future[Any] = Future()
        self._requests.put((function, future))
        return future.result(timeout=timeout_s)

    def post(self, function: Callable[[], Any]) -> None:
        """Run ``function`` on the listener thread without waiting for it."""
        if threading.get_ident() == self.ident:
            function()
            return
        self._requests.put((function, Future()))

    def add_subscription(
        self, subscription_id: int, queue_: Queue, *, prefetch_count: int, auto_ack: bool
    ) -> None:
        """Start consuming ``queue_``; returns once the broker accepted it."""
        subscription = _Subscription(queue_, max(prefetch_count, 1), auto_ack)

        def add() -> None:
            self._subscriptions[subscription_id] = subscription
            if self._connection is not None:
                self._start_consumer(subscription_id, subscription)

        self.call(add)

    def remove_subscription(self, subscription_id: int) -> None:
        """Stop consuming for one subscription; messages already received stay valid."""

        def remove() -> None:
            subscription = self._subscriptions.pop(subscription_id, None)
            if subscription and subscription.consumer is not None:
                try:
                    subscription.consumer.cancel()
                except self._connection_errors():
                    logger.debug("Consumer of subscription %d already gone", subscription_id)

        self.call(remove)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; unacknowledged messages go back to the broker."""
        self._stopping.set()
        if self.is_alive() and threading.get_ident() != self.ident:
            self.join(timeout_s)

    # -- The thread -------------------------------------------------------------

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._connect()
                self._serve()
            except self._connection_errors() as error:
                self.connected.clear()
                logger.warning(
                    "Lost the broker connection (%s); reconnecting in %.0f s, "
                    "unacknowledged messages will be delivered again",
                    error,
                    RECONNECT_INTERVAL_S,
                )
                self._close_connection()
                self._stopping.wait(RECONNECT_INTERVAL_S)
        self._settle_before_closing()
        self._close_connection()
        self._fail_pending_requests()

    def _settle_before_closing(self) -> None:
        """Run requests posted before ``stop()``, such as acks, before the connection closes."""
        if self._connection is None:
            return
        try:
            self._run_requests()
        except self._connection_errors() as error:
            logger.warning(
                "Lost the broker connection while stopping (%s); unsettled messages "
                "will be delivered again",
                error,
            )

    def _connect(self) -> None:
        self._connection = self._app.connection_for_read()
        self._connection.ensure_connection(max_retries=1)
        self._delayed.clear()
        for subscription_id, subscription in self._subscriptions.items():
            self._start_consumer(subscription_id, subscription)
        self.connected.set()

    def _serve(self) -> None:
        renewing = uses_redis(self._app)
        interval_s = renewal_interval_s(self._app)
        next_renewal = time.monotonic() + interval_s
        while not self._stopping.is_set():
            self._run_requests()
            self._release_due_messages()
            if renewing and time.monotonic() >= next_renewal:
                self._renew_leases()
                next_renewal = time.monotonic() + interval_s
            try:
                self._connection.drain_events(timeout=POLL_INTERVAL_S)
            except socket.timeout:
                pass
            except TimeoutError:
                pass

    def _renew_leases(self) -> None:
        """Keep the messages held here (delayed or awaiting an ack) invisible on Redis."""
        tags = [
            tag
            for subscription in self._subscriptions.values()
            if subscription.consumer is not None
            for tag in held_delivery_tags(subscription.consumer.channel)
        ]
        renew(self._connection, tags)

    def _run_requests(self) -> None:
        while True:
            try:
                function, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function())
            except BaseException as error:  # handed to the waiting thread
                future.set_exception(error)
                if isinstance(error, self._connection_errors()):
                    raise

    def _fail_pending_requests(self) -> None:
        while True:
            try:
                _, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the listener thread has stopped"))

    def _close_connection(self) -> None:
        for subscription in self._subscriptions.values():
            subscription.consumer = None
        if self._connection is not None:
            try:
                self._connection.release()
            except Exception:  # the connection is being discarded either way
                logger.debug("Error while closing the broker connection", exc_info=True)
            self._connection = None

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        connection = self._connection or self._app.connection_for_read()
        # kombu raises OperationalError when ensure_connection gives up.
        return (
            kombu.exceptions.OperationalError,
            *connection.connection_errors,
            *connection.channel_errors,
        )

    def _start_consumer(self, subscription_id: int, subscription: _Subscription) -> None:
        channel = self._connection.channel()
        consumer = Consumer(
            channel,
            queues=[subscription.queue],
            accept=["json"],
            callbacks=[lambda body, message: self._receive(subscription_id, body, message)],
            on_decode_error=self._reject_undecodable,
        )
        subscription.consumer = consumer
        subscription.held_for_eta = 0
        self._apply_prefetch(subscription)
        consumer.consume()
        self._confirm_topic_subscription(consumer)

    def _apply_prefetch(self, subscription: _Subscription) -> None:
        """Set the prefetch limit, raised by one for every message held until its ETA.

        Without the raise a held message takes the only prefetch slot and blocks
        every later message on the queue until its ETA. Celery's worker raises its
        limit for ETA tasks in the same way. RabbitMQ applies a per-consumer limit
        only to consumers started after it is set (kombu reports this as
        ``qos_semantics_matches_spec`` False), so there the limit is set on the
        channel, which has this one consumer, as Celery's worker also does.
        """
        if subscription.consumer is None:
            return
        subscription.consumer.qos(
            prefetch_count=subscription.prefetch_count + subscription.held_for_eta,
            apply_global=not self._connection.qos_semantics_matches_spec,
        )

    @staticmethod
    def _confirm_topic_subscription(consumer: Consumer) -> None:
        """Subscribe a Redis topic queue now and wait until Redis confirms it.

        kombu's Redis transport sends PSUBSCRIBE only at its next poll, and
        Redis drops a broadcast published before that, so a broadcast sent right
        after ``subscribe_broadcast`` returned could be lost.
        """
        channel: Any = consumer.channel
        poller = getattr(channel.connection, "cycle", None)
        register_listen = getattr(poller, "_register_LISTEN", None)
        if not getattr(channel, "active_fanout_queues", None) or register_listen is None:
            return
        # NOTE: kombu offers no public call for this. ``_register_LISTEN`` is
        # what kombu.transport.redis (5.x) runs at the start of its next poll,
        # and it does nothing there once the channel is subscribed.
        register_listen(channel)
        if not channel.subclient.connection.can_read(timeout=SUBSCRIBE_CONFIRM_TIMEOUT_S):
            logger.warning(
                "Redis did not confirm the topic subscription within %.0f s; "
                "broadcasts sent meanwhile may be missed",
                SUBSCRIBE_CONFIRM_TIMEOUT_S,
            )

    # -- Messages -------------------------------------------------------------

    def _receive(self, subscription_id: int, body: Any, message: Message) -> None:
        """Check one message, then hold it until its ETA or hand it over."""
        headers = message.headers or {}
        if headers.get("task") != STEP_TASK_NAME or not isinstance(body, (list, tuple)):
            # NOTE: such a message is rejected without a dead-letter copy; the
            # log line below is the only record of it.
            logger.error(
                "Rejected a message that is not a workflows message (task %r) on "
                "subscription %d: %.1000r",
                headers.get("task"),
                subscription_id,
                body,
            )
            message.reject(requeue=False)
            return

        expires_at = _parse_time(headers.get("expires"))
        if expires_at is not None and expires_at <= time.time():
            logger.info("Dropped expired message %s", headers.get("id"))
            message.ack()
            return

        eta = _parse_time(headers.get("eta"))
        if eta is not None and eta > time.time():
            heapq.heappush(
                self._delayed, (eta, next(self._delay_order), subscription_id, message)
            )
            subscription = self._subscriptions.get(subscription_id)
            if subscription is not None:
                subscription.held_for_eta += 1
                self._apply_prefetch(subscription)
            return
        self._hand_over(subscription_id, body, message)

    def _release_due_messages(self) -> None:
        now = time.time()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, subscription_id, message = heapq.heappop(self._delayed)
            subscription = self._subscriptions.get(subscription_id)
            if subscription is not None and subscription.held_for_eta > 0:
                subscription.held_for_eta -= 1
                self._apply_prefetch(subscription)
            # A message of a cancelled subscription is requeued by _hand_over
            # rather than left unacknowledged until the connection closes.
            self._hand_over(subscription_id, message.decode(), message)

    def _hand_over(self, subscription_id: int, body: Any, message: Message) -> None:
        subscription = self._subscriptions.get(subscription_id)
        if subscription is None:
            message.requeue()
            return
        kwargs = body[1] if len(body) > 1 and isinstance(body[1], dict) else {}
        destination = destination_from_kwargs(kwargs)
        if destination is None:
            logger.error(
                "Rejected a workflows message without a destination on subscription %d: %.1000r",
                subscription_id,
                body,
            )
            message.reject(requeue=False)
            return
        try:
            self._on_delivery(
                subscription_id,
                destination,
                dict(kwargs.get("headers") or {}),
                kwargs.get("message"),
                message,
            )
        finally:
            if subscription.auto_ack and not message.acknowledged:
                message.ack()

    @staticmethod
    def _reject_undecodable(message: Message, error: Exception) -> None:
        logger.error(
            "Rejected a message that cannot be decoded (%s, content type %r): %.1000r",
            error,
            message.content_type,
            message.body,
        )
        message.reject(requeue=False)
