"""The Redis transport: a taken message is recorded as unacknowledged in the same
script, so a consumer that dies right after taking it loses nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from helpers import Recorder, delete_queues, wait_for

from kombu import Consumer
from kombu.message import Message

from workflows_celery import CeleryTransport, create_app, routing
from workflows_celery.redis_transport import (
    _TAKE,
    TRANSPORT_NAME,
    UNREADABLE_PREFIX,
    Channel,
    signal_key,
)

#: Visibility timeout of the app whose lost messages come back in the test, in seconds.
SHORT_VISIBILITY_S = 1.0


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    created = create_app(redis_url, main="tests.redis_transport")
    created.conf.broker_transport_options = {"visibility_timeout": SHORT_VISIBILITY_S}
    yield created
    created.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    created = redis.Redis.from_url(redis_url)
    yield created
    created.close()


def take_as_dying_consumer(client: redis.Redis, channel: Channel, queue: str) -> str:
    """Take the next message of ``queue`` as a consumer does, and never ack it; return its tag."""
    reply = client.eval(
        _TAKE,
        3,
        channel.unacked_index_key,
        channel.unacked_key,
        queue,
        time.time(),
        UNREADABLE_PREFIX,
        "1",
    )
    assert reply is not None
    return str(json.loads(reply[1])["properties"]["delivery_tag"])


def test_redis_apps_use_this_transport(app: Celery) -> None:
    assert app.conf.broker_transport == TRANSPORT_NAME
    with app.connection_for_write() as connection:
        assert isinstance(connection.default_channel, Channel)


def test_taken_message_is_recorded_unacked(app: Celery, client: redis.Redis, unique: str) -> None:
    queue = f"test.take.{unique}"
    CeleryTransport(app).send(queue, {"n": 1})
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        tag = take_as_dying_consumer(client, channel, queue)
        try:
            assert client.llen(queue) == 0
            assert client.zscore(channel.unacked_index_key, tag) is not None
            record = json.loads(client.hget(channel.unacked_key, tag))
            assert record[2] == queue
            assert record[0]["properties"]["delivery_tag"] == tag
        finally:
            client.zrem(channel.unacked_index_key, tag)
            client.hdel(channel.unacked_key, tag)
            delete_queues(app, [queue])


def test_message_of_dead_consumer_comes_back(app: Celery, client: redis.Redis, unique: str) -> None:
    queue = f"test.take.{unique}.dead"
    CeleryTransport(app).send(queue, {"n": 2})
    receiver = CeleryTransport(app)
    seen = Recorder()
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            take_as_dying_consumer(client, channel, queue)
            time.sleep(SHORT_VISIBILITY_S + 0.2)
            channel.qos.restore_visible(num=1000)
        assert client.llen(queue) == 1

        receiver.subscribe(queue, seen)
        assert wait_for(lambda: seen.messages == [{"n": 2}])
    finally:
        receiver.disconnect()
        delete_queues(app, [queue])


def test_unreadable_message_is_kept(app: Celery, client: redis.Redis, unique: str) -> None:
    queue = f"test.take.{unique}.unreadable"
    unreadable = f"{UNREADABLE_PREFIX}{queue}"
    receiver = CeleryTransport(app)
    seen = Recorder()
    try:
        client.lpush(queue, b"not a kombu message")
        CeleryTransport(app).send(queue, {"n": 3})
        receiver.subscribe(queue, seen)

        assert wait_for(lambda: seen.messages == [{"n": 3}])
        assert client.lrange(unreadable, 0, -1) == [b"not a kombu message"]
    finally:
        receiver.disconnect()
        client.delete(unreadable)
        delete_queues(app, [queue])


def test_no_ack_consumer_leaves_no_record(app: Celery, client: redis.Redis, unique: str) -> None:
    queue = f"test.take.{unique}.noack"
    tags: list[str] = []

    def on_message(body: object, message: Message) -> None:
        tags.append(str(message.delivery_tag))

    CeleryTransport(app).send(queue, {"n": 5})
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            with Consumer(channel, [routing.task_queue(queue)], no_ack=True, callbacks=[on_message]):
                connection.drain_events(timeout=5)
            unacked_key = channel.unacked_key
            unacked_index_key = channel.unacked_index_key
        assert len(tags) == 1
        assert not client.hexists(unacked_key, tags[0])
        assert client.zscore(unacked_index_key, tags[0]) is None
    finally:
        delete_queues(app, [queue])


def test_publish_pushes_a_signal(app: Celery, client: redis.Redis, unique: str) -> None:
    queue = f"test.take.{unique}.signal"
    try:
        CeleryTransport(app).send(queue, {"n": 4})
        assert client.llen(queue) == 1
        assert client.llen(signal_key(queue)) == 1
        assert 0 < client.pttl(signal_key(queue)) <= 60_000
    finally:
        client.delete(signal_key(queue))
        delete_queues(app, [queue])


def test_acked_messages_leave_no_record(app: Celery, client: redis.Redis, unique: str) -> None:
    queue = f"test.take.{unique}.acked"
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
        with app.connection_for_write() as connection:
            unacked_key = connection.default_channel.unacked_key
        assert wait_for(
            lambda: not any(queue.encode() in record for record in client.hvals(unacked_key))
        )
    finally:
        receiver.disconnect()
        delete_queues(app, [queue])
