"""Bad messages: each gets a clear error and is kept, never lost.

Celery logs and drops a message it cannot decode, whose content type it does
not accept (pickle), that has no task headers or that names an unknown task.
The worker's consumer first copies each to ``dlq.<queue>``, byte for byte. A
message without a recipe on a queue read with ``wrap_subscribe`` goes there at
once, and a message over the size limit is refused to its sender.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import workflows.recipe
from celery import Celery
from helpers import Recorder, delete_queues, read_dead_letters, wait_for
from kombu import Exchange
from workflows.services.common_service import CommonService

from workflows_celery import CeleryTransport, create_app, dlq, routing, setup_app, start_recipe
from workflows_celery.constants import SETTING_MAX_MESSAGE_BYTES, STEP_TASK_NAME
from workflows_celery.deadletter import dead_letter_queue
from workflows_celery.embedded import embedded_worker
from workflows_celery.errors import (
    MessageEncodeError,
    MessageTooLargeError,
    TransportNotConnectedError,
)


def reader_service(queue: str, seen: Recorder) -> type[CommonService]:
    """Build a service that records every message on ``queue``."""

    class Reader(CommonService):
        _service_name = "Reader"

        def initializing(self) -> None:
            self._transport.subscribe(queue, seen)

    return Reader


@pytest.fixture
def app(broker_url: str) -> Iterator[Celery]:
    created = create_app(broker_url, main="tests.bad_input")
    yield created
    created.close()


def publish_raw(app: Celery, queue: str, body: Any, **options: Any) -> None:
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange="",
            routing_key=queue,
            declare=[routing.task_queue(queue)],
            **options,
        )


#: Connections that fill the listen queue of the silent port (its backlog is 0,
#: which Linux rounds up to a small number).
SILENT_PORT_FILLERS = 8

BAD_MESSAGES = {
    "pickle": (
        pickle.dumps(([], {"queue": "x"}, {})),
        {
            "content_type": "application/x-python-serialize",
            "content_encoding": "binary",
            "headers": {"task": STEP_TASK_NAME, "id": "bad-pickle"},
        },
        "invalid task message",
    ),
    "malformed JSON": (
        b'{"queue": ',
        {
            "content_type": "application/json",
            "content_encoding": "utf-8",
            "headers": {"task": STEP_TASK_NAME, "id": "bad-json"},
        },
        "undecodable",
    ),
    "no headers": (
        b'{"image": 1}',
        {"content_type": "application/json", "content_encoding": "utf-8"},
        "not a task message",
    ),
    "unknown task": (
        b'[[], {}, {}]',
        {
            "content_type": "application/json",
            "content_encoding": "utf-8",
            "headers": {"task": "somebody.elses.task", "id": "bad-task"},
        },
        "unknown task",
    ),
}


def test_worker_keeps_messages_it_cannot_run(app: Celery, unique: str) -> None:
    queue = f"test.bad.{unique}"
    seen = Recorder()
    try:
        with embedded_worker([reader_service(queue, seen)], app=app):
            for body, options, _ in BAD_MESSAGES.values():
                publish_raw(app, queue, body, **options)
            kept = read_dead_letters(app, queue, expected=len(BAD_MESSAGES))

        errors = sorted(letter.headers["x-workflows-error"]["error"] for letter in kept)
        assert len(kept) == len(BAD_MESSAGES), errors
        bodies = {
            letter.body if isinstance(letter.body, bytes) else letter.body.encode()
            for letter in kept
        }
        for case, (body, _, reason) in BAD_MESSAGES.items():
            assert any(error.startswith(reason) for error in errors), (case, errors)
            assert body in bodies, case
        assert all(letter.headers["x-death"][0]["queue"] == queue for letter in kept)
        assert seen.messages == []
    finally:
        delete_queues(app, [queue, dead_letter_queue(queue)])


def test_good_message_after_bad_ones_runs(app: Celery, unique: str) -> None:
    queue = f"test.bad.{unique}.then.good"
    seen = Recorder()
    try:
        with embedded_worker([reader_service(queue, seen)], app=app):
            body, options, _ = BAD_MESSAGES["no headers"]
            publish_raw(app, queue, body, **options)
            CeleryTransport(app).send(queue, {"good": True})
            assert wait_for(lambda: seen.messages == [{"good": True}])
    finally:
        delete_queues(app, [queue, dead_letter_queue(queue)])


def test_bad_message_kept_and_reinjected_as_is(app: Celery, unique: str) -> None:
    """A message sent through a named exchange is kept too, and goes back byte for byte."""
    queue = f"test.bad.{unique}.exchange"
    seen = Recorder()
    body = b'{"queue": '
    try:
        with embedded_worker([reader_service(queue, seen)], app=app):
            with app.connection_for_write() as connection:
                exchange = Exchange(f"test.bad.{unique}.direct", type="direct", auto_delete=True)
                bound = routing.task_queue(queue)(connection.default_channel)
                exchange(connection.default_channel).declare()
                bound.declare()
                bound.bind_to(exchange=exchange.name, routing_key=queue)
                producer = connection.Producer()
                producer.publish(
                    body,
                    exchange=exchange,
                    routing_key=queue,
                    content_type="application/json",
                    content_encoding="utf-8",
                    headers={"task": STEP_TASK_NAME, "id": f"bad-{unique}"},
                )
            assert wait_for(lambda: dlq.count(app, queue) == 1)

        letters = dlq.reinject(app, queue, message_ids={f"bad-{unique}"})
        assert [letter.raw for letter in letters] == [True]
        (again,) = read_dead_letters(app, queue, expected=1, timeout_s=0.1) or [None]
        assert again is None
        with app.connection_for_write() as connection:
            resent = routing.task_queue(queue)(connection.default_channel).get(no_ack=True)
        assert resent is not None
        resent_body = resent.body if isinstance(resent.body, bytes) else resent.body.encode()
        assert resent_body == body
        assert resent.headers["workflows-reinjected"]["from"] == dead_letter_queue(queue)
    finally:
        delete_queues(app, [queue, dead_letter_queue(queue)])


# -- A message without a recipe on a recipe queue ------------------------------------


def recipe_reader(queue: str, seen: Recorder, *, allow_non_recipe: bool = False) -> type[CommonService]:
    """Build a service that reads ``queue`` with ``wrap_subscribe``, recording what it gets."""

    class RecipeReader(CommonService):
        _service_name = "Recipe reader"

        def initializing(self) -> None:
            workflows.recipe.wrap_subscribe(
                self._transport,
                queue,
                self.receive,
                acknowledgement=True,
                allow_non_recipe_messages=allow_non_recipe,
            )

        def receive(self, rw: Any, header: dict[str, Any], message: Any) -> None:
            seen(header, {"recipe": rw is not None, "message": message})
            self._transport.ack(header)

    return RecipeReader


def assert_dead_lettered_as_not_a_recipe(app: Celery, queue: str) -> None:
    (letter,) = read_dead_letters(app, queue)
    error = letter.headers["x-workflows-error"]["error"]
    assert "carries no recipe" in error, error
    assert "allow_non_recipe_messages" in error, error
    assert letter.headers["x-death"][0]["reason"] == "rejected"
    assert letter.headers["x-death"][0]["queue"] == queue
    # At once: the first delivery, not the last of five.
    _, kwargs, _ = letter.decode()
    assert not kwargs["headers"].get("x-delivery-count")
    assert kwargs["message"] == {"plain": True}


def test_non_recipe_message_dead_lettered_at_once(app: Celery, unique: str) -> None:
    queue = f"test.bad.{unique}.norecipe"
    seen = Recorder()
    try:
        with embedded_worker([recipe_reader(queue, seen)], app=app):
            CeleryTransport(app).send(queue, {"plain": True})
            assert_dead_lettered_as_not_a_recipe(app, queue)
        assert seen.messages == []
    finally:
        delete_queues(app, [queue, dead_letter_queue(queue)])


def test_non_recipe_message_dead_lettered_by_plain_subscriber(app: Celery, unique: str) -> None:
    queue = f"test.bad.{unique}.norecipe.plain"
    seen = Recorder()
    receiver = CeleryTransport(app)
    try:
        workflows.recipe.wrap_subscribe(
            receiver, queue, lambda rw, header, message: seen(header, message), acknowledgement=True
        )
        CeleryTransport(app).send(queue, {"plain": True})
        assert_dead_lettered_as_not_a_recipe(app, queue)
        assert seen.messages == []
    finally:
        receiver.disconnect()
        delete_queues(app, [queue, dead_letter_queue(queue)])


def test_non_recipe_message_reaches_service_that_allows_it(app: Celery, unique: str) -> None:
    queue = f"test.bad.{unique}.allowed"
    seen = Recorder()
    try:
        with embedded_worker([recipe_reader(queue, seen, allow_non_recipe=True)], app=app):
            CeleryTransport(app).send(queue, {"plain": True})
            assert wait_for(lambda: len(seen.messages) == 1)
        assert seen.messages == [{"recipe": False, "message": {"plain": True}}]
        assert dlq.count(app, queue) == 0
    finally:
        delete_queues(app, [queue, dead_letter_queue(queue)])


# -- Size limit -------------------------------------------------------------------------


def queue_length(app: Celery, queue: str) -> int:
    """Return the number of messages waiting in ``queue`` (declaring it if needed)."""
    with app.connection_for_write() as connection:
        channel = connection.channel()
        try:
            routing.task_queue(queue)(channel).declare()
            return int(channel.queue_declare(queue, passive=True).message_count)
        except connection.channel_errors:
            # Redis keeps no empty list, so an empty queue is not found.
            return 0
        finally:
            channel.close()


def test_message_over_size_limit_refused_at_sender(app: Celery, unique: str) -> None:
    queue = f"test.bad.{unique}.large"
    app.conf[SETTING_MAX_MESSAGE_BYTES] = 1000
    sender = CeleryTransport(app)
    try:
        with pytest.raises(MessageTooLargeError) as raised:
            sender.send(queue, {"data": "x" * 2000})
        text = str(raised.value)
        assert queue in text
        assert "over the limit of 1000 bytes" in text
        assert SETTING_MAX_MESSAGE_BYTES in text
        assert "path of a file" in text

        transaction = sender.transaction_begin()
        with pytest.raises(MessageTooLargeError):
            sender.send(queue, {"data": "x" * 2000}, transaction=transaction)
        sender.send(queue, {"data": "small"}, transaction=transaction)
        sender.transaction_commit(transaction)

        # Only the small message was sent.
        assert wait_for(lambda: queue_length(app, queue) == 1)
    finally:
        delete_queues(app, [queue])


def test_unserialisable_value_named_in_error(app: Celery, unique: str) -> None:
    queue = f"test.bad.{unique}.unserialisable"
    sender = CeleryTransport(app)

    with pytest.raises(MessageEncodeError) as raised:
        sender.send(queue, {"images": [1, {"mask": {1, 2}}]})
    assert "the message['images'][1]['mask'] is not JSON serialisable" in str(raised.value)

    with pytest.raises(MessageEncodeError) as raised:
        sender.send(queue, {"n": 1}, headers={"origin": {"host": object()}})
    assert "the headers['origin']['host'] is not JSON serialisable" in str(raised.value)
    assert queue_length(app, queue) == 0
    delete_queues(app, [queue])


# -- Brokers that cannot be reached -------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose listen queue is full, so new connections hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    waiting = []
    for _ in range(SILENT_PORT_FILLERS):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        waiting.append(filler)
    try:
        yield port
    finally:
        for filler in waiting:
            filler.close()
        server.close()


@pytest.mark.timeout(60)
def test_silent_redis_host_fails_send(silent_port: int) -> None:
    app = Celery("tests.silent", broker=f"redis://127.0.0.1:{silent_port}/0", set_as_current=False)
    # One second instead of Celery's four, for a quicker test.
    app.conf.broker_connection_timeout = 1.0
    setup_app(app)
    recipe = {"1": {"queue": "tests.bad_input.silent"}, "start": [[1, {}]]}

    assert app.conf.broker_transport_options["socket_connect_timeout"] == app.conf.broker_connection_timeout
    with pytest.raises(TransportNotConnectedError, match=r"unreachable \(Timeout connecting"):
        start_recipe(recipe, app=app)
