"""The Redis transport's in-flight lists: a message taken by a consumer that dies
before recording it goes back to its queue, and one taken by a live consumer stays."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from helpers import Recorder, delete_queues, wait_for

from workflows_celery import CeleryTransport, create_app
from workflows_celery.redis_transport import IN_FLIGHT_PREFIX, TRANSPORT_NAME, Channel

#: A consumer id that no live consumer has.
GONE_CONSUMER = "0" * 32


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    created = create_app(redis_url, main="tests.redis_transport")
    yield created
    created.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    created = redis.Redis.from_url(redis_url)
    yield created
    created.close()


def take_as(client: redis.Redis, consumer: str, queue: str) -> str:
    """Move the next message of ``queue`` to ``consumer``'s in-flight list, as a consumer does."""
    key = f"{IN_FLIGHT_PREFIX}{consumer}:{queue}"
    assert client.lmove(queue, key, "RIGHT", "LEFT") is not None
    return key


def test_redis_apps_use_this_transport(app: Celery) -> None:
    assert app.conf.broker_transport == TRANSPORT_NAME
    with app.connection_for_write() as connection:
        assert isinstance(connection.default_channel, Channel)


def test_message_of_lost_consumer_goes_back(app: Celery, client: redis.Redis, unique: str) -> None:
    queue = f"test.inflight.{unique}"
    CeleryTransport(app).send(queue, {"n": 1})
    key = take_as(client, GONE_CONSUMER, queue)
    assert client.llen(queue) == 0
    receiver = CeleryTransport(app)
    seen = Recorder()
    try:
        with app.connection_for_write() as connection:
            assert connection.default_channel.recover_in_flight() >= 1
        assert client.llen(queue) == 1
        assert not client.exists(key)

        receiver.subscribe(queue, seen)
        assert wait_for(lambda: seen.messages == [{"n": 1}])
    finally:
        receiver.disconnect()
        client.delete(key)
        delete_queues(app, [queue])


def test_message_of_live_consumer_stays(app: Celery, client: redis.Redis, unique: str) -> None:
    queue = f"test.inflight.{unique}.live"
    consumer = unique.ljust(32, "0")
    CeleryTransport(app).send(queue, {"n": 2})
    key = take_as(client, consumer, queue)
    client.set(f"{IN_FLIGHT_PREFIX}{consumer}", b"1", px=60_000)
    try:
        with app.connection_for_write() as connection:
            connection.default_channel.recover_in_flight()
        assert client.llen(key) == 1
        assert client.llen(queue) == 0
    finally:
        client.delete(key, f"{IN_FLIGHT_PREFIX}{consumer}")
        delete_queues(app, [queue])


def test_consumed_messages_leave_no_in_flight_list(
    app: Celery, client: redis.Redis, unique: str
) -> None:
    queue = f"test.inflight.{unique}.consumed"
    receiver = CeleryTransport(app)
    seen = Recorder()

    def record_and_ack(header: dict[str, object], message: object) -> None:
        seen(header, message)
        receiver.ack(header)

    try:
        receiver.subscribe(queue, record_and_ack, acknowledgement=True)
        sender = CeleryTransport(app)
        for n in range(20):
            sender.send(queue, n)
        assert wait_for(lambda: sorted(seen.messages) == list(range(20)))
        assert list(client.scan_iter(match=f"{IN_FLIGHT_PREFIX}*:{queue}")) == []
    finally:
        receiver.disconnect()
        delete_queues(app, [queue])
