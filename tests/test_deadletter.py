"""Delivery limits and dead-letter queues.

A message that keeps coming back is redelivered with a growing
``x-delivery-count`` and the same message id, then moved to ``dlq.<queue>``
once the delivery limit is reached. A rejected message, or one whose callback
raised, goes there at once. These run on the real Redis and RabbitMQ through a
plain subscriber, and in a worker hosting a service.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from helpers import Harness, Recorder, delete_queues, read_dead_letters, wait_for
from kombu.message import Message
from workflows.services.common_service import CommonService

from workflows_celery import create_app
from workflows_celery.constants import EMBEDDED_BROKER_URL, HEADER_DELIVERY_COUNT
from workflows_celery.deadletter import dead_letter_queue
from workflows_celery.embedded import embedded_worker
from workflows_celery.transport import CeleryTransport


def death_of(message: Message) -> dict[str, Any]:
    """Return the first ``x-death`` record of a dead-lettered message."""
    deaths = message.headers["x-death"]
    assert isinstance(deaths, list) and deaths
    return dict(deaths[0])


def step_kwargs(message: Message) -> dict[str, Any]:
    """Return the step task's keyword arguments carried by a message."""
    _, kwargs, _ = message.decode()
    return dict(kwargs)


# -- A plain subscriber ------------------------------------------------------------


def test_nacked_message_dead_lettered_at_limit(harness: Harness) -> None:
    name = harness.queue("nacked")
    receiver = harness.transport()
    recorder = Recorder()

    def nack_every_time(header: Any, message: Any) -> None:
        recorder(header, message)
        receiver.nack(header)

    receiver.subscribe(name, nack_every_time, acknowledgement=True)
    harness.transport().send(name, {"image": 1}, headers={"origin": "test"})

    dead = read_dead_letters(harness.app, name)
    assert len(dead) == 1
    assert len(recorder.deliveries) == 5
    headers = recorder.headers
    assert len({header["message-id"] for header in headers}) == 1
    assert [header.get(HEADER_DELIVERY_COUNT, 0) for header in headers] == [0, 1, 2, 3, 4]
    assert [header["redelivered"] for header in headers] == [False, True, True, True, True]
    assert all(header["origin"] == "test" for header in headers)

    death = death_of(dead[0])
    assert death["reason"] == "delivery_limit"
    assert death["queue"] == name
    kwargs = step_kwargs(dead[0])
    assert kwargs["queue"] == name
    assert kwargs["message"] == {"image": 1}
    assert kwargs["headers"]["origin"] == "test"
    assert dead[0].headers["id"] == headers[0]["message-id"]
    assert "limit is 5" in dead[0].headers["x-workflows-error"]["error"]


def test_rejected_message_dead_lettered_at_once(harness: Harness) -> None:
    name = harness.queue("rejected")
    receiver = harness.transport()
    recorder = Recorder()

    def reject(header: Any, message: Any) -> None:
        recorder(header, message)
        receiver.nack(header, requeue=False)

    receiver.subscribe(name, reject, acknowledgement=True)
    harness.transport().send(name, "poison")

    dead = read_dead_letters(harness.app, name)
    assert len(dead) == 1
    assert death_of(dead[0])["reason"] == "rejected"
    assert step_kwargs(dead[0])["message"] == "poison"
    assert recorder.messages == ["poison"]


def test_failed_callback_dead_lettered(harness: Harness) -> None:
    name = harness.queue("failed")
    calls = Recorder()

    def fail(header: Any, message: Any) -> None:
        calls(header, message)
        raise ValueError("image header unreadable")

    harness.transport().subscribe(name, fail)
    harness.transport().send(name, {"image": 2})

    dead = read_dead_letters(harness.app, name)
    assert len(dead) == 1
    assert death_of(dead[0])["reason"] == "failed"
    assert "image header unreadable" in dead[0].headers["x-workflows-error"]["error"]
    assert calls.messages == [{"image": 2}]


