"""The ``workflows-celery dlq`` commands on the real brokers.

A recipe step rejects its message, which lands in the dead-letter queue; the
commands count, show, export and re-inject it, and the run then completes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import workflows.recipe
from celery import Celery
from helpers import Recorder, delete_queues, wait_for
from workflows.services.common_service import CommonService

from soak.brokers import PrivateRabbitMQ, free_port
from workflows_celery import CeleryTransport, create_app, dlq, routing, start_recipe
from workflows_celery.constants import HEADER_REINJECTED
from workflows_celery.deadletter import dead_letter_queue
from workflows_celery.embedded import embedded_worker


def dlq_command(broker_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``workflows-celery dlq ARGS`` against ``broker_url``."""
    return subprocess.run(
        [sys.executable, "-m", "workflows_celery", "dlq", *args, "--broker", broker_url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def picky_service(queue: str, outputs: Recorder) -> type[CommonService]:
    """Build a service that rejects a recipe message until it has been re-injected."""

    class Picky(CommonService):
        _service_name = "Picky"

        def initializing(self) -> None:
            workflows.recipe.wrap_subscribe(
                self._transport, queue, self.process, acknowledgement=True
            )

        def process(self, rw: Any, header: dict[str, Any], payload: Any) -> None:
            if HEADER_REINJECTED not in header:
                self._transport.nack(header, requeue=False)
                return
            outputs(header, payload)
            rw.send({"processed": payload})
            self._transport.ack(header)

    return Picky


def collector_service(queue: str, arrivals: Recorder) -> type[CommonService]:
    """Build a service that records what reaches the last node."""

    class Collector(CommonService):
        _service_name = "Collector"

        def initializing(self) -> None:
            workflows.recipe.wrap_subscribe(self._transport, queue, self.collect)

        def collect(self, rw: Any, header: dict[str, Any], payload: Any) -> None:
            arrivals(header, (rw.environment["ID"], payload))

    return Collector


@pytest.fixture
def app(broker_url: str) -> Iterator[Celery]:
    created = create_app(broker_url, main="tests.dlq_cli")
    yield created
    created.close()


def test_reinjected_message_completes_run(
    app: Celery, broker_url: str, unique: str, tmp_path: Path
) -> None:
    first, last = f"test.dlq.{unique}.picky", f"test.dlq.{unique}.last"
    recipe = {
        "1": {"service": "Picky", "queue": first, "output": 2},
        "2": {"service": "Collector", "queue": last},
        "start": [[1, {"image": 7}]],
    }
    outputs, arrivals = Recorder(), Recorder()
    services = [picky_service(first, outputs), collector_service(last, arrivals)]
    try:
        with embedded_worker(services, app=app) as (worker_app, tracker):
            run_id = start_recipe(recipe, app=worker_app)
            assert wait_for(lambda: tracker.processed >= 1)
            assert tracker.wait_until_idle(15)

            listed = dlq_command(broker_url, "list", first)
            assert listed.returncode == 1, listed.stderr
            assert f"{dead_letter_queue(first)}  1 message" in listed.stdout

            shown = dlq_command(broker_url, "show", first, "--json")
            assert shown.returncode == 0, shown.stderr
            record = json.loads(shown.stdout.splitlines()[0])
            assert record["run-id"] == run_id
            assert record["reason"] == "rejected"
            assert record["queue"] == first

            exported = dlq_command(broker_url, "export", first, "--dir", str(tmp_path))
            assert exported.returncode == 0, exported.stderr
            assert len(list(tmp_path.glob("*.json"))) == 1

            reinjected = dlq_command(broker_url, "reinject", first, "--run", run_id)
            assert reinjected.returncode == 0, reinjected.stderr
            assert "1 message(s) re-injected" in reinjected.stdout

            assert wait_for(lambda: len(arrivals.messages) == 1)
            assert arrivals.messages == [(run_id, {"processed": {"image": 7}})]
            assert outputs.headers[0][HEADER_REINJECTED]["from"] == dead_letter_queue(first)

            empty = dlq_command(broker_url, "list", first)
            assert empty.returncode == 0, empty.stderr
            assert f"{dead_letter_queue(first)}  0 messages" in empty.stdout
    finally:
        delete_queues(app, [first, last, dead_letter_queue(first), dead_letter_queue(last)])


#: A message with values that plain JSON lacks but kombu's encoder keeps.
SENT_VALUES = {"value": 1, "blob": b"\x00\x01", "when": datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)}


def test_reinject_from_exported_file(app: Celery, broker_url: str, unique: str, tmp_path: Path) -> None:
    queue = f"test.dlq.{unique}.file"
    arrivals = Recorder()
    try:
        from workflows_celery.deadletter import REASON_REJECTED, dead_letter
        from workflows_celery.messages import Destination

        dead_letter(
            app,
            Destination(queue),
            {"origin": "test"},
            SENT_VALUES,
            message_id=f"message-{unique}",
            reason=REASON_REJECTED,
            error="test",
        )
        exported = dlq_command(broker_url, "export", queue, "--dir", str(tmp_path))
        assert exported.returncode == 0, exported.stderr
        purged = dlq_command(broker_url, "purge", queue)
        assert "1 message(s) deleted" in purged.stdout

        (path,) = tmp_path.glob("*.json")
        reinjected = dlq_command(broker_url, "reinject", "--file", str(path))
        assert reinjected.returncode == 0, reinjected.stderr

        from workflows_celery import CeleryTransport

        receiver = CeleryTransport(app)
        receiver.subscribe(queue, arrivals)
        try:
            # bytes and datetime values survive the JSON file as they were sent.
            assert wait_for(lambda: arrivals.messages == [SENT_VALUES]), arrivals.messages
        finally:
            receiver.disconnect()
        header = arrivals.headers[0]
        assert header["origin"] == "test"
        assert header["message-id"] == f"message-{unique}"
        assert header[HEADER_REINJECTED]["reason"] == "rejected"
    finally:
        delete_queues(app, [queue, dead_letter_queue(queue)])


def test_list_without_management_api_fails(amqp_url: str) -> None:
    listed = dlq_command(amqp_url, "list", "--management-url", f"http://127.0.0.1:{free_port()}")
    assert listed.returncode == 2
    assert "management API at http://127.0.0.1:" in listed.stderr
    assert "rabbitmq_management" in listed.stderr
    assert "name the queues to check" in listed.stderr
    assert "guest:**@" in listed.stderr


@pytest.mark.timeout(180)
def test_list_on_rabbitmq_finds_every_dead_letter_queue(tmp_path: Path, unique: str) -> None:
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed")
    broker = PrivateRabbitMQ(tmp_path / "broker", management=True)
    broker.start()
    app = create_app(broker.url, main="tests.dlq_cli.listing")
    try:
        full, empty = f"test.{unique}.full", f"test.{unique}.empty"
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            for name in (full, dead_letter_queue(full), dead_letter_queue(empty)):
                routing.task_queue(name)(channel).declare()
            producer = connection.Producer()
            for n in range(2):
                producer.publish({"n": n}, routing_key=dead_letter_queue(full))

        listed = dlq_command(broker.url, "list", "--management-url", broker.management_url)

        assert listed.returncode == 1, listed.stderr
        assert listed.stdout.splitlines() == [
            f"{dead_letter_queue(empty)}  0 messages",
            f"{dead_letter_queue(full)}  2 messages",
        ]
    finally:
        app.close()
        broker.stop()
        broker.remove_data()


def test_reinject_needs_queue_or_file(redis_url: str) -> None:
    result = dlq_command(redis_url, "reinject")
    assert result.returncode == 2
    assert "name a dead-letter QUEUE or give --file FILE" in result.stderr


def test_reinject_unknown_run_fails(redis_url: str, unique: str) -> None:
    result = dlq_command(redis_url, "reinject", f"test.dlq.{unique}.none", "--run", "3f2c")
    assert result.returncode == 1
    assert "no message matched --run/--id" in result.stderr


def test_list_unreachable_broker_is_error() -> None:
    result = dlq_command("redis://:secret@127.0.0.1:1/0", "list")
    assert result.returncode == 2
    assert "secret" not in result.stderr + result.stdout


@contextmanager
def rabbitmq_dead_lettering(queue: str) -> Iterator[None]:
    """Let RabbitMQ itself dead-letter the messages of ``queue`` to ``dlq.<queue>``.

    A policy does it, because queue arguments would clash with the plain
    durable queue that senders declare.
    """
    name = f"workflows-celery-test-{queue}"
    definition = json.dumps(
        {"dead-letter-exchange": "", "dead-letter-routing-key": dead_letter_queue(queue)}
    )
    pattern = "^" + re.escape(queue) + "$"
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl is not installed")
    subprocess.run(
        [rabbitmqctl, "-q", "set_policy", "--apply-to", "queues", name, pattern, definition],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        yield
    finally:
        subprocess.run(
            [rabbitmqctl, "-q", "clear_policy", name], check=True, capture_output=True, timeout=60
        )


def test_rabbitmq_dead_letter_read_and_reinjected(amqp_url: str, unique: str) -> None:
    """A message dead-lettered by RabbitMQ, with its own x-death, round-trips too."""
    app = create_app(amqp_url, main="tests.dlq_cli.native")
    queue = f"test.dlq.{unique}.native"
    received = Recorder()
    receiver = CeleryTransport(app)
    try:
        with rabbitmq_dead_lettering(queue):
            CeleryTransport(app).send(queue, {"image": 7}, headers={"origin": "test"})
            with app.connection_for_write() as connection:
                channel = connection.default_channel
                # RabbitMQ drops what it would dead-letter to a missing queue.
                routing.task_queue(dead_letter_queue(queue))(channel).declare()
                taken = routing.task_queue(queue)(channel).get()
                assert taken is not None
                taken.reject(requeue=False)

            assert wait_for(lambda: dlq.count(app, queue) == 1)
            (letter,) = dlq.read(app, queue)
            assert letter.reason == "rejected"
            assert letter.destination is not None and letter.destination.name == queue
            assert letter.message == {"image": 7}
            assert letter.headers["origin"] == "test"
            assert letter.dead_lettered_at is not None
            assert abs(letter.dead_lettered_at - time.time()) < 300

            shown = dlq_command(amqp_url, "show", queue)
            assert shown.returncode == 0, shown.stderr
            assert "rejected" in shown.stdout
            assert queue in shown.stdout

            reinjected = dlq_command(amqp_url, "reinject", queue)
            assert reinjected.returncode == 0, reinjected.stderr
            receiver.subscribe(queue, received)
            assert wait_for(lambda: received.messages == [{"image": 7}])
            header = received.headers[0]
            assert header[HEADER_REINJECTED]["from"] == dead_letter_queue(queue)
            assert header["origin"] == "test"
    finally:
        receiver.disconnect()
        delete_queues(app, [queue, dead_letter_queue(queue)])
        app.close()


def test_commands_need_a_broker() -> None:
    environment = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    # ``list`` exits 2 when it cannot count, apart from 1 for "messages present".
    for action, expected_status in ((["list"], 2), (["show", "images"], 1)):
        result = subprocess.run(
            [sys.executable, "-m", "workflows_celery", "dlq", *action],
            capture_output=True,
            text=True,
            timeout=120,
            env=environment,
        )
        assert result.returncode == expected_status, result.stderr
        assert "No broker given: use --broker URL" in result.stderr


def test_list_marks_missing_rabbitmq_queue(amqp_url: str, unique: str) -> None:
    listed = dlq_command(amqp_url, "list", f"test.dlq.{unique}.typo")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == f"dlq.test.dlq.{unique}.typo  0 messages (no such queue)"


def test_show_missing_queue_is_empty(broker_url: str, unique: str) -> None:
    shown = dlq_command(broker_url, "show", f"test.dlq.{unique}.never")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"0 message(s) in dlq.test.dlq.{unique}.never"


def test_second_death_counts_on(app: Celery, unique: str) -> None:
    """A re-injected message dead-lettered again counts its deaths, as RabbitMQ does."""
    from workflows_celery.deadletter import REASON_REJECTED, dead_letter
    from workflows_celery.messages import Destination

    queue = f"test.dlq.{unique}.again"
    receiver = CeleryTransport(app)

    def reject(header: dict[str, Any], message: Any) -> None:
        receiver.nack(header, requeue=False)

    try:
        dead_letter(
            app,
            Destination(queue),
            {"origin": "test"},
            {"value": 2},
            message_id=f"message-{unique}",
            reason=REASON_REJECTED,
            error="first death",
        )
        assert len(dlq.reinject(app, queue)) == 1
        receiver.subscribe(queue, reject, acknowledgement=True)
        assert wait_for(lambda: dlq.count(app, queue) == 1)

        (letter,) = dlq.read(app, queue)
        latest = letter.deaths[0]
        assert latest["count"] == 2
        assert latest["reason"] == "rejected"
        assert latest["queue"] == queue
        assert len(letter.deaths) == 1
    finally:
        receiver.disconnect()
        delete_queues(app, [queue, dead_letter_queue(queue)])


def test_reading_keeps_queue_order(app: Celery, unique: str) -> None:
    from workflows_celery.deadletter import REASON_REJECTED, dead_letter
    from workflows_celery.messages import Destination

    queue = f"test.dlq.{unique}.order"
    try:
        for number in range(3):
            dead_letter(
                app,
                Destination(queue),
                {},
                {"number": number},
                message_id=f"message-{unique}-{number}",
                reason=REASON_REJECTED,
                error="ordered",
            )
        for _ in range(3):
            assert [letter.message["number"] for letter in dlq.read(app, queue)] == [0, 1, 2]
    finally:
        delete_queues(app, [dead_letter_queue(queue)])
