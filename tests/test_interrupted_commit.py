"""A transaction whose commit loses the broker connection half-way publishes nothing.

The commit publishes every send in one broker transaction (AMQP on RabbitMQ,
MULTI/EXEC on Redis). Here the connection is lost after the first of two sends
has gone into the transaction: neither reaches its queue, the step's message
comes back, and the step is redone as a whole. The soak test (``python -m
soak``) checks the same with real broker restarts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from helpers import Harness, Recorder, delete_queues, stays_false, wait_for
from workflows.services.common_service import CommonService

from workflows_celery import CeleryTransport, create_app, dlq, transport
from workflows_celery.deadletter import dead_letter_queue
from workflows_celery.embedded import embedded_worker
from workflows_celery.messages import OutgoingMessage


@pytest.fixture
def lose_connection_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Lose the connection right after the first message named "first" is published.

    Returns the list of messages published, including the one whose publication
    was interrupted.
    """
    published: list[str] = []
    publish_one = transport._publish_one

    def publish_then_fail(*args: Any, **kwargs: Any) -> None:
        outgoing: OutgoingMessage = args[2]
        publish_one(*args, **kwargs)
        published.append(str(outgoing.message))
        if published.count("first") == 1 and outgoing.message == "first":
            raise ConnectionResetError("connection lost in the middle of the commit")

    monkeypatch.setattr(transport, "_publish_one", publish_then_fail)
    return published


def test_plain_subscriber_redoes_interrupted_commit(
    harness: Harness, lose_connection_once: list[str]
) -> None:
    inbox, outbox = harness.queue("in"), harness.queue("out")
    out = Recorder()
    harness.transport().subscribe(outbox, out)
    consumer = harness.transport()
    attempts: list[dict[str, Any]] = []

    def step(header: dict[str, Any], message: Any) -> None:
        attempts.append(dict(header))
        transaction = consumer.transaction_begin(subscription_id=header["subscription"])
        consumer.send(outbox, "first", transaction=transaction)
        consumer.send(outbox, "second", transaction=transaction)
        consumer.ack(header, transaction=transaction)
        consumer.transaction_commit(transaction)

    consumer.subscribe(inbox, step, acknowledgement=True)
    harness.transport().send(inbox, "work")

    assert wait_for(lambda: sorted(out.messages) == ["first", "second"]), out.messages
    assert stays_false(lambda: len(out.messages) > 2), out.messages
    assert len(attempts) == 2
    assert attempts[0]["message-id"] == attempts[1]["message-id"]
    # The interrupted commit had put "first" into its broker transaction only.
    outputs = [message for message in lose_connection_once if message in ("first", "second")]
    assert outputs == ["first", "first", "second"]
    assert dlq.count(harness.app, inbox) == 0


class Forwarder(CommonService):
    """Forward each message of ``test.commit.<suffix>.in`` twice, in one transaction."""

    _service_name = "Forwarder"
    inbox = ""
    outbox = ""
    attempts: list[dict[str, Any]] = []

    def initializing(self) -> None:
        self._transport.subscribe(self.inbox, self.forward, acknowledgement=True)

    def forward(self, header: dict[str, Any], message: Any) -> None:
        self.attempts.append(dict(header))
        transaction = self._transport.transaction_begin(subscription_id=header["subscription"])
        self._transport.send(self.outbox, "first", transaction=transaction)
        self._transport.send(self.outbox, "second", transaction=transaction)
        self._transport.ack(header, transaction=transaction)
        self._transport.transaction_commit(transaction)


@pytest.fixture
def app(broker_url: str) -> Iterator[Celery]:
    created = create_app(broker_url, main="tests.interrupted_commit")
    yield created
    created.close()


def test_worker_redoes_interrupted_commit(
    app: Celery, unique: str, lose_connection_once: list[str]
) -> None:
    inbox, outbox = f"test.commit.{unique}.in", f"test.commit.{unique}.out"
    service = type(
        "TestForwarder", (Forwarder,), {"inbox": inbox, "outbox": outbox, "attempts": []}
    )
    out = Recorder()
    reader = CeleryTransport(app)
    try:
        reader.subscribe(outbox, out)
        with embedded_worker([service], app=app):
            CeleryTransport(app).send(inbox, "work")
            assert wait_for(lambda: sorted(out.messages) == ["first", "second"]), out.messages
            assert stays_false(lambda: len(out.messages) > 2), out.messages
        assert len(service.attempts) == 2
        assert service.attempts[0]["message-id"] == service.attempts[1]["message-id"]
        assert dlq.count(app, inbox) == 0
    finally:
        reader.disconnect()
        delete_queues(app, [inbox, outbox, dead_letter_queue(inbox)])