def test_delivery_limit_setting_applies(harness: Harness) -> None:
    harness.app.conf.workflows_delivery_limit = 2
    name = harness.queue("limit")
    receiver = harness.transport()
    recorder = Recorder()

    def nack_every_time(header: Any, message: Any) -> None:
        recorder(header, message)
        receiver.nack(header)

    receiver.subscribe(name, nack_every_time, acknowledgement=True)
    harness.transport().send(name, "again")

    assert len(read_dead_letters(harness.app, name)) == 1
    assert len(recorder.deliveries) == 2


def test_acked_message_not_dead_lettered(harness: Harness) -> None:
    name = harness.queue("acked")
    receiver = harness.transport()
    recorder = Recorder()

    def ack(header: Any, message: Any) -> None:
        recorder(header, message)
        receiver.ack(header)

    receiver.subscribe(name, ack, acknowledgement=True)
    harness.transport().send(name, "fine")

    assert wait_for(lambda: recorder.received("fine"))
    assert read_dead_letters(harness.app, name, timeout_s=1.0) == []
    assert recorder.count("fine") == 1


# -- A worker hosting a service ------------------------------------------------------


def judge_service(prefix: str, events: Recorder) -> type[CommonService]:
    """Build a service whose queues each settle messages in one way."""

    class Judge(CommonService):
        _service_name = "Judge"

        def initializing(self) -> None:
            for verdict in ("nack", "reject", "raise", "silent", "ack"):
                self._transport.subscribe(
                    f"{prefix}.{verdict}",
                    self._make_callback(verdict),
                    acknowledgement=True,
                )

        def _make_callback(self, verdict: str) -> Any:
            def judge(header: Any, message: Any) -> None:
                events(header, (verdict, message))
                if verdict == "nack":
                    self._transport.nack(header)
                elif verdict == "reject":
                    self._transport.nack(header, requeue=False)
                elif verdict == "raise":
                    raise RuntimeError(f"cannot process {message!r}")
                elif verdict == "ack":
                    self._transport.ack(header)

            return judge

    return Judge


@pytest.fixture(params=["memory", "redis", "rabbitmq"])
def worker_app(request: pytest.FixtureRequest, redis_url: str, amqp_url: str) -> Iterator[Celery]:
    """An app on the in-memory broker and on each real broker in turn."""
    url = {"memory": EMBEDDED_BROKER_URL, "redis": redis_url, "rabbitmq": amqp_url}[request.param]
    app = create_app(url, main=f"tests.deadletter.{request.param}")
    yield app
    app.close()


def test_worker_settles_each_verdict(worker_app: Celery, unique: str) -> None:
    prefix = f"test.deadletter.{unique}"
    events = Recorder()
    with embedded_worker([judge_service(prefix, events)], app=worker_app) as (app, _):
        sender = CeleryTransport(app)
        for verdict in ("nack", "reject", "raise", "silent", "ack"):
            sender.send(f"{prefix}.{verdict}", verdict)

        dead = {
            verdict: read_dead_letters(app, f"{prefix}.{verdict}")
            for verdict in ("nack", "reject", "raise", "silent")
        }
        assert wait_for(lambda: ("ack", "ack") in events.messages)
        seen = [verdict for verdict, _ in events.messages]
        deliveries = {verdict: seen.count(verdict) for verdict in set(seen)}

    assert death_of(dead["nack"][0])["reason"] == "delivery_limit"
    assert death_of(dead["silent"][0])["reason"] == "delivery_limit"
    assert death_of(dead["reject"][0])["reason"] == "rejected"
    assert death_of(dead["raise"][0])["reason"] == "failed"
    assert "cannot process 'raise'" in dead["raise"][0].headers["x-workflows-error"]["error"]
    assert deliveries == {"nack": 5, "silent": 5, "reject": 1, "raise": 1, "ack": 1}
    queues = [f"{prefix}.{verdict}" for verdict in ("nack", "reject", "raise", "silent", "ack")]
    delete_queues(worker_app, queues + [dead_letter_queue(name) for name in queues])
