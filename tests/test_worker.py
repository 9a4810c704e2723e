"""Workflows services hosted by a real ``celery worker`` on the real brokers.

Workers run as subprocesses (``celery -A workflows_celery worker --services ...``)
against Redis and RabbitMQ. The sample services read the fixed queues
``transient.destination`` and ``transient.transaction``, so at most one worker
runs per broker at a time and each test purges those queues before it starts.
Two runs of this module on one machine take turns through a file lock.

The tests of logging and of ``recipe_step`` run an embedded worker in this
process instead, on kombu's in-memory broker.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import workflows
import workflows.recipe
from celery import Celery
from helpers import wait_for
from kombu import Connection
from workers import (
    DESTINATION_QUEUE,
    PREFORK_CONCURRENCY,
    QUEUE_LOCK_TIMEOUT_S,
    TRANSACTION_QUEUE,
    WORKER_READY_TIMEOUT_S,
    WORKER_STOP_TIMEOUT_S,
    WorkerProcess,
    exclusive_sample_queues,
    purge_queues,
)
from workflows.recipe.wrapper import RecipeWrapper
from workflows.services.common_service import CommonService

from soak.brokers import free_port, port_open, private_broker
from workflows_celery import (
    CeleryTransport,
    create_app,
    recipe_step,
    routing,
    setup_app,
    start_recipe,
)
from workflows_celery.constants import STATUS_TOPIC
from workflows_celery.embedded import embedded_worker
from workflows_celery.monitor import StatusBoard
from workflows_celery.status import STATUS_INTERVAL_S

#: Seconds a message may take to pass through a running worker.
DELIVERY_TIMEOUT_S = 30.0

# Waiting for another run (QUEUE_LOCK_TIMEOUT_S) counts towards the first
# test's timeout, so the default timeout of 120 s is raised here.
pytestmark = pytest.mark.timeout(QUEUE_LOCK_TIMEOUT_S + 120)

#: Environment variable read by ``tests.services_for_tests.LifecycleMarker``.
MARKER_DIR_VARIABLE = "WORKFLOWS_CELERY_TEST_MARKER_DIR"
LIFECYCLE_SERVICE = "tests.services_for_tests:LifecycleMarker"

#: Environment variables read by ``tests.services_for_tests.SuddenDeath``.
SUDDEN_DEATH_PREFIX_VARIABLE = "WORKFLOWS_CELERY_TEST_SUDDEN_DEATH_PREFIX"
SUDDEN_DEATH_HANG_VARIABLE = "WORKFLOWS_CELERY_TEST_SUDDEN_DEATH_HANG"

#: Visibility timeout of ``tests.app_short_visibility``, in seconds.
VISIBILITY_TIMEOUT_S = 3.0


class Workers:
    """Worker subprocesses shared by the tests, at most one per broker at a time.

    A test requests a worker with :meth:`get`. A running worker with the same
    options on that broker is reused, and any other worker on that broker is
    stopped first, because two workers would share the sample services' queues.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._running: dict[str, tuple[tuple[Any, ...], WorkerProcess]] = {}
        #: Workers the current test used, whose output is shown when it fails.
        self.used: list[WorkerProcess] = []

    def get(
        self,
        broker_url: str,
        services: list[str] | None,
        *,
        pool: str = "prefork",
        app_module: str = "workflows_celery",
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        """Return a ready worker with these options on ``broker_url``."""
        services_key = None if services is None else tuple(services)
        key = (services_key, pool, app_module, tuple(sorted((env or {}).items())))
        current = self._running.get(broker_url)
        if current is not None and current[0] == key and current[1].is_running():
            worker = current[1]
        else:
            self.stop(broker_url)
            # Messages left by the stopped worker (a producer's, for example)
            # must not reach the new one.
            purge_queues(broker_url, DESTINATION_QUEUE, TRANSACTION_QUEUE)
            worker = WorkerProcess(broker_url, services, pool, app_module, self.log_dir, env)
            self.used.append(worker)
            worker.start()
            self._running[broker_url] = (key, worker)
            worker.wait_until_ready()
        if worker not in self.used:
            self.used.append(worker)
        return worker

    def stop(self, broker_url: str) -> int | None:
        """Stop the worker running on ``broker_url``, if any, and return its exit code."""
        current = self._running.pop(broker_url, None)
        if current is None:
            return None
        return current[1].stop()

    def stop_all(self) -> None:
        """Stop every worker."""
        for broker_url in list(self._running):
            self.stop(broker_url)


class _WorkerOutputOnFailure:
    """pytest plugin that adds the output of a failed test's workers to its report."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if report.when == "call" and report.failed:
            for worker in self.workers.used:
                report.sections.append(
                    (f"Captured output of worker {worker.node_name}", worker.describe())
                )
        return report


@pytest.fixture(scope="module")
def workers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    """The worker subprocesses of this module, stopped when its tests are done."""
    shared = Workers(tmp_path_factory.mktemp("worker-logs"))
    plugin = _WorkerOutputOnFailure(shared)
    with exclusive_sample_queues():
        request.config.pluginmanager.register(plugin)
        try:
            yield shared
        finally:
            shared.stop_all()
            request.config.pluginmanager.unregister(plugin)


@pytest.fixture(autouse=True)
def _reset_used_workers(request: pytest.FixtureRequest) -> None:
    if "workers" in request.fixturenames:
        request.getfixturevalue("workers").used.clear()


# -- Broker helpers -----------------------------------------------------------


def delete_queue(broker_url: str, name: str) -> None:
    """Delete a queue that a test made, ignoring a queue that is already gone."""
    with Connection(broker_url) as connection:
        try:
            routing.task_queue(name).bind(connection.default_channel).delete()
        except connection.channel_errors:
            pass


class Collector:
    """A subscription callback that stores every call's arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._condition = threading.Condition()

    def __call__(self, *args: Any) -> None:
        with self._condition:
            self.calls.append(args)
            self._condition.notify_all()

    def wait_for(
        self, predicate: Callable[[list[tuple[Any, ...]]], bool], timeout_s: float
    ) -> bool:
        """Wait until ``predicate(calls)`` is true, and return False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while not predicate(self.calls):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def snapshot(self) -> list[tuple[Any, ...]]:
        """Return a copy of the calls so far."""
        with self._condition:
            return list(self.calls)


class Client:
    """The test's own connection to a broker: sends, subscriptions and recipe starts."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.app = create_app(broker_url, main=f"tests.client.{uuid.uuid4().hex[:8]}")
        self.transport = CeleryTransport(self.app)
        assert self.transport.connect(), f"cannot connect to {broker_url}"
        self.queues_to_delete: list[str] = []

    def subscribe(self, queue: str) -> Collector:
        """Collect ``(header, message)`` of every message on ``queue``."""
        collector = Collector()
        self.transport.subscribe(queue, collector)
        return collector

    def subscribe_recipe(self, queue: str) -> Collector:
        """Collect ``(recipe_wrapper, header, payload)`` of every recipe message on ``queue``."""
        collector = Collector()
        workflows.recipe.wrap_subscribe(self.transport, queue, collector)
        return collector

    def close(self) -> None:
        self.transport.disconnect()
        for queue in self.queues_to_delete:
            delete_queue(self.broker_url, queue)
        self.app.close()


@pytest.fixture
def client(broker_url: str) -> Iterator[Client]:
    """A connection to the test's broker, made after purging the sample services' queues."""
    purge_queues(broker_url, DESTINATION_QUEUE, TRANSACTION_QUEUE)
    connection = Client(broker_url)
    try:
        yield connection
    finally:
        connection.close()


def pipethrough_recipe(final_queue: str, unique: str) -> dict[str, Any]:
    """Return a recipe of three Message Pipethrough steps that ends on ``final_queue``."""
    return {
        "1": {"service": "Message Pipethrough", "queue": DESTINATION_QUEUE, "output": 2},
        "2": {"service": "Message Pipethrough", "queue": DESTINATION_QUEUE, "output": 3},
        "3": {"service": "Message Pipethrough", "queue": DESTINATION_QUEUE, "output": 4},
        "4": {"service": "Test collector", "queue": final_queue},
        "start": [[1, {"test": unique}]],
    }


def check_pipethrough_run(client: Client, worker: WorkerProcess, unique: str) -> None:
    """Run the three-step Pipethrough recipe through ``worker`` and check its final message."""
    final_queue = f"workflows_celery.test.final.{unique}"
    client.queues_to_delete.append(final_queue)
    collector = client.subscribe_recipe(final_queue)

    run_id = start_recipe(pipethrough_recipe(final_queue, unique), app=client.app)

    arrived = collector.wait_for(lambda calls: len(calls) >= 1, DELIVERY_TIMEOUT_S)
    assert arrived, f"no message reached {final_queue} within {DELIVERY_TIMEOUT_S:.0f} s"
    rw, header, payload = collector.snapshot()[0]
    assert rw is not None, f"the final message is not a recipe message: {header}"
    assert rw.environment["ID"] == run_id
    assert rw.recipe_pointer == 4
    assert rw.recipe_path == [1, 2, 3]
    assert payload == 0
    # SamplePipethrough logs each message it processes, so once per step.
    worker.wait_for_output(r"=== Consume ====", count=3, timeout_s=5)


# -- Sample services in a worker subprocess --------------------------------------


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_pipethrough_recipe_three_steps(
    workers: Workers, client: Client, broker_url: str, pool: str, unique: str
) -> None:
    worker = workers.get(broker_url, ["SamplePipethrough"], pool=pool)

    check_pipethrough_run(client, worker, unique)


def test_consumer_logs_received_message(
    workers: Workers, client: Client, broker_url: str, unique: str
) -> None:
    worker = workers.get(broker_url, ["SampleConsumer"])
    text = f"hello consumer {unique}"

    client.transport.send(DESTINATION_QUEUE, text)

    worker.wait_for_output(
        rf"=== Consume ====(.|\n)*?{re.escape(text)}\nReceived message @",
        timeout_s=DELIVERY_TIMEOUT_S,
    )


def test_producer_timer_sends_to_destination(
    workers: Workers, client: Client, broker_url: str
) -> None:
    worker = workers.get(broker_url, ["SampleProducer", "SampleTxnProducer"])
    collector = client.subscribe(DESTINATION_QUEUE)

    # SampleProducer sends once per 3 s idle period, from each worker process.
    arrived = collector.wait_for(lambda calls: len(calls) >= 2, timeout_s=15)

    assert arrived, f"fewer than 2 messages on {DESTINATION_QUEUE}: {collector.snapshot()}"
    for _, message in collector.snapshot():
        assert re.match(r"Message #\d+\n\+{8}Produced @", message), message
    worker.wait_for_output(r"Sending message #\d+", timeout_s=1)


def test_txn_producer_sends_to_transaction(
    workers: Workers, client: Client, broker_url: str
) -> None:
    worker = workers.get(broker_url, ["SampleProducer", "SampleTxnProducer"])
    collector = client.subscribe(TRANSACTION_QUEUE)

    arrived = collector.wait_for(lambda calls: len(calls) >= 2, timeout_s=15)

    assert arrived, f"fewer than 2 messages on {TRANSACTION_QUEUE}: {collector.snapshot()}"
    for _, message in collector.snapshot():
        assert re.match(r"TXMessage #\d+\n\+{8}Produced@", message), message
    worker.wait_for_output(r"Created message \d+", timeout_s=1)


def test_txn_every_message_arrives(
    workers: Workers, client: Client, broker_url: str, unique: str
) -> None:
    worker = workers.get(broker_url, ["SampleTxn"])
    collector = client.subscribe(DESTINATION_QUEUE)
    expected = {f"transaction {unique} #{n}" for n in range(20)}

    for text in sorted(expected):
        client.transport.send(TRANSACTION_QUEUE, text)

    # SampleTxn aborts about 27 % of its transactions at random (three crash
    # points of 10 % each). An aborted message comes back and is processed
    # again until it commits.
    def all_arrived(calls: list[tuple[Any, ...]]) -> bool:
        return expected <= {message for _, message in calls}

    arrived = collector.wait_for(all_arrived, timeout_s=60)

    received = [message for _, message in collector.snapshot()]
    missing = sorted(expected - set(received))
    assert arrived, f"{len(missing)} of 20 messages never reached {DESTINATION_QUEUE}: {missing}"
    assert set(received) <= expected, f"unexpected messages: {set(received) - expected}"
    # The service logs its commit just after the commit has sent the message.
    worker.wait_for_output(r" 4\. Commit$", count=len(expected), timeout_s=5)


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_in_shutdown_runs_on_stop(
    workers: Workers, broker_url: str, pool: str, tmp_path: Path
) -> None:
    worker = workers.get(
        broker_url, [LIFECYCLE_SERVICE], pool=pool, env={MARKER_DIR_VARIABLE: str(tmp_path)}
    )
    main_pid = worker.pid

    returncode = workers.stop(broker_url)

    assert returncode == 0, worker.describe()
    markers = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    discovery = [m for m in markers if m["event"] == "initializing" and m["dry_run"]]
    started = [m["pid"] for m in markers if m["event"] == "initializing" and not m["dry_run"]]
    stopped = [m["pid"] for m in markers if m["event"] == "in_shutdown"]
    assert [m["pid"] for m in discovery] == [main_pid], markers
    assert not any(m["dry_run"] for m in markers if m["event"] == "in_shutdown"), markers
    assert sorted(stopped) == sorted(started), markers
    if pool == "prefork":
        assert len(set(started)) == PREFORK_CONCURRENCY, markers
        assert main_pid not in started, markers
    else:
        assert started == [main_pid], markers


def test_own_app_hosts_configured_services(
    workers: Workers, client: Client, broker_url: str, unique: str
) -> None:
    worker = workers.get(broker_url, None, app_module="tests.app_for_tests")

    worker.wait_for_output(
        rf"Worker consumes queue '{re.escape(DESTINATION_QUEUE)}' for SamplePipethrough",
        timeout_s=1,
    )
    worker.wait_for_output(r"Started service Message Pipethrough", count=PREFORK_CONCURRENCY)
    check_pipethrough_run(client, worker, unique)


def test_unknown_service_exits_with_error(
    broker_url: str, tmp_path: Path
) -> None:
    worker = WorkerProcess(broker_url, ["NoSuchService"], "solo", "workflows_celery", tmp_path)
    worker.start()
    try:
        worker.process.wait(WORKER_READY_TIMEOUT_S)  # type: ignore[union-attr]
    except subprocess.TimeoutExpired:
        pass
    finally:
        returncode = worker.stop()

    assert returncode not in (0, None, -signal.SIGTERM, -signal.SIGKILL), worker.describe()
    assert "Service 'NoSuchService' not found" in worker.output(), worker.describe()
    assert "SamplePipethrough" in worker.output(), worker.describe()
    assert " ready." not in worker.output(), worker.describe()


# -- Embedded worker in this process ----------------------------------------------


class RecordingHandler(logging.Handler):
    """A logging handler that keeps every record."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LoggingStep(CommonService):
    """A recipe step that logs plainly and inside ``extend_log``."""

    _service_name = "Logging step"
    _logger_name = "workflows.service.test_logging_step"
    queue = ""

    def initializing(self) -> None:
        # No log_extender: the run ID must come from the worker, as it does for
        # services such as SamplePipethrough.
        workflows.recipe.wrap_subscribe(self._transport, self.queue, self.process)

    def process(self, rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
        self.log.info("Step %s received %r", rw.recipe_pointer, payload)
        with self.extend_log("sample_field", payload["sample"]):
            self.log.info("Inside extend_log")


def test_log_records_carry_recipe_id(unique: str) -> None:
    queue = f"test.logging.{unique}"
    service = type("LoggingStep", (LoggingStep,), {"queue": queue})
    recipe = {
        "1": {"service": "Logging step", "queue": queue},
        "start": [[1, {"sample": f"sample-{unique}"}]],
    }
    handler = RecordingHandler()
    service_logger = logging.getLogger(LoggingStep._logger_name)
    service_logger.addHandler(handler)
    try:
        with embedded_worker(services=[service]) as (app, tracker):
            run_id = start_recipe(recipe, app=app)
            assert tracker.wait_until_idle(20), "the recipe step did not finish within 20 s"
    finally:
        service_logger.removeHandler(handler)

    step_records = [r for r in handler.records if r.getMessage().startswith("Step ")]
    extended = [r for r in handler.records if r.getMessage() == "Inside extend_log"]
    assert len(step_records) == 1, [r.getMessage() for r in handler.records]
    assert len(extended) == 1, [r.getMessage() for r in handler.records]
    assert step_records[0].recipe_ID == run_id  # type: ignore[attr-defined]
    assert extended[0].recipe_ID == run_id  # type: ignore[attr-defined]
    assert extended[0].sample_field == f"sample-{unique}"  # type: ignore[attr-defined]
    assert not hasattr(step_records[0], "sample_field")

    # The worker's log text names the service, the run and the node too.
    text = logging.Formatter(app.conf.worker_log_format).format(step_records[0])
    assert f"[Logging step run {run_id} step 1] Step " in text, text
    outside = logging.Formatter(app.conf.worker_log_format).format(
        logging.getLogger("tests").makeRecord("tests", logging.INFO, __file__, 1, "plain", (), None)
    )
    assert outside.endswith("] plain"), outside


def test_recipe_step_function_output_arrives(unique: str) -> None:
    app = setup_app(Celery(f"tests.user_app_{unique}", broker="memory://", set_as_current=False))
    calls: list[tuple[str, Any, Any, Any]] = []
    spots_queue = f"test.find_spots.{unique}"
    store_queue = f"test.store.{unique}"

    @recipe_step(app, spots_queue)
    def find_spots(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
        calls.append(("find_spots", rw, header, payload))
        rw.send_to("success", {"spots": 12, "image": payload["image"]})

    @recipe_step(app, store_queue, name="Store results")
    def store_results(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
        calls.append(("store_results", rw, header, payload))

    recipe = {
        "1": {"service": "Find spots", "queue": spots_queue, "output": {"success": 2}},
        "2": {"service": "Store results", "queue": store_queue},
        "start": [[1, {"image": "image_0001.cbf"}]],
    }
    with embedded_worker(services=[], app=app) as (_, tracker):
        run_id = start_recipe(recipe, app=app)
        assert tracker.wait_until_idle(20), "the recipe steps did not finish within 20 s"

    assert [name for name, *_ in calls] == ["find_spots", "store_results"]
    _, rw, header, payload = calls[0]
    assert isinstance(rw, RecipeWrapper)
    assert isinstance(header, dict)
    assert header.get("workflows-recipe") in (True, "True")
    assert payload == {"image": "image_0001.cbf"}
    _, rw, header, payload = calls[1]
    assert rw.environment["ID"] == run_id
    assert rw.recipe_path == [1]
    assert payload == {"spots": 12, "image": "image_0001.cbf"}


def test_killed_child_loses_nothing(
    workers: Workers, client: Client, broker_url: str, unique: str, tmp_path: Path
) -> None:
    """A prefork child killed with SIGKILL mid-step: the message is delivered again."""
    prefix = f"test.worker.{unique}.sudden"
    client.queues_to_delete += [f"{prefix}.in", f"{prefix}.out"]
    workers.get(
        broker_url,
        ["tests.services_for_tests:SuddenDeath"],
        env={MARKER_DIR_VARIABLE: str(tmp_path), SUDDEN_DEATH_PREFIX_VARIABLE: prefix},
    )
    collector = client.subscribe(f"{prefix}.out")

    client.transport.send(f"{prefix}.in", "survivor")

    assert collector.wait_for(lambda calls: len(calls) >= 1, timeout_s=60)
    (_, forwarded), *others = collector.snapshot()
    assert others == []
    assert forwarded["message"] == "survivor"
    header = forwarded["header"]
    (marker,) = tmp_path.glob("died-*")
    assert marker.name == f"died-{header['message-id']}"
    assert header["redelivered"] is True
    assert header["x-delivery-count"] >= 1


def test_killed_worker_loses_nothing(
    workers: Workers, broker_url: str, unique: str, tmp_path: Path
) -> None:
    """A whole worker killed with SIGKILL mid-step: the next worker runs the step again.

    RabbitMQ returns the message when the connection drops. On Redis it stays
    unacknowledged until the visibility timeout (3 s in
    ``tests.app_short_visibility``) has passed, then comes back.
    """
    client = Client(broker_url)
    prefix = f"test.worker.{unique}.killed"
    client.queues_to_delete += [f"{prefix}.in", f"{prefix}.out"]
    options = {
        "pool": "solo",
        "app_module": "tests.app_short_visibility",
        "env": {
            MARKER_DIR_VARIABLE: str(tmp_path),
            SUDDEN_DEATH_PREFIX_VARIABLE: prefix,
            SUDDEN_DEATH_HANG_VARIABLE: "1",
        },
    }
    try:
        first = workers.get(broker_url, ["tests.services_for_tests:SuddenDeath"], **options)
        collector = client.subscribe(f"{prefix}.out")
        client.transport.send(f"{prefix}.in", "survivor")
        assert wait_until(lambda: any(tmp_path.glob("died-*")), timeout_s=30)

        os.kill(first.pid, signal.SIGKILL)
        assert workers.stop(broker_url) == -signal.SIGKILL
        time.sleep(VISIBILITY_TIMEOUT_S + 1)
        workers.get(broker_url, ["tests.services_for_tests:SuddenDeath"], **options)

        assert collector.wait_for(lambda calls: len(calls) >= 1, timeout_s=60)
        (_, forwarded), *others = collector.snapshot()
        assert others == []
        assert forwarded["message"] == "survivor"
        assert forwarded["header"]["redelivered"] is True
        assert forwarded["header"]["x-delivery-count"] >= 1
    finally:
        workers.stop(broker_url)
        client.close()


def wait_until(predicate: Any, timeout_s: float) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


# -- Status heartbeats -----------------------------------------------------------

#: Fields of the workflows status dict, and the Celery fields added to it.
STATUS_FIELDS = {
    "host", "status", "statustext", "service", "serviceclass", "utilization", "workflows", "celery",
}  # fmt: skip


def statuses_of(board: StatusBoard, worker: WorkerProcess) -> list[dict[str, Any]]:
    """Return the latest status of each service instance of ``worker``."""
    return [
        row
        for row in board.snapshot()
        if str(row.get("celery", {}).get("worker", "")).startswith(f"{worker.node_name}@")
    ]


def test_hosted_services_send_heartbeats(
    workers: Workers, client: Client, broker_url: str, unique: str
) -> None:
    board = StatusBoard()
    client.transport.subscribe_broadcast(STATUS_TOPIC, board)
    worker = workers.get(broker_url, ["SamplePipethrough"])

    # One heartbeat interval at most, and a margin for a busy machine.
    arrived = wait_for(
        lambda: len(statuses_of(board, worker)) == PREFORK_CONCURRENCY,
        timeout_s=STATUS_INTERVAL_S + 10,
    )
    assert arrived, board.snapshot()
    rows = statuses_of(board, worker)
    assert len({row["host"] for row in rows}) == PREFORK_CONCURRENCY
    for row in rows:
        assert STATUS_FIELDS <= row.keys(), row
        assert row["serviceclass"] == "SamplePipethrough"
        assert row["service"] == "Message Pipethrough"
        assert row["workflows"] == workflows.version()
        assert row["celery"]["pool"] == "prefork"
        assert row["celery"]["concurrency"] == PREFORK_CONCURRENCY
        assert row["host"].endswith(f".{row['celery']['pid']}.SamplePipethrough")
        assert abs(sum(row["utilization"].values()) - 1.0) < 0.01, row["utilization"]

    check_pipethrough_run(client, worker, unique)

    # Each step turns a service busy, then idle, and both are announced.
    assert wait_for(
        lambda: sum(row["celery"]["processed"] for row in statuses_of(board, worker)) >= 3,
        timeout_s=STATUS_INTERVAL_S + 10,
    ), statuses_of(board, worker)


def test_status_once_lists_services(workers: Workers, broker_url: str) -> None:
    worker = workers.get(broker_url, ["SamplePipethrough"])

    listed = subprocess.run(
        [
            sys.executable, "-m", "workflows_celery", "status", "--once", "--json",
            "--broker", broker_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip

    assert listed.returncode == 0, listed.stderr
    rows = [
        row for row in json.loads(listed.stdout)
        if row["celery"]["worker"].startswith(f"{worker.node_name}@")
    ]  # fmt: skip
    assert len(rows) == PREFORK_CONCURRENCY, listed.stdout
    assert {row["statustext"] for row in rows} <= {"idle", "processing"}
    assert all(row["gone"] is False and row["last_seen_s"] < STATUS_INTERVAL_S + 3 for row in rows)


def test_worker_without_services_sends_heartbeat(
    workers: Workers, client: Client, broker_url: str
) -> None:
    board = StatusBoard()
    client.transport.subscribe_broadcast(STATUS_TOPIC, board)
    worker = workers.get(broker_url, None)

    arrived = wait_for(
        lambda: len(statuses_of(board, worker)) == 1, timeout_s=STATUS_INTERVAL_S + 10
    )
    assert arrived, board.snapshot()
    (row,) = statuses_of(board, worker)
    assert STATUS_FIELDS <= row.keys(), row
    assert row["service"] == "Celery worker"
    assert row["serviceclass"] == "celery"
    assert row["statustext"] == "idle"
    assert row["celery"]["pool"] == "prefork"
    assert row["celery"]["processed"] == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_heartbeats_resume_after_broker_restart(kind: str, tmp_path: Path) -> None:
    broker = private_broker(kind, tmp_path / "broker")
    broker.start()
    worker = WorkerProcess(broker.url, ["SamplePipethrough"], "prefork", "workflows_celery", tmp_path)
    app = create_app(broker.url, main="tests.status.restart")
    monitor = CeleryTransport(app)
    board = StatusBoard()

    def heard_since(moment: float) -> bool:
        rows = statuses_of(board, worker)
        fresh = [row for row in rows if time.time() - row["last_seen_s"] > moment]
        return len(fresh) == PREFORK_CONCURRENCY

    try:
        worker.start()
        worker.wait_until_ready()
        monitor.subscribe_broadcast(STATUS_TOPIC, board)
        assert wait_for(lambda: heard_since(0), timeout_s=STATUS_INTERVAL_S + 10), worker.describe()

        broker.restart(down_s=2.0)
        restarted = time.time()

        # The worker and the monitor reconnect by themselves (Celery backs off
        # up to several seconds), then the next heartbeat is due within 6 s.
        resumed = wait_for(lambda: heard_since(restarted), timeout_s=STATUS_INTERVAL_S + 60)
        assert resumed, f"{board.snapshot()}\n{worker.describe()}"
        assert worker.is_running()
    finally:
        monitor.disconnect()
        worker.stop()
        app.close()
        broker.stop()
        broker.remove_data()


# -- Stopping services ------------------------------------------------------------


def lifecycle_markers(folder: Path, event: str) -> list[int]:
    """Return the PIDs of the real (not dry-run) ``event`` markers in ``folder``."""
    markers = [json.loads(path.read_text()) for path in folder.glob("*.json")]
    return sorted(m["pid"] for m in markers if m["event"] == event and not m["dry_run"])


def marker_worker(broker_url: str, folder: Path) -> WorkerProcess:
    """Start a prefork worker hosting the lifecycle marker service, and wait until it is ready."""
    markers = folder / "markers"
    markers.mkdir()
    worker = WorkerProcess(
        broker_url,
        [LIFECYCLE_SERVICE],
        "prefork",
        "workflows_celery",
        folder,
        env={MARKER_DIR_VARIABLE: str(markers)},
    )
    worker.start()
    worker.wait_until_ready()
    return worker


@pytest.mark.parametrize("by", ["service", "host"])
def test_shutdown_command_stops_worker(broker_url: str, tmp_path: Path, by: str) -> None:
    worker = marker_worker(broker_url, tmp_path)
    markers = tmp_path / "markers"
    try:
        if by == "host":
            board = StatusBoard()
            monitor = CeleryTransport(create_app(broker_url, main="tests.shutdown"))
            monitor.subscribe_broadcast(STATUS_TOPIC, board)
            try:
                assert wait_for(
                    lambda: len(statuses_of(board, worker)) == PREFORK_CONCURRENCY,
                    timeout_s=STATUS_INTERVAL_S + 10,
                ), board.snapshot()
            finally:
                monitor.disconnect()
            target = statuses_of(board, worker)[0]["host"]
        else:
            target = "LifecycleMarker"

        sent = subprocess.run(
            [sys.executable, "-m", "workflows_celery", "shutdown", target, "--broker", broker_url],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert sent.returncode == 0, sent.stderr
        assert f"Sent shutdown to {by} {target}" in sent.stdout
        assert worker.process is not None
        assert worker.process.wait(WORKER_STOP_TIMEOUT_S) == 0, worker.describe()
        stopped_here = worker.output().count("Stopping service Lifecycle marker on command")
        assert stopped_here == (PREFORK_CONCURRENCY if by == "service" else 1), worker.describe()
        # Every service instance ran in_shutdown(), the named ones and the rest.
        assert lifecycle_markers(markers, "in_shutdown") == lifecycle_markers(
            markers, "initializing"
        )
        assert len(lifecycle_markers(markers, "in_shutdown")) == PREFORK_CONCURRENCY
    finally:
        worker.stop()


def test_celery_control_stops_services(redis_url: str, tmp_path: Path) -> None:
    worker = marker_worker(redis_url, tmp_path)
    try:
        node = re.search(rf"{re.escape(worker.node_name)}@\S+", worker.output())
        assert node is not None, worker.describe()
        replied = subprocess.run(
            [
                sys.executable, "-m", "celery", "-A", "workflows_celery", "-b", redis_url,
                "control", "workflows_shutdown", "LifecycleMarker", "-d", node.group(0).rstrip(":"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip

        assert replied.returncode == 0, replied.stdout + replied.stderr
        assert "shutdown of LifecycleMarker requested" in replied.stdout
        assert worker.process is not None
        assert worker.process.wait(WORKER_STOP_TIMEOUT_S) == 0, worker.describe()
        assert len(lifecycle_markers(tmp_path / "markers", "in_shutdown")) == PREFORK_CONCURRENCY
    finally:
        worker.stop()


# -- Flower -----------------------------------------------------------------------


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A flower process on a free port of 127.0.0.1, reading Redis; yields its address."""
    if importlib.util.find_spec("flower") is None:
        pytest.skip("flower is not installed (pip install -e '.[test]' installs it)")
    port = free_port()
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "workflows_celery", "-b", redis_url,
                "flower", "--address=127.0.0.1", f"--port={port}",
            ],
            env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        assert wait_for(lambda: port_open(port), timeout_s=30), log_path.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def flower_json(address: str, path: str) -> Any:
    """Return the JSON of a GET request to flower's HTTP API."""
    with urllib.request.urlopen(f"{address}{path}", timeout=10) as response:
        return json.load(response)


