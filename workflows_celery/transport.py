"""``CeleryTransport``: the workflows transport interface on Celery and kombu.

URLs are Celery broker URLs: ``redis://127.0.0.1:6379/0``,
``amqp://guest:guest@127.0.0.1:5672//`` or ``memory://`` (one process only).

Queues
    ``send`` publishes a message of the step task to a durable queue, declaring
    the queue first, so a queue exists as soon as something is sent to it.
    Exactly one consumer receives each message. Messages are persistent.
Topics
    ``broadcast`` publishes to a fanout exchange named after the topic. Every
    current subscriber has its own queue bound to it and receives each message
    once; with no subscriber the message is dropped, as in workflows. This
    works on RabbitMQ, on Redis (through kombu's PUB/SUB fanout) and in memory.
Delays and expiry
    ``delay`` (seconds, fractions allowed) becomes the Celery ETA: the consumer
    holds the message and runs it no earlier than that, on every broker, for
    queues and for topics. ``expiration`` becomes the Celery expiry: a message
    older than that is dropped instead of processed.
Acknowledgements
    On a subscription with ``acknowledgement=True`` every message must be acked
    or nacked. ``nack`` requeues by default, ``nack(header, requeue=False)``
    rejects. A message neither acked nor nacked comes back.
Transactions
    Sends, acks and nacks made with ``transaction=`` are kept in this process
    and take effect on ``transaction_commit`` (sends first, then the ack), or
    not at all on ``transaction_abort``. A crash between the two makes the
    broker deliver the message again, so a step may run twice but its outputs
    are never published without it having run (at-least-once delivery).

Inside a Celery worker the subscriptions a hosted service makes in
``initializing()`` are served by the worker itself: each message runs as one
execution of the step task. Anywhere else (a script, a web app, a monitor, or
a subscription made later) a background thread consumes them.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import kombu.exceptions
import kombu.utils.json
from celery import Celery
from celery._state import get_current_task
from kombu.message import Message
from workflows.transport.common_transport import CommonTransport, MessageCallback

from workflows_celery import deadletter, ledger, redis_transport, routing
from workflows_celery.constants import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SETTING_NAMESPACE,
    HEADER_RECIPE,
    SETTING_MAX_MESSAGE_BYTES,
    STATUS_EXPIRATION_S,
    STATUS_TOPIC,
    STEP_TASK_NAME,
)
from workflows_celery.errors import (
    MessageEncodeError,
    MessageTooLargeError,
    NotARecipeError,
    TransportNotConnectedError,
    UnknownSubscriptionError,
)
from workflows_celery.listener import Listener
from workflows_celery.messages import (
    Destination,
    OutgoingMessage,
    PreparedMessage,
    callback_header,
    check_seconds,
)
from workflows_celery.redaction import mask_url

logger = logging.getLogger(__name__)

#: Content type of the step task messages, the only one workers accept.
JSON_CONTENT_TYPE = "application/json"


@dataclass
class Settlement:
    """The outcome of a received message: acked, nacked or neither."""

    acked: bool = False
    nacked: bool = False
    requeue: bool = True
    #: Why the service rejected the message, kept with its dead letter.
    reason: str | None = None

    @property
    def settled(self) -> bool:
        """True once the message was acked or nacked."""
        return self.acked or self.nacked


@dataclass
class _Delivery:
    subscription_id: int
    settle: Callable[[Settlement], None]


@dataclass
class _Transaction:
    sends: list[OutgoingMessage] = field(default_factory=list)
    settlements: list[tuple[tuple[int, str], Settlement]] = field(default_factory=list)


@dataclass
class _SubscriptionInfo:
    destination: Destination
    acknowledgement: bool
    worker_bound: bool


class SubscriptionBinder:
    """Receives the subscriptions a hosted service makes while a worker starts it.

    The worker consumes the queues and topics bound here and runs the step task
    for each message; see :mod:`workflows_celery.hosting`.
    """

    def bind(
        self, transport: CeleryTransport, subscription_id: int, destination: Destination
    ) -> None:
        """Route messages for ``destination`` to this subscription."""
        raise NotImplementedError

    def unbind(self, transport: CeleryTransport, subscription_id: int) -> None:
        """Stop routing messages to this subscription."""
        raise NotImplementedError


class CeleryTransport(CommonTransport):
    """A workflows transport that sends and receives through a Celery app.

    Args:
        app: The Celery app to use. When omitted, an app is made for
            ``broker_url``, or the default app of :mod:`workflows_celery`
            (configured from ``CELERY_BROKER_URL``) is used.
        broker_url: Broker to connect to when no app is given.
        middleware: workflows transport middleware, as for every transport.
        dry_run: Record subscriptions without consuming and drop every send.
            Workers use this to learn which queues a service reads before they
            start it for real.
    """

    #: Broker URL set with ``--celery-broker`` on workflows command lines.
    defaults: dict[str, Any] = {"broker_url": None}

    def __init__(
        self,
        app: Celery | None = None,
        *,
        broker_url: str | None = None,
        middleware: list[Any] | None = None,
        dry_run: bool = False,
    ) -> None:
        super().__init__(middleware=middleware)
        # NOTE: workflows 3.x keeps subscriptions and transactions in dicts
        # defined on CommonTransport itself, shared by every transport in the
        # process, so two services in one worker process overwrote each other's
        # callbacks. Each instance gets its own.
        self._CommonTransport__subscriptions: dict[int, dict[str, Any]] = {}
        self._CommonTransport__transactions: set[int] = set()

        self._app_given = app
        self._broker_url = broker_url or self.defaults.get("broker_url")
        self._app_made: Celery | None = None
        self.dry_run = dry_run
        self.binder: SubscriptionBinder | None = None
        self._connected = False
        self._lock = threading.RLock()
        self._listener: Listener | None = None
        self._info: dict[int, _SubscriptionInfo] = {}
        self._deliveries: dict[tuple[int, str], _Delivery] = {}
        self._transactions: dict[int, _Transaction] = {}
        self.recorded_subscriptions: list[tuple[Destination, dict[str, Any]]] = []
        #: When set to a list, sends are appended to it instead of published.
        self.capture: list[OutgoingMessage] | None = None

    # -- Configuration ----------------------------------------------------------

    @classmethod
    def add_command_line_options(cls, parser: Any) -> None:
        """Add ``--celery-broker`` to a workflows command line (argparse or optparse)."""
        help_text = "Celery broker URL for CeleryTransport (default: CELERY_BROKER_URL)"
        if isinstance(parser, argparse.ArgumentParser):
            parser.add_argument(
                "--celery-broker",
                metavar="URL",
                default=None,
                help=help_text,
                action=_StoreBrokerAction,
            )
        else:
            parser.add_option(
                "--celery-broker",
                metavar="URL",
                default=None,
                help=help_text,
                type="string",
                action="callback",
                callback=lambda option, opt, value, parser: cls.defaults.update(
                    broker_url=value
                ),
            )

    @property
    def app(self) -> Celery:
        """The Celery app this transport sends and receives through."""
        if self._app_given is not None:
            return self._app_given
        if self._app_made is None:
            from workflows_celery.application import create_app, default_app

            self._app_made = create_app(self._broker_url) if self._broker_url else default_app()
        return self._app_made

    def topic_name(self, topic: str) -> str:
        """Return the name a topic has on the broker: prefixed with the app's namespace, if any.

        Apps with different ``workflows_namespace`` settings share a broker
        without hearing each other's broadcasts (status, commands, topics).
        """
        namespace = self.app.conf.get(SETTING_NAMESPACE)
        return f"{namespace}.{topic}" if namespace else topic

    # -- Connection ---------------------------------------------------------------

    def connect(self) -> bool:
        """Check that the broker can be reached; return True when it can."""
        if self.dry_run:
            self._connected = True
            return True
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1)
        except Exception as error:  # kombu raises transport-specific errors here
            logger.error(
                "Cannot connect to the broker %s: %s", mask_url(self.app.conf.broker_url), error
            )
            self._connected = False
            return False
        self._connected = True
        return True

    def is_connected(self) -> bool:
        """Tell whether the transport is connected (and its listener, if any, is)."""
        if not self._connected:
            return False
        listener = self._listener
        return listener is None or listener.is_alive()

    def disconnect(self) -> None:
        """Stop consuming and close connections; unacknowledged messages come back."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        self._connected = False

    # -- Sending ----------------------------------------------------------------

    def _send(
        self,
        destination: str,
        message: Any,
        headers: Mapping[str, Any] | None = None,
        delay: float | None = None,
        expiration: float | None = None,
        transaction: int | None = None,
        exchange: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._enqueue(
            Destination(str(destination)),
            message,
            headers,
            delay,
            expiration,
            transaction,
            exchange,
        )

    def _broadcast(
        self,
        destination: str,
        message: Any,
        headers: Mapping[str, Any] | None = None,
        delay: float | None = None,
        expiration: float | None = None,
        transaction: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._enqueue(
            Destination(self.topic_name(str(destination)), is_topic=True),
            message,
            headers,
            delay,
            expiration,
            transaction,
            None,
        )

    def broadcast_status(self, status: Mapping[str, Any]) -> None:
        """Broadcast a service status on the ``transient.status`` topic for 15 s."""
        missing = {"host", "workflows", "status"} - status.keys()
        if missing:
            raise ValueError(
                "Missing required field(s) for status broadcast: "
                + ", ".join(sorted(missing))
            )
        self._broadcast(STATUS_TOPIC, dict(status), expiration=STATUS_EXPIRATION_S)

    def _enqueue(
        self,
        destination: Destination,
        message: Any,
        headers: Mapping[str, Any] | None,
        delay: Any,
        expiration: Any,
        transaction: int | None,
        exchange: str | None,
    ) -> None:
        outgoing = OutgoingMessage(
            destination=destination,
            message=message,
            headers=dict(headers or {}),
            delay_s=check_seconds("delay", delay),
            expiration_s=check_seconds("expiration", expiration),
            exchange=exchange,
        )
        # Encoded now, also in a transaction, so that the sender gets any error
        # at the send and not at the commit.
        prepare_message(self.app, outgoing, max_message_bytes(self.app))
        if transaction is not None:
            self._transaction(transaction).sends.append(outgoing)
            return
        self.publish([outgoing])

    def publish(
        self, messages: list[OutgoingMessage], *, together: bool = False, origin: str | None = None
    ) -> None:
        """Publish messages now, in order; with ``together``, all of them or none.

        Recipe messages are recorded in the run ledger first (see
        :mod:`workflows_celery.ledger`); ``origin`` names the recipe of a run
        that these messages start.
        """
        if self.capture is not None:
            self.capture.extend(messages)
            return
        if self.dry_run:
            for outgoing in messages:
                logger.debug("Dry run: not sending to %s", outgoing.destination)
            return
        ledger.before_publish(self.app, messages, origin)
        try:
            if together and len(messages) > 1:
                publish_together(self.app, messages)
            else:
                publish_messages(self.app, messages)
        except BaseException:
            ledger.after_failed_publish(self.app, messages)
            raise

    # -- Subscribing ----------------------------------------------------------------

    def _subscribe(
        self,
        sub_id: int,
        channel: str,
        callback: MessageCallback,
        *,
        acknowledgement: bool = False,
        prefetch_count: int = 1,
        **kwargs: Any,
    ) -> None:
        destination = Destination(str(channel))
        self._add_subscription(
            sub_id,
            destination,
            routing.task_queue(destination.name),
            acknowledgement=bool(acknowledgement),
            prefetch_count=prefetch_count,
            options=kwargs,
        )

    def _subscribe_broadcast(
        self, sub_id: int, channel: str, callback: MessageCallback, **kwargs: Any
    ) -> None:
        destination = Destination(self.topic_name(str(channel)), is_topic=True)
        self._add_subscription(
            sub_id,
            destination,
            routing.topic_queue(destination.name),
            acknowledgement=False,
            prefetch_count=kwargs.pop("prefetch_count", 100),
            options=kwargs,
        )

    def _subscribe_temporary(
        self,
        sub_id: int,
        channel_hint: str | None,
        callback: MessageCallback,
        *,
        acknowledgement: bool = False,
        **kwargs: Any,
    ) -> str:
        name = routing.temporary_queue_name(channel_hint)
        # A temporary queue is private to this process, so even inside a worker
        # it is consumed here and not by the worker's shared consumer.
        self._add_subscription(
            sub_id,
            Destination(name),
            routing.temporary_queue(name),
            acknowledgement=bool(acknowledgement),
            prefetch_count=kwargs.pop("prefetch_count", 1),
            options=kwargs,
            private=True,
        )
        return name

    def _add_subscription(
        self,
        sub_id: int,
        destination: Destination,
        queue: Any,
        *,
        acknowledgement: bool,
        prefetch_count: int,
        options: dict[str, Any],
        private: bool = False,
    ) -> None:
        worker_bound = self.binder is not None and not private
        self._info[sub_id] = _SubscriptionInfo(destination, acknowledgement, worker_bound)
        if self.dry_run:
            self.recorded_subscriptions.append((destination, dict(options)))
            return
        if worker_bound:
            assert self.binder is not None
            self.binder.bind(self, sub_id, destination)
            return
        self._ensure_listener().add_subscription(
            sub_id, queue, prefetch_count=prefetch_count, auto_ack=not acknowledgement
        )

    def _unsubscribe(self, sub_id: int, **kwargs: Any) -> None:
        info = self._info.get(sub_id)
        if info is None or self.dry_run:
            return
        if info.worker_bound and self.binder is not None:
            self.binder.unbind(self, sub_id)
        elif self._listener is not None:
            self._listener.remove_subscription(sub_id)

    def _ensure_listener(self) -> Listener:
        with self._lock:
            if self._listener is None or not self._listener.is_alive():
                self._listener = Listener(self.app, self._deliver_from_listener)
                self._listener.start()
                if not self._listener.connected.wait(30):
                    raise TransportNotConnectedError(
                        f"Cannot subscribe: broker {mask_url(self.app.conf.broker_url)} "
                        "did not answer within 30 s"
                    )
                self._connected = True
            return self._listener

    # -- Receiving --------------------------------------------------------------

    def deliver(
        self,
        subscription_id: int,
        destination: Destination,
        headers: Mapping[str, Any],
        message: Any,
        *,
        message_id: str,
        delivery_info: Mapping[str, Any] | None,
        settle: Callable[[Settlement], None],
    ) -> None:
        """Hand one received message to the callback of a subscription.

        ``settle`` is called when the service acks or nacks the message (on an
        ``acknowledgement=True`` subscription).
        """
        info = self._info.get(subscription_id)
        if info is None:
            raise UnknownSubscriptionError(
                f"No subscription {subscription_id} for a message on {destination}"
            )
        header = callback_header(
            headers,
            message_id=message_id,
            subscription_id=subscription_id,
            destination=destination,
            delivery_info=delivery_info,
        )
        callback = self.subscription_callback(subscription_id)
        if headers.get(HEADER_RECIPE) not in _RECIPE_FLAGS and _takes_recipes_only(callback):
            # workflows would nack it, and it would come back until the
            # delivery limit: it goes to the dead-letter queue at once instead.
            raise NotARecipeError(
                f"Message {message_id} on {destination} carries no recipe (no "
                f"{HEADER_RECIPE} header), but its service reads that {destination.kind} "
                "with wrap_subscribe; send it as a step of a recipe (workflows-celery "
                "run, start_recipe or RecipeWrapper.send), or subscribe with "
                "allow_non_recipe_messages=True"
            )
        if info.acknowledgement:
            self._deliveries[(subscription_id, message_id)] = _Delivery(subscription_id, settle)
        callback(header, message)

    def requires_ack(self, subscription_id: int) -> bool:
        """Tell whether the service must ack or nack each message of a subscription."""
        info = self._info.get(subscription_id)
        return bool(info and info.acknowledgement)

    def forget_delivery(self, subscription_id: int, message_id: str) -> bool:
        """Drop the record of an unsettled message; return True if there was one."""
        return self._deliveries.pop((subscription_id, message_id), None) is not None

    def _deliver_from_listener(
        self,
        subscription_id: int,
        destination: Destination,
        headers: dict[str, Any],
        message: Any,
        kombu_message: Message,
    ) -> None:
        """Hand a message from the listener thread to its callback, then settle it.

        Runs on the listener thread. As in a worker, a message to be processed
        again is published again with its delivery count raised, one that cannot
        be processed goes to its dead-letter queue, and the original is acked.
        """
        listener = self._listener
        app = self.app
        broker_headers = kombu_message.headers or {}
        message_id = str(broker_headers.get("id") or kombu_message.delivery_tag)

        def again(why: str) -> None:
            deadletter.redeliver(
                app,
                destination,
                headers,
                message,
                message_id=message_id,
                why=why,
                eta=broker_headers.get("eta"),
                expires_at=broker_headers.get("expires"),
            )

        def dead(reason: str, error: str) -> None:
            deadletter.dead_letter(
                app, destination, headers, message, message_id=message_id, reason=reason, error=error
            )

        if (kombu_message.delivery_info or {}).get("redelivered") and not destination.is_topic:
            again("delivered again after a lost consumer or connection")
            kombu_message.ack()
            return

        def settle(outcome: Settlement) -> None:
            def apply() -> None:
                if kombu_message.acknowledged:
                    return
                if outcome.nacked and not outcome.requeue:
                    dead(deadletter.REASON_REJECTED, f"rejected on subscription {subscription_id}")
                elif outcome.nacked:
                    again(f"nacked on subscription {subscription_id}")
                kombu_message.ack()

            if listener is not None:
                listener.post(apply)

        try:
            self.deliver(
                subscription_id,
                destination,
                headers,
                message,
                message_id=message_id,
                delivery_info=kombu_message.delivery_info,
                settle=settle,
            )
        except NotARecipeError as error:
            # Logged as it is dead-lettered.
            dead(deadletter.REASON_REJECTED, str(error))
            kombu_message.ack()
        except TransportNotConnectedError as error:
            # Nothing of a transaction was published: the message goes back
            # to be processed again.
            logger.warning(
                "Message %s on %s returned to the queue: %s", message_id, destination, error
            )
            self.forget_delivery(subscription_id, message_id)
            if not kombu_message.acknowledged:
                try:
                    kombu_message.reject(requeue=True)
                except Exception:  # the broker gives it back when the connection closes
                    logger.debug("Could not return message %s", message_id, exc_info=True)
        except Exception as error:
            logger.error(
                "Callback of subscription %d on %s failed for message %s",
                subscription_id,
                destination,
                message_id,
                exc_info=True,
            )
            if not destination.is_topic and not kombu_message.acknowledged:
                self.forget_delivery(subscription_id, message_id)
                dead(deadletter.REASON_FAILED, f"callback raised {error!r}")
                kombu_message.ack()

    # -- Acknowledgements and transactions ----------------------------------------

    def _ack(
        self, message_id: Any, subscription_id: int, *, transaction: int | None = None, **kwargs: Any
    ) -> None:
        self._settle(str(message_id), subscription_id, Settlement(acked=True), transaction)

    def _nack(
        self,
        message_id: Any,
        subscription_id: int,
        *,
        requeue: bool = True,
        transaction: int | None = None,
        reason: str | None = None,
        **kwargs: Any,
    ) -> None:
        # ``reason`` is not part of the workflows transport interface: a service
        # gives it with nack(header, requeue=False, reason=...) so that the dead
        # letter records why the message was rejected.
        outcome = Settlement(nacked=True, requeue=bool(requeue), reason=reason)
        self._settle(str(message_id), subscription_id, outcome, transaction)

    def _settle(
        self,
        message_id: str,
        subscription_id: int,
        outcome: Settlement,
        transaction: int | None,
    ) -> None:
        key = (subscription_id, message_id)
        if key not in self._deliveries:
            raise UnknownSubscriptionError(
                f"Cannot ack or nack message {message_id!r} on subscription "
                f"{subscription_id}: it was not received on that subscription, was "
                "already settled, or its subscription does not use acknowledgement=True"
            )
        if transaction is not None:
            self._transaction(transaction).settlements.append((key, outcome))
            return
        self._deliveries.pop(key).settle(outcome)

    def _transaction(self, transaction_id: int) -> _Transaction:
        try:
            return self._transactions[transaction_id]
        except KeyError:
            raise UnknownSubscriptionError(
                f"Transaction {transaction_id} is not open; call transaction_begin() first"
            ) from None

    def _transaction_begin(
        self, transaction_id: int, *, subscription_id: int | None = None, **kwargs: Any
    ) -> None:
        self._transactions[transaction_id] = _Transaction()

    def _transaction_abort(self, transaction_id: int, **kwargs: Any) -> None:
        dropped = self._transactions.pop(transaction_id, None)
        if dropped is not None and (dropped.sends or dropped.settlements):
            logger.debug(
                "Transaction %d aborted: %d sends and %d acks or nacks dropped",
                transaction_id,
                len(dropped.sends),
                len(dropped.settlements),
            )

    def _transaction_commit(self, transaction_id: int, **kwargs: Any) -> None:
        pending = self._transactions.pop(transaction_id)
        # Sends go first, all together: if publishing fails, none of them is
        # published and the message is not acked, so it comes back and the
        # step is redone as a whole.
        self.publish(pending.sends, together=True)
        for key, outcome in pending.settlements:
            delivery = self._deliveries.pop(key, None)
            if delivery is not None:
                delivery.settle(outcome)

    # -- Message conversion -------------------------------------------------------

    @staticmethod
    def _mangle_for_receiving(message: Any) -> Any:
        """Decode a message sent as JSON text, as ``PikaTransport`` does."""
        if isinstance(message, (str, bytes)):
            try:
                return json.loads(message)
            except ValueError:
                return message
        return message


#: Values of the recipe header that workflows takes to mean "a recipe".
_RECIPE_FLAGS = (True, "True", "true", 1)


def _takes_recipes_only(callback: Callable[..., Any]) -> bool:
    """Tell whether ``callback`` is workflows' ``wrap_subscribe`` wrapper refusing non-recipes."""
    # NOTE: workflows offers no way to ask a subscription whether it unwraps
    # recipes, so its wrapper is recognised by its code and its closure. When
    # that fails, the message takes the slower path of nack and delivery limit.
    for _ in range(3):
        code = getattr(callback, "__code__", None)
        cells = getattr(callback, "__closure__", None) or ()
        if code is None or len(cells) != len(code.co_freevars):
            return False
        free = dict(zip(code.co_freevars, cells, strict=True))
        if code.co_name == "unwrap_recipe" and "allow_non_recipe_messages" in free:
            return not free["allow_non_recipe_messages"].cell_contents
        if "callback" not in free:
            return False
        # A transport wraps the service's callback to decode the message.
        callback = free["callback"].cell_contents
    return False


def max_message_bytes(app: Celery) -> int:
    """Return the size limit of a message for ``app``, in bytes (0: no limit)."""
    value = app.conf.get(SETTING_MAX_MESSAGE_BYTES)
    return DEFAULT_MAX_MESSAGE_BYTES if value is None else max(int(value), 0)


def prepare_message(app: Celery, outgoing: OutgoingMessage, limit: int = 0) -> PreparedMessage:
    """Build the step task message of ``outgoing`` and encode its body to JSON, once.

    The result is returned and kept on ``outgoing.prepared``, which is
    published as it is, so each send is encoded once. A service's send learns
    at once, also inside a transaction, that its message cannot be encoded or
    is too large.

    Args:
        app: The app that publishes the message.
        outgoing: The message.
        limit: Maximum size of the encoded body in bytes (0: no limit).

    Raises:
        MessageEncodeError: the message or its headers are not JSON serialisable.
        MessageTooLargeError: the encoded message is over ``limit`` bytes.
    """
    expires = outgoing.expiration_s if outgoing.expiration_s is not None else outgoing.expires_at
    task_message = app.amqp.create_task_message(
        outgoing.task_id,
        STEP_TASK_NAME,
        (),
        outgoing.task_kwargs(),
        countdown=outgoing.delay_s,
        eta=None if outgoing.delay_s else outgoing.eta,
        expires=expires,
        shadow=outgoing.display_name(),
        ignore_result=True,
        create_sent_event=False,
        argsrepr="()",
        kwargsrepr=outgoing.arguments_summary(),
        # Every step of a run shares the run ID as its Celery root id, so task
        # events and flower group a run's steps and find them by run ID.
        root_id=outgoing.run_id(),
        parent_id=_current_task_id(),
    )
    # kombu's encoder, which the JSON serialiser uses, so that the same values
    # (Decimal, datetime, UUID) pass here as when kombu encodes.
    try:
        body = kombu.utils.json.dumps(task_message.body)
    except (TypeError, ValueError) as error:
        raise _encode_error(outgoing, error) from error
    size = len(body.encode())
    if limit and size > limit:
        raise MessageTooLargeError(
            f"Cannot send to {outgoing.destination}: the message is {size} bytes of "
            f"JSON, over the limit of {limit} bytes; send the path of a file holding "
            f"the data instead, or raise the {SETTING_MAX_MESSAGE_BYTES} setting"
        )
    outgoing.prepared = PreparedMessage(task_message, body)
    return outgoing.prepared


def _encode_error(outgoing: OutgoingMessage, error: Exception) -> MessageEncodeError:
    """Return the error that names the value of ``outgoing`` that JSON cannot encode."""
    if not _encodes(outgoing.headers):
        where = _unencodable_part(outgoing.headers, "the headers")
        return MessageEncodeError(
            f"Cannot send to {outgoing.destination}: {where} is not JSON "
            f"serialisable ({error}); use string keys and JSON values"
        )
    where = _unencodable_part(outgoing.message, "the message")
    return MessageEncodeError(
        f"Cannot send to {outgoing.destination}: {where} is not JSON "
        f"serialisable ({error}); send only dicts, lists, strings, numbers, "
        "booleans and None"
    )


def _unencodable_part(value: Any, path: str) -> str:
    """Return where in ``value`` the first value that kombu cannot encode is.

    For example ``the message['a'][2]``, or ``the key frozenset() of the message``.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return f"the key {key!r} of {path}"
            if not _encodes(item):
                return _unencodable_part(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if not _encodes(item):
                return _unencodable_part(item, f"{path}[{index}]")
    return path


def _encodes(value: Any) -> bool:
    try:
        kombu.utils.json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def publish_messages(
    app: Celery, messages: list[OutgoingMessage], *, queue: str | None = None
) -> None:
    """Publish messages in order over one pooled producer.

    Args:
        app: The app whose broker receives the messages.
        messages: The messages, each routed to its destination.
        queue: A queue that receives every message instead (dead-lettering).

    Raises:
        MessageEncodeError: a message is not JSON serialisable.
        TransportNotConnectedError: the broker cannot be reached.
    """
    if not messages:
        return
    with _publish_errors(app, messages):
        with app.producer_or_acquire() as producer:
            for outgoing in messages:
                _publish_one(app, producer, outgoing, queue, retry=True)


def publish_together(app: Celery, messages: list[OutgoingMessage]) -> None:
    """Publish messages so that the broker stores all of them or none.

    On RabbitMQ they go in one AMQP transaction, on Redis in one MULTI/EXEC
    transaction. Nothing is retried inside: when the connection fails, nothing
    was published and the caller redoes the whole.

    Raises:
        MessageEncodeError: a message is not JSON serialisable.
        TransportNotConnectedError: the broker cannot be reached.
    """
    if not messages:
        return
    with _publish_errors(app, messages):
        if _uses_amqp(app):
            # A channel in confirm mode cannot use transactions, so this
            # connection leaves publisher confirms off; the commit confirms.
            # NOTE: each commit opens a connection of its own, which costs a
            # connection setup per transaction; a pool of them would not.
            with app.connection_for_write(
                transport_options={"confirm_publish": False}
            ) as connection:
                channel = connection.channel()
                try:
                    channel.tx_select()
                    producer = app.amqp.Producer(channel, auto_declare=False)
                    for outgoing in messages:
                        _publish_one(app, producer, outgoing, None, retry=False)
                    channel.tx_commit()
                finally:
                    _close_quietly(connection, channel)
            return
        with app.producer_or_acquire() as producer:
            with redis_transport.publishing_together(producer.channel):
                for outgoing in messages:
                    _publish_one(app, producer, outgoing, None, retry=False)


def _uses_amqp(app: Celery) -> bool:
    with app.connection_for_write() as connection:
        return connection.transport.driver_type == "amqp"


def _close_quietly(connection: Any, channel: Any) -> None:
    try:
        channel.close()
    except connection.channel_errors + connection.connection_errors:
        logger.debug("Channel already closed by the broker")


@contextmanager
def _publish_errors(app: Celery, messages: list[OutgoingMessage]) -> Iterator[None]:
    """Turn kombu's publishing errors into this package's, naming the destination."""
    first = messages[0].destination
    try:
        yield
    except kombu.exceptions.EncodeError as error:
        raise MessageEncodeError(
            f"Cannot send to {first}: the message is not JSON "
            f"serialisable ({error}); send only dicts, lists, strings, numbers, "
            "booleans and None"
        ) from error
    except Exception as error:
        if isinstance(error, (kombu.exceptions.OperationalError, *_connection_errors(app))):
            raise TransportNotConnectedError(
                f"Cannot send to {first}: broker "
                f"{mask_url(app.conf.broker_url)} unreachable ({error})"
            ) from error
        raise


def _connection_errors(app: Celery) -> tuple[type[BaseException], ...]:
    """Return the exceptions that mean the connection to ``app``'s broker was lost."""
    with app.connection_for_write() as connection:
        return tuple(connection.connection_errors) + tuple(connection.channel_errors)


def _publish_one(
    app: Celery, producer: Any, outgoing: OutgoingMessage, queue: str | None, *, retry: bool
) -> None:
    """Publish one message as a step task message, routed explicitly."""
    prepared = outgoing.prepared or prepare_message(app, outgoing)
    app.amqp.send_task_message(
        producer,
        STEP_TASK_NAME,
        prepared.task_message._replace(body=prepared.body),
        retry=retry,
        headers=outgoing.broker_headers or None,
        # The body is JSON already: kombu publishes it as it is.
        content_type=JSON_CONTENT_TYPE,
        content_encoding="utf-8",
        **(route_options(outgoing) if queue is None else {"queue": routing.task_queue(queue)}),
    )


def _current_task_id() -> str | None:
    """Return the id of the Celery task running in this thread, if any."""
    task = get_current_task()
    request = getattr(task, "request", None)
    task_id = getattr(request, "id", None)
    return str(task_id) if task_id else None


# Every send needs the kombu queue or exchange of its destination. Celery and
# kombu only read them (declaring binds a copy), so one object per name serves
# every send. Workers get fresh ones, because Celery fills in their defaults.
_sent_queue = functools.lru_cache(maxsize=1024)(routing.task_queue)
_sent_exchange = functools.lru_cache(maxsize=1024)(routing.topic_exchange)


def route_options(outgoing: OutgoingMessage) -> dict[str, Any]:
    """Return the Celery publish options that route a message to its destination.

    Every message is routed explicitly, so the sender needs no task routes and
    no service code.
    """
    destination = outgoing.destination
    if destination.is_topic:
        exchange = _sent_exchange(destination.name)
        return {
            "exchange": exchange,
            "routing_key": destination.name,
            "exchange_type": "fanout",
            "declare": [exchange],
        }
    if outgoing.exchange:
        # A recipe node may name an exchange; the broker routes by its bindings.
        return {
            "exchange": outgoing.exchange,
            "routing_key": destination.name,
            "exchange_type": "topic",
            "declare": [],
        }
    if routing.is_temporary_queue(destination.name):
        return {"queue": routing.temporary_queue(destination.name), "declare": []}
    return {"queue": _sent_queue(destination.name)}


class _StoreBrokerAction(argparse.Action):
    def __call__(
        self, parser: Any, namespace: Any, values: Any, option_string: str | None = None
    ) -> None:
        CeleryTransport.defaults["broker_url"] = values
        setattr(namespace, self.dest, values)
