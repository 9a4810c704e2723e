"""Held messages stay invisible on Redis past the visibility timeout.

kombu's Redis transport hands a message that stays unacknowledged longer than
the visibility timeout to another consumer. The tests use a timeout of 2 s,
hold a message for longer, and run kombu's own restore scan meanwhile: the
message must not come back while its holder is alive.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from helpers import Recorder, delete_queues, stays_false, wait_for
from workflows.services.common_service import CommonService

from workflows_celery import CeleryTransport, create_app
from workflows_celery.deadletter import dead_letter_queue
from workflows_celery.embedded import embedded_worker
from workflows_celery.leases import DEFAULT_VISIBILITY_TIMEOUT_S

#: Visibility timeout of the test apps, in seconds.
VISIBILITY_TIMEOUT_S = 2.0

#: How long the tests hold a message: well past the visibility timeout.
HOLD_S = 3 * VISIBILITY_TIMEOUT_S


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    created = create_app(redis_url, main="tests.leases")
    created.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    yield created
    created.close()


def restore_expired(app: Celery) -> None:
    """Run kombu's scan that gives expired unacknowledged messages back to their queue."""
    with app.connection_for_write() as connection:
        connection.default_channel.qos.restore_visible(num=1000, interval=1)


def waiting_in_queue(app: Celery, queue: str) -> int:
    """Return the number of messages waiting in a Redis queue (not held by anyone)."""
    with app.connection_for_write() as connection:
        return int(connection.default_channel.client.llen(queue))


def test_redis_app_gets_short_visibility_timeout(redis_url: str, amqp_url: str) -> None:
    redis_app = create_app(redis_url)
    amqp_app = create_app(amqp_url)

    options = redis_app.conf.broker_transport_options
    assert options["visibility_timeout"] == DEFAULT_VISIBILITY_TIMEOUT_S
    assert "visibility_timeout" not in (amqp_app.conf.broker_transport_options or {})


def test_subscriber_keeps_unacked_message(app: Celery, unique: str) -> None:
    queue = f"test.leases.{unique}.held"
    receiver = CeleryTransport(app)
    recorder = Recorder()
    receiver.subscribe(queue, recorder, acknowledgement=True)
    try:
        CeleryTransport(app).send(queue, "held")
        assert wait_for(lambda: recorder.received("held"))

        time.sleep(HOLD_S)
        restore_expired(app)

        assert waiting_in_queue(app, queue) == 0
        assert stays_false(lambda: recorder.count("held") > 1, period_s=2.0)
        receiver.ack(recorder.header_of("held"))
    finally:
        receiver.disconnect()
        delete_queues(app, [queue, dead_letter_queue(queue)])


def slow_service(queue: str, runs: Recorder) -> type[CommonService]:
    """Build a service whose step takes longer than the visibility timeout."""

    class Slow(CommonService):
        _service_name = "Slow"

        def initializing(self) -> None:
            self._transport.subscribe(queue, self.work)

        def work(self, header: Any, message: Any) -> None:
            runs(header, message)
            time.sleep(HOLD_S)

    return Slow


def test_long_step_not_started_twice(app: Celery, unique: str) -> None:
    queue = f"test.leases.{unique}.slow"
    runs = Recorder()
    try:
        with embedded_worker([slow_service(queue, runs)], app=app) as (worker_app, tracker):
            CeleryTransport(worker_app).send(queue, "long")
            assert wait_for(lambda: runs.received("long"))

            # Scan while the step still runs, after its lease would have expired.
            time.sleep(2 * VISIBILITY_TIMEOUT_S)
            restore_expired(worker_app)
            assert waiting_in_queue(worker_app, queue) == 0

            assert tracker.wait_until_idle(3 * HOLD_S)
            assert stays_false(lambda: runs.count("long") > 1, period_s=2.0)
    finally:
        delete_queues(app, [queue, dead_letter_queue(queue)])