def test_flower_lists_steps_by_name(
    workers: Workers, redis_url: str, flower: str, tmp_path: Path, unique: str
) -> None:
    # A worker of its own, sending task events (-E); the shared one on Redis
    # would share the sample queue with it.
    workers.stop(redis_url)
    purge_queues(redis_url, DESTINATION_QUEUE, TRANSACTION_QUEUE)
    worker = WorkerProcess(redis_url, ["SamplePipethrough"], "prefork", "workflows_celery", tmp_path)
    worker.command.append("-E")
    client = Client(redis_url)
    try:
        worker.start()
        worker.wait_until_ready()
        node = re.search(rf"{re.escape(worker.node_name)}@\S+", worker.output())
        assert node is not None, worker.describe()
        final_queue = f"workflows_celery.test.final.{unique}"
        client.queues_to_delete.append(final_queue)
        client.subscribe_recipe(final_queue)

        run_id = start_recipe(pipethrough_recipe(final_queue, unique), app=client.app)

        def steps_of_run() -> list[dict[str, Any]]:
            tasks = flower_json(flower, f"/api/tasks?search={run_id}")
            return [task for task in tasks.values() if task.get("state") == "SUCCESS"]

        # Three Pipethrough steps; the collector is a plain subscriber, not a worker.
        assert wait_for(lambda: len(steps_of_run()) == 3, timeout_s=DELIVERY_TIMEOUT_S), (
            flower_json(flower, "/api/tasks?limit=5")
        )
        for task in steps_of_run():
            assert task["name"] == f"Message Pipethrough ({DESTINATION_QUEUE})", task
            assert task["root_id"] == run_id, task
        assert wait_for(
            lambda: node.group(0) in flower_json(flower, "/api/workers?refresh=1"),
            timeout_s=DELIVERY_TIMEOUT_S,
        )
    finally:
        client.close()
        worker.stop()


