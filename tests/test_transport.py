"""Tests of every ``CeleryTransport`` call against the real Redis and RabbitMQ servers.

Each test runs once per broker (the ``broker_app`` fixture) and uses queue and
topic names of its own. Outcomes are polled with a bounded wait. Most checks
that something does not arrive first send a later message to the same queue and
wait for that one, so the tests stay fast without guessing sleep times.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import Any

import pytest
import workflows.transport
from celery import Celery
from helpers import (
    EARLY_TOLERANCE_S,
    TIMEOUT_S,
    Harness,
    Recorder,
    stays_false,
    wait_for,
)

from workflows_celery import create_app, routing
from workflows_celery.constants import EMBEDDED_BROKER_URL, STATUS_TOPIC
from workflows_celery.errors import InvalidSendOptionError, MessageEncodeError
from workflows_celery.messages import ARGUMENTS_SUMMARY_CHARS, Destination, OutgoingMessage
from workflows_celery.transport import CeleryTransport

logger = logging.getLogger(__name__)


# -- Lookup and connection ---------------------------------------------------------


def test_lookup_finds_celery_transport() -> None:
    assert workflows.transport.lookup("CeleryTransport") is CeleryTransport


def test_connect_and_disconnect(broker_app: Celery) -> None:
    transport = CeleryTransport(broker_app)
    assert transport.app is broker_app
    assert not transport.is_connected()

    assert transport.connect() is True
    assert transport.is_connected()

    transport.disconnect()
    assert not transport.is_connected()


def test_disconnect_stops_delivery(harness: Harness) -> None:
    queue = harness.queue("q")
    first = Recorder()
    consumer = harness.transport()
    consumer.subscribe(queue, first)
    assert consumer.is_connected()

    consumer.disconnect()
    harness.transport().send(queue, "after")
    second = Recorder()
    harness.transport().subscribe(queue, second)

    assert not consumer.is_connected()
    assert wait_for(lambda: second.received("after"))
    assert first.messages == []


@pytest.mark.parametrize(
    "url",
    ["redis://:secret-pw@127.0.0.1:1/0", "amqp://guest:secret-pw@127.0.0.1:1//"],
    ids=["redis", "rabbitmq"],
)
def test_connect_to_unreachable_broker_fails(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(url, main="tests.unreachable")
    transport = CeleryTransport(app)
    caplog.set_level(logging.DEBUG)
    try:
        connected = transport.connect()
    finally:
        app.close()

    assert connected is False
    assert not transport.is_connected()
    assert "127.0.0.1:1" in caplog.text
    assert "secret-pw" not in caplog.text


# -- Queues ------------------------------------------------------------------------


def test_send_reaches_one_of_two_subscribers(harness: Harness) -> None:
    queue = harness.queue("q")
    first, second = Recorder(), Recorder()
    harness.transport().subscribe(queue, first)
    harness.transport().subscribe(queue, second)
    sender = harness.transport()
    expected = [{"n": n} for n in range(20)]

    for message in expected:
        sender.send(queue, message)

    assert wait_for(lambda: len(first.messages) + len(second.messages) >= len(expected))
    assert stays_false(lambda: len(first.messages) + len(second.messages) > len(expected))
    delivered = first.messages + second.messages
    assert sorted(delivered, key=lambda m: m["n"]) == expected


def test_send_keeps_headers_and_adds_fields(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    receiver = harness.transport()
    subscription = receiver.subscribe(queue, received)

    harness.transport().send(queue, {"a": 1}, headers={"x-custom": "kept", "n": 3})

    assert wait_for(lambda: received.received({"a": 1}))
    header = received.header_of({"a": 1})
    assert header["x-custom"] == "kept"
    assert header["n"] == 3
    assert header["message-id"]
    assert header["subscription"] == subscription
    assert header["redelivered"] is False
    assert header["destination"] == queue


def test_raw_send_delivers_message(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    harness.transport().subscribe(queue, received, disable_mangling=True)
    sender = harness.transport()

    sender.raw_send(queue, {"raw": True})
    sender.raw_send(queue, '{"text": "stays text"}')

    assert wait_for(lambda: len(received.messages) == 2)
    assert received.messages == [{"raw": True}, '{"text": "stays text"}']


def test_send_decodes_json_text_on_receipt(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    harness.transport().subscribe(queue, received)

    harness.transport().send(queue, '{"decoded": 1}')

    assert wait_for(lambda: received.received({"decoded": 1}))


def test_send_delay_holds_message(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    harness.transport().subscribe(queue, received)
    sender = harness.transport()

    sent_at = time.time()
    sender.send(queue, "delayed", delay=1.5)

    assert wait_for(lambda: received.received("delayed"))
    waited = received.arrival("delayed") - sent_at
    assert waited >= 1.5 - EARLY_TOLERANCE_S
    assert waited < TIMEOUT_S


def test_delayed_message_lets_later_ones_pass(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    harness.transport().subscribe(queue, received)
    sender = harness.transport()

    sender.send(queue, "delayed", delay=1)
    sender.send(queue, "now")

    assert wait_for(lambda: received.received("delayed"))
    assert received.messages == ["now", "delayed"]


def test_send_expired_message_is_dropped(harness: Harness) -> None:
    queue = harness.queue("q")
    sender = harness.transport()
    sender.send(queue, "expires", expiration=0.3)
    sender.send(queue, "stays", expiration=60)
    time.sleep(0.6)

    received = Recorder()
    harness.transport().subscribe(queue, received)

    assert wait_for(lambda: received.received("stays"))
    assert stays_false(lambda: received.received("expires"))


def test_send_is_persistent(harness: Harness) -> None:
    queue = harness.queue("q")
    harness.transport().send(queue, "kept")

    with harness.app.connection_for_read() as connection:
        bound = routing.task_queue(queue).bind(connection.default_channel)
        fetched: list[Any] = []

        def fetch() -> bool:
            message = bound.get(no_ack=False)
            if message is not None:
                fetched.append(message)
            return bool(fetched)

        assert wait_for(fetch)
        fetched[0].requeue()
    assert fetched[0].properties["delivery_mode"] == 2

    received = Recorder()
    harness.transport().subscribe(queue, received)
    assert wait_for(lambda: received.received("kept"))
    assert received.header_of("kept")["delivery_mode"] == 2


def test_send_before_subscribe_is_kept(harness: Harness) -> None:
    queue = harness.queue("q")
    harness.transport().send(queue, "early")

    received = Recorder()
    harness.transport().subscribe(queue, received)

    assert wait_for(lambda: received.received("early"))


def test_unsubscribe_releases_delayed_message(harness: Harness) -> None:
    queue = harness.queue("q")
    first = Recorder()
    consumer = harness.transport()
    subscription = consumer.subscribe(queue, first)
    harness.transport().send(queue, "delayed", delay=1)
    time.sleep(0.3)

    consumer.unsubscribe(subscription)
    second = Recorder()
    harness.transport().subscribe(queue, second)

    assert wait_for(lambda: second.received("delayed"))
    assert first.messages == []


def test_unsubscribe_leaves_messages_for_others(harness: Harness) -> None:
    queue = harness.queue("q")
    first = Recorder()
    consumer = harness.transport()
    subscription = consumer.subscribe(queue, first)
    sender = harness.transport()
    sender.send(queue, "before")
    assert wait_for(lambda: first.received("before"))

    consumer.unsubscribe(subscription)
    sender.send(queue, "after")
    second = Recorder()
    harness.transport().subscribe(queue, second)

    assert wait_for(lambda: second.received("after"))
    assert first.messages == ["before"]


# -- Topics ------------------------------------------------------------------------


def check_broadcast_reaches_every_subscriber(
    first: CeleryTransport, second: CeleryTransport, sender: CeleryTransport, topic: str
) -> None:
    first_received, second_received = Recorder(), Recorder()
    first.subscribe_broadcast(topic, first_received)
    second.subscribe_broadcast(topic, second_received)
    expected = [{"n": n} for n in range(5)]

    for message in expected[:-1]:
        sender.broadcast(topic, message)
    sender.raw_broadcast(topic, expected[-1])

    for received in (first_received, second_received):
        assert wait_for(lambda: len(received.messages) >= len(expected))
    assert stays_false(
        lambda: len(first_received.messages) + len(second_received.messages)
        > 2 * len(expected)
    )
    assert first_received.messages == expected
    assert second_received.messages == expected


def test_broadcast_reaches_every_subscriber(harness: Harness) -> None:
    check_broadcast_reaches_every_subscriber(
        harness.transport(), harness.transport(), harness.transport(), harness.topic("t")
    )


def test_broadcast_reaches_every_subscriber_in_memory(unique: str) -> None:
    app = create_app(EMBEDDED_BROKER_URL, main=f"tests.memory.{unique}")
    transports = [CeleryTransport(app) for _ in range(3)]
    try:
        for transport in transports:
            assert transport.connect()
        check_broadcast_reaches_every_subscriber(
            *transports, topic=f"test.transport.{unique}.t"
        )
    finally:
        for transport in transports:
            transport.disconnect()
        app.close()


def test_broadcast_right_after_subscribe_arrives(harness: Harness) -> None:
    subscriber, sender = harness.transport(), harness.transport()
    recorders = {harness.topic(f"t{n}"): Recorder() for n in range(20)}

    for topic, received in recorders.items():
        subscriber.subscribe_broadcast(topic, received)
        sender.broadcast(topic, topic)

    for topic, received in recorders.items():
        assert wait_for(lambda: received.received(topic)), f"broadcast on {topic} lost"


def test_broadcast_delay_holds_message(harness: Harness) -> None:
    topic = harness.topic("t")
    received = Recorder()
    harness.transport().subscribe_broadcast(topic, received)
    sender = harness.transport()

    sent_at = time.time()
    sender.broadcast(topic, "delayed", delay=1.5)

    assert wait_for(lambda: received.received("delayed"))
    waited = received.arrival("delayed") - sent_at
    assert waited >= 1.5 - EARLY_TOLERANCE_S
    assert waited < TIMEOUT_S


def test_broadcast_without_subscriber_is_dropped(harness: Harness) -> None:
    topic = harness.topic("t")
    sender = harness.transport()

    sender.broadcast(topic, "nobody listens")

    received = Recorder()
    harness.transport().subscribe_broadcast(topic, received)
    sender.broadcast(topic, "listened to")
    assert wait_for(lambda: received.received("listened to"))
    assert received.messages == ["listened to"]


def test_unsubscribe_broadcast_stops_delivery(harness: Harness) -> None:
    topic = harness.topic("t")
    stopped, staying = Recorder(), Recorder()
    consumer = harness.transport()
    subscription = consumer.subscribe_broadcast(topic, stopped)
    harness.transport().subscribe_broadcast(topic, staying)
    sender = harness.transport()

    consumer.unsubscribe(subscription)
    sender.broadcast(topic, "after")

    assert wait_for(lambda: staying.received("after"))
    assert stays_false(lambda: stopped.received("after"))


# -- Temporary queues ----------------------------------------------------------------


def test_subscribe_temporary_receives_messages(harness: Harness) -> None:
    received = Recorder()
    owner = harness.transport()

    hint = f"replies.{harness.suffix}"

    subscription, queue = owner.subscribe_temporary(hint, received)
    harness.track_temporary(queue)
    harness.transport().send(queue, {"reply": 1}, headers={"h": "v"})

    assert isinstance(subscription, int)
    assert hint in queue
    assert wait_for(lambda: received.received({"reply": 1}))
    assert received.header_of({"reply": 1})["subscription"] == subscription
    assert received.header_of({"reply": 1})["h"] == "v"


def test_subscribe_temporary_names_differ(harness: Harness) -> None:
    transport = harness.transport()

    first = transport.subscribe_temporary(f"replies.{harness.suffix}", Recorder())
    second = transport.subscribe_temporary(None, Recorder())
    harness.track_temporary(first.queue_name)
    harness.track_temporary(second.queue_name)

    assert first.queue_name != second.queue_name
    assert first.subscription_id != second.subscription_id


def test_unsubscribe_temporary_stops_delivery(harness: Harness) -> None:
    received = Recorder()
    owner = harness.transport()
    subscription, queue = owner.subscribe_temporary(f"replies.{harness.suffix}", received)
    harness.track_temporary(queue)
    sender = harness.transport()
    sender.send(queue, "before")
    assert wait_for(lambda: received.received("before"))

    owner.unsubscribe(subscription)
    sender.send(queue, "after")

    assert stays_false(lambda: received.received("after"), period_s=0.5)


# -- Acknowledgements ----------------------------------------------------------------


def test_ack_prevents_redelivery(harness: Harness) -> None:
    queue = harness.queue("q")
    first = Recorder()
    consumer = harness.transport()
    consumer.subscribe(queue, first, acknowledgement=True)
    sender = harness.transport()
    sender.send(queue, "acked")
    assert wait_for(lambda: first.received("acked"))

    consumer.ack(first.header_of("acked"))
    consumer.disconnect()
    sender.send(queue, "later")
    second = Recorder()
    harness.transport().subscribe(queue, second, acknowledgement=True)

    assert wait_for(lambda: second.received("later"))
    assert stays_false(lambda: second.received("acked"))


def test_nack_redelivers_message(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    consumer = harness.transport()
    consumer.subscribe(queue, received, acknowledgement=True)
    harness.transport().send(queue, "retry me")
    assert wait_for(lambda: received.received("retry me"))
    first_header = received.header_of("retry me")

    consumer.nack(first_header)

    assert wait_for(lambda: received.count("retry me") == 2)
    second_header = received.headers[1]
    assert second_header["message-id"] == first_header["message-id"]
    assert isinstance(second_header["redelivered"], bool)
    consumer.ack(second_header)


def test_nack_without_requeue_drops_message(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    consumer = harness.transport()
    consumer.subscribe(queue, received, acknowledgement=True)
    sender = harness.transport()
    sender.send(queue, "rejected")
    assert wait_for(lambda: received.received("rejected"))

    consumer.nack(received.header_of("rejected"), requeue=False)
    sender.send(queue, "later")

    assert wait_for(lambda: received.received("later"))
    assert stays_false(lambda: received.count("rejected") > 1)


def test_unsettled_message_comes_back_after_disconnect(harness: Harness) -> None:
    queue = harness.queue("q")
    first = Recorder()
    consumer = harness.transport()
    consumer.subscribe(queue, first, acknowledgement=True)
    harness.transport().send(queue, "unsettled")
    assert wait_for(lambda: first.received("unsettled"))

    consumer.disconnect()
    second = Recorder()
    harness.transport().subscribe(queue, second, acknowledgement=True)

    assert wait_for(lambda: second.received("unsettled"))
    assert (
        second.header_of("unsettled")["message-id"]
        == first.header_of("unsettled")["message-id"]
    )


def test_ack_twice_raises(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    consumer = harness.transport()
    consumer.subscribe(queue, received, acknowledgement=True)
    harness.transport().send(queue, "once")
    assert wait_for(lambda: received.received("once"))

    consumer.ack(received.header_of("once"))

    with pytest.raises(workflows.Error):
        consumer.ack(received.header_of("once"))


# -- Transactions ------------------------------------------------------------------


def test_transaction_send_waits_for_commit(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    harness.transport().subscribe(queue, received)
    sender = harness.transport()

    transaction = sender.transaction_begin()
    sender.send(queue, "in transaction", transaction=transaction)
    sender.send(queue, "outside")
    assert wait_for(lambda: received.received("outside"))
    assert not received.received("in transaction")

    sender.transaction_commit(transaction)

    assert wait_for(lambda: received.received("in transaction"))


def test_transaction_abort_drops_send(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    harness.transport().subscribe(queue, received)
    sender = harness.transport()

    transaction = sender.transaction_begin()
    sender.send(queue, "aborted", transaction=transaction)
    sender.broadcast(harness.topic("t"), "aborted", transaction=transaction)
    sender.transaction_abort(transaction)
    sender.send(queue, "later")

    assert wait_for(lambda: received.received("later"))
    assert stays_false(lambda: received.received("aborted"))


def test_transaction_abort_undoes_ack(harness: Harness) -> None:
    queue = harness.queue("q")
    first = Recorder()
    consumer = harness.transport()
    subscription = consumer.subscribe(queue, first, acknowledgement=True)
    harness.transport().send(queue, "work")
    assert wait_for(lambda: first.received("work"))

    transaction = consumer.transaction_begin(subscription_id=subscription)
    consumer.ack(first.header_of("work"), transaction=transaction)
    consumer.transaction_abort(transaction)
    consumer.disconnect()
    second = Recorder()
    harness.transport().subscribe(queue, second, acknowledgement=True)

    assert wait_for(lambda: second.received("work"))


def test_transaction_commits_send_and_ack(harness: Harness) -> None:
    inbox, outbox = harness.queue("in"), harness.queue("out")
    inbox_received, outbox_received = Recorder(), Recorder()
    consumer = harness.transport()
    subscription = consumer.subscribe(inbox, inbox_received, acknowledgement=True)
    harness.transport().subscribe(outbox, outbox_received)
    sender = harness.transport()
    sender.send(inbox, "work")
    assert wait_for(lambda: inbox_received.received("work"))

    transaction = consumer.transaction_begin(subscription_id=subscription)
    consumer.send(outbox, "result", transaction=transaction)
    consumer.ack(inbox_received.header_of("work"), transaction=transaction)
    assert stays_false(lambda: outbox_received.received("result"), period_s=0.2)
    consumer.transaction_commit(transaction)

    assert wait_for(lambda: outbox_received.received("result"))
    consumer.disconnect()
    sender.send(inbox, "later")
    after_commit = Recorder()
    harness.transport().subscribe(inbox, after_commit, acknowledgement=True)
    assert wait_for(lambda: after_commit.received("later"))
    assert stays_false(lambda: after_commit.received("work"))


def test_transaction_commit_twice_raises(harness: Harness) -> None:
    transport = harness.transport()
    transaction = transport.transaction_begin()
    transport.transaction_commit(transaction)

    with pytest.raises(workflows.Error):
        transport.transaction_commit(transaction)


# -- Status broadcasts ---------------------------------------------------------------


def test_broadcast_status_requires_fields(harness: Harness) -> None:
    transport = harness.transport()

    with pytest.raises(ValueError, match="host"):
        transport.broadcast_status({"workflows": "3.3", "status": 1})
    with pytest.raises(ValueError, match="status"):
        transport.broadcast_status({"host": "h", "workflows": "3.3"})
    with pytest.raises(ValueError, match="workflows"):
        transport.broadcast_status({"host": "h", "status": 1})


def test_broadcast_status_reaches_status_subscribers(harness: Harness) -> None:
    received = Recorder()
    harness.transport().subscribe_broadcast(STATUS_TOPIC, received)
    host = f"test.host.{harness.suffix}"
    status = {"host": host, "workflows": "3.3", "status": 1, "statustext": "idle"}

    harness.transport().broadcast_status(status)

    def mine() -> list[Any]:
        return [
            message
            for message in received.messages
            if isinstance(message, dict) and message.get("host") == host
        ]

    assert wait_for(lambda: len(mine()) == 1)
    assert mine() == [status]


# -- Invalid messages and options ------------------------------------------------------


def test_unserialisable_message_raises_encode_error(harness: Harness) -> None:
    queue = harness.queue("q")
    transport = harness.transport()

    with pytest.raises(MessageEncodeError, match=queue):
        transport.send(queue, {"value": object()})
    with pytest.raises(MessageEncodeError, match="t-unserialisable"):
        transport.broadcast(harness.topic("t-unserialisable"), object())


def test_unserialisable_send_in_transaction_raises(harness: Harness) -> None:
    queue = harness.queue("q")
    transport = harness.transport()
    transaction = transport.transaction_begin()

    with pytest.raises(MessageEncodeError, match=queue):
        transport.send(queue, object(), transaction=transaction)
    with pytest.raises(MessageEncodeError, match=queue):
        transport.send(queue, "body", headers={"h": object()}, transaction=transaction)
    transport.transaction_abort(transaction)


def test_transaction_send_accepts_what_send_accepts(harness: Harness) -> None:
    queue = harness.queue("q")
    received = Recorder()
    harness.transport().subscribe(queue, received)
    sender = harness.transport()
    message = {"amount": Decimal("1.5")}

    sender.send(queue, message)
    transaction = sender.transaction_begin()
    sender.send(queue, message, transaction=transaction)
    sender.transaction_commit(transaction)

    assert wait_for(lambda: len(received.messages) == 2)
    assert received.messages[0] == received.messages[1]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("delay", -1),
        ("delay", "5"),
        ("delay", float("nan")),
        ("delay", True),
        ("expiration", -0.5),
        ("expiration", "soon"),
    ],
)
def test_invalid_send_option_raises(harness: Harness, option: str, value: Any) -> None:
    queue = harness.queue("q")
    transport = harness.transport()

    with pytest.raises(InvalidSendOptionError, match=option):
        transport.send(queue, "body", **{option: value})
    with pytest.raises(InvalidSendOptionError, match=option):
        transport.broadcast(harness.topic("t"), "body", **{option: value})


# -- Several transports in one process -------------------------------------------------


def test_transports_keep_separate_subscriptions(harness: Harness) -> None:
    first_queue, second_queue = harness.queue("first"), harness.queue("second")
    first_received, second_received = Recorder(), Recorder()
    first, second = harness.transport(), harness.transport()

    assert first.subscribe(first_queue, first_received) == 1
    assert second.subscribe(second_queue, second_received) == 1
    sender = harness.transport()
    sender.send(first_queue, "for first")
    sender.send(second_queue, "for second")

    assert wait_for(lambda: first_received.received("for first"))
    assert wait_for(lambda: second_received.received("for second"))
    assert first_received.messages == ["for first"]
    assert second_received.messages == ["for second"]


def test_namespaces_keep_broadcasts_apart(broker_url: str, unique: str) -> None:
    apps = {name: create_app(broker_url, main=f"tests.{name}.{unique}") for name in ("live", "test")}
    heard = {name: Recorder() for name in apps}
    transports = []
    try:
        for name, app in apps.items():
            app.conf.workflows_namespace = f"{name}-{unique}"
            listener = CeleryTransport(app)
            transports.append(listener)
            listener.subscribe_broadcast(STATUS_TOPIC, heard[name])
        for name, app in apps.items():
            sender = CeleryTransport(app)
            transports.append(sender)
            sender.broadcast_status({"host": f"host-{name}", "status": 1, "workflows": "test"})

        for name in apps:
            assert wait_for(lambda name=name: len(heard[name].messages) == 1), name
        assert stays_false(lambda: any(len(recorder.messages) > 1 for recorder in heard.values()))
        assert heard["live"].messages[0]["host"] == "host-live"
        assert heard["test"].messages[0]["host"] == "host-test"
    finally:
        for transport in transports:
            transport.disconnect()
        for app in apps.values():
            app.close()


def test_arguments_summary_is_short_and_names_run() -> None:
    recipe = {str(n): {"service": "Step", "queue": f"q{n}", "output": [n + 1]} for n in range(1, 200)}
    outgoing = OutgoingMessage(
        Destination("images"),
        {"recipe": recipe, "recipe-pointer": 2, "environment": {"ID": "run-7"}, "payload": {"image": "x" * 5000}},
        headers={"workflows-recipe": True},
    )

    summary = outgoing.arguments_summary()

    assert len(summary) <= ARGUMENTS_SUMMARY_CHARS
    assert summary.startswith("{'queue': 'images', 'run': 'run-7', 'recipe-pointer': 2, 'payload': {'image': 'xxx")
    assert "Step" not in summary