def test_workflows_monitor_sees_hosted_services(workers: Workers, broker_url: str) -> None:
    from workflows.contrib.status_monitor import Monitor

    worker = workers.get(broker_url, ["SamplePipethrough"])
    # The monitor makes its transport by calling what it is given.
    monitor = Monitor(functools.partial(CeleryTransport, broker_url=broker_url))
    transport = monitor._transport

    def seen() -> list[dict[str, Any]]:
        # Its only view of what it heard, short of drawing it with curses.
        nodes = list(monitor._node_status.values())
        prefix = f"{worker.node_name}@"
        return [n for n in nodes if str(n.get("celery", {}).get("worker")).startswith(prefix)]

    try:
        arrived = wait_for(lambda: len(seen()) == PREFORK_CONCURRENCY, STATUS_INTERVAL_S + 10)
        assert arrived, monitor._node_status
        assert {node["serviceclass"] for node in seen()} == {"SamplePipethrough"}
    finally:
        transport.disconnect()


def test_celery_inspect_answers(workers: Workers, broker_url: str) -> None:
    worker = workers.get(broker_url, ["SamplePipethrough"])
    node = re.search(rf"{re.escape(worker.node_name)}@\S+", worker.output())
    assert node is not None, worker.describe()

    queues = subprocess.run(
        [
            sys.executable, "-m", "celery", "-A", "workflows_celery", "-b", broker_url,
            "inspect", "active_queues", "-d", node.group(0), "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip

    assert queues.returncode == 0, queues.stdout + queues.stderr
    names = {queue["name"] for queue in json.loads(queues.stdout)[node.group(0)]}
    assert DESTINATION_QUEUE in names, names


def test_status_live_refreshes_until_interrupted(workers: Workers, broker_url: str) -> None:
    workers.get(broker_url, ["SamplePipethrough"])
    live = subprocess.Popen(
        [sys.executable, "-m", "workflows_celery", "status", "--broker", broker_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(STATUS_INTERVAL_S + 2)
    finally:
        live.send_signal(signal.SIGINT)
    output, errors = live.communicate(timeout=30)

    assert live.returncode == 0, errors
    tables = output.count("HOST ")
    assert tables >= STATUS_INTERVAL_S, output
    assert "Message Pipethrough" in output


def test_shutdown_stops_worker_without_services(redis_url: str, tmp_path: Path) -> None:
    worker = WorkerProcess(redis_url, None, "prefork", "workflows_celery", tmp_path)
    board = StatusBoard()
    monitor = CeleryTransport(create_app(redis_url, main="tests.shutdown.plain"))
    try:
        worker.start()
        worker.wait_until_ready()
        monitor.subscribe_broadcast(STATUS_TOPIC, board)
        assert wait_for(lambda: len(statuses_of(board, worker)) == 1, STATUS_INTERVAL_S + 10)
        (row,) = statuses_of(board, worker)

        sent = subprocess.run(
            [sys.executable, "-m", "workflows_celery", "shutdown", row["host"], "--broker", redis_url],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert sent.returncode == 0, sent.stderr
        assert worker.process is not None
        assert worker.process.wait(WORKER_STOP_TIMEOUT_S) == 0, worker.describe()
        assert "Stopping worker" in worker.output()
    finally:
        monitor.disconnect()
        worker.stop()


def test_stopped_service_queue_no_longer_read(redis_url: str, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    worker = WorkerProcess(
        redis_url,
        [LIFECYCLE_SERVICE, "tests.services_for_tests:Rejector"],
        "prefork",
        "workflows_celery",
        tmp_path,
        env={MARKER_DIR_VARIABLE: str(markers)},
    )

    def read_queues() -> set[str]:
        inspected = subprocess.run(
            [
                sys.executable, "-m", "celery", "-A", "workflows_celery", "-b", redis_url,
                "inspect", "active_queues", "-d", node, "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert inspected.returncode == 0, inspected.stdout + inspected.stderr
        return {queue["name"] for queue in json.loads(inspected.stdout)[node]}

    try:
        worker.start()
        worker.wait_until_ready()
        found = re.search(rf"{re.escape(worker.node_name)}@\S+", worker.output())
        assert found is not None, worker.describe()
        node = found.group(0)
        assert "test.rejector" in read_queues()

        sent = subprocess.run(
            [sys.executable, "-m", "workflows_celery", "shutdown", "Rejector", "--broker", redis_url],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert sent.returncode == 0, sent.stderr
        assert wait_for(lambda: "test.rejector" not in read_queues(), timeout_s=30), worker.describe()
        assert worker.is_running()
        # The other service goes on.
        assert lifecycle_markers(markers, "in_shutdown") == []
    finally:
        worker.stop()
