"""The run ledger on the real Redis: states, steps, edges, cancelling, and the commands.

Most tests run an embedded worker whose ledger is the real Redis, so each run
is quick and its steps are under the test's control. One test runs a real
``celery worker`` on Redis, where the ledger is the broker's Redis by default.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from conftest import REDIS_URL
from helpers import wait_for
from test_cli import run_command, write_recipe
from workers import WorkerProcess
from workflows.recipe.wrapper import RecipeWrapper

from workflows_celery import CeleryTransport, create_app, recipe_step, start_recipe
from workflows_celery.constants import SETTING_LEDGER, SETTING_LEDGER_URL
from workflows_celery import ledger as ledger_module
from workflows_celery.control import cancel_run
from workflows_celery.errors import ConfigurationError
from workflows_celery.ledger import (
    CANCELLED,
    FAILED,
    FINISHED,
    RUNNING,
    STEP_CANCELLED,
    STEP_DEAD_LETTERED,
    STEP_DONE,
    Ledger,
    LedgerError,
    ledger_for,
    require_ledger,
)
from workflows_celery.testing import WorkflowsHarness

pytestmark = pytest.mark.redis

#: Queues of the step functions below; no other test uses them.
SPLIT_QUEUE = "tests.ledger.split"
COUNT_QUEUE = "tests.ledger.count"
FAIL_QUEUE = "tests.ledger.fail"
GATE_QUEUE = "tests.ledger.gate"
LATE_QUEUE = "tests.ledger.late"
SINK_QUEUE = "tests.ledger.sink"

#: Seconds a checkpoint waits before it comes back.
CHECKPOINT_DELAY_S = 1.0
#: Seconds the cancelled run's delayed message waits: long enough to cancel first.
CANCEL_DELAY_S = 2.0
#: Seconds any run below may take to end.
RUN_TIMEOUT_S = 30.0

#: Runs of ``late`` by run ID, to prove that a cancelled run starts nothing.
LATE_RUNS: list[str] = []
#: Released by the test to let ``gate`` steps end.
GATE = threading.Event()
#: Set by a ``gate`` step once it runs.
GATE_ENTERED = threading.Event()


def split(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    for item in range(payload["items"]):
        rw.send_to("item", {"item": item})


def count(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    """Check in once with a delay, then send on."""
    if payload.get("checked"):
        rw.send({"done": payload["item"]})
    else:
        rw.checkpoint({**payload, "checked": True}, delay=CHECKPOINT_DELAY_S)


def fail(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    raise RuntimeError(f"cannot process {payload!r}")


def gate(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    GATE_ENTERED.set()
    assert GATE.wait(RUN_TIMEOUT_S), "the test never opened the gate"
    rw.send(payload, delay=CANCEL_DELAY_S)


def sink(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    """End the run's branch."""


def late(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    LATE_RUNS.append(rw.environment["ID"])


@pytest.fixture
def workflows_app(workflows_app: Celery, redis_url: str) -> Celery:
    workflows_app.conf[SETTING_LEDGER_URL] = redis_url
    for queue, function in [
        (SPLIT_QUEUE, split),
        (COUNT_QUEUE, count),
        (FAIL_QUEUE, fail),
        (GATE_QUEUE, gate),
        (LATE_QUEUE, late),
        (SINK_QUEUE, sink),
    ]:
        recipe_step(workflows_app, queue)(function)
    return workflows_app


@pytest.fixture
def ledger(workflows_harness: WorkflowsHarness) -> Ledger:
    return require_ledger(workflows_harness.app)


def node(queue: str, **fields: Any) -> dict[str, Any]:
    return {"service": queue.rsplit(".", 1)[-1], "queue": queue, **fields}


FAN_OUT = {
    "1": node(SPLIT_QUEUE, output={"item": 2}),
    "2": node(COUNT_QUEUE, output=3),
    "3": node(SINK_QUEUE),
    "start": [[1, {"items": 3}]],
}


def test_fan_out_with_delayed_checkpoint_finishes_last(
    workflows_harness: WorkflowsHarness, ledger: Ledger
) -> None:
    run = workflows_harness.start(FAN_OUT, environment={"ID": str(uuid.uuid4())})

    # Every item has checked in and waits out its delay: the run is not over.
    assert wait_for(lambda: len(ledger.get(run.id).steps) >= 4)
    waiting = ledger.get(run.id)
    assert waiting.state == RUNNING
    assert waiting.in_flight == 3

    record = ledger.wait(run.id, RUN_TIMEOUT_S)
    assert record.state == FINISHED
    assert record.in_flight == 0
    assert record.failed == 0
    assert record.step_count == 1 + 3 + 3 + 3
    assert {step.outcome for step in record.steps} == {STEP_DONE}
    assert record.edges == {(None, 1): 1, (1, 2): 3, (2, 2): 3, (2, 3): 3}
    assert record.finished_at is not None
    assert record.finished_at >= max(step.ended_at for step in record.steps)
    assert record.origin == "recipe"


def test_dead_letter_fails_run(workflows_harness: WorkflowsHarness, ledger: Ledger) -> None:
    recipe = {"1": node(SPLIT_QUEUE, output={"item": 2}), "2": node(FAIL_QUEUE), "start": [[1, {"items": 2}]]}
    run = workflows_harness.start(recipe)

    record = ledger.wait(run.id, RUN_TIMEOUT_S)
    assert record.state == FAILED
    assert record.failed == 2
    failed_steps = [step for step in record.steps if step.node == 2]
    assert [step.outcome for step in failed_steps] == [STEP_DEAD_LETTERED] * 2
    assert all("cannot process" in (step.error or "") for step in failed_steps)


def test_cancelled_run_starts_nothing_further(
    workflows_harness: WorkflowsHarness, ledger: Ledger
) -> None:
    recipe = {"1": node(GATE_QUEUE, output=2), "2": node(LATE_QUEUE), "start": [[1, {"n": 1}]]}
    GATE.clear()
    GATE_ENTERED.clear()
    run = workflows_harness.start(recipe)
    assert GATE_ENTERED.wait(RUN_TIMEOUT_S)

    cancelled = cancel_run(workflows_harness.app, run.id)
    assert cancelled.state == CANCELLED
    # The running step finishes and sends a delayed message, which is dropped.
    GATE.set()
    run.wait(RUN_TIMEOUT_S + CANCEL_DELAY_S)

    record = ledger.get(run.id)
    assert record.state == CANCELLED
    assert record.in_flight == 0
    assert [(step.node, step.outcome) for step in record.steps] == [(1, STEP_DONE), (2, STEP_CANCELLED)]
    assert run.id not in LATE_RUNS
    assert record.ended


def test_worker_without_broadcast_reads_cancellation(
    workflows_harness: WorkflowsHarness, ledger: Ledger, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "CANCELLED_REFRESH_S", 0.0)
    recipe = {"1": node(GATE_QUEUE, output=2), "2": node(LATE_QUEUE), "start": [[1, {"n": 2}]]}
    GATE.clear()
    GATE_ENTERED.clear()
    run = workflows_harness.start(recipe)
    assert GATE_ENTERED.wait(RUN_TIMEOUT_S)

    # Another process's ledger: no broadcast, and nothing noted in this process.
    Ledger(redis_url).cancel(run.id)
    GATE.set()
    run.wait(RUN_TIMEOUT_S + CANCEL_DELAY_S)

    assert run.id not in LATE_RUNS
    assert [step.outcome for step in ledger.get(run.id).steps] == [STEP_DONE, STEP_CANCELLED]


def test_cancel_after_end_rejected(workflows_harness: WorkflowsHarness, ledger: Ledger) -> None:
    run = workflows_harness.run({"1": node(SPLIT_QUEUE), "start": [[1, {"items": 0}]]})
    assert ledger.wait(run.id, RUN_TIMEOUT_S).state == FINISHED

    with pytest.raises(LedgerError, match="has already finished"):
        ledger.cancel(run.id)


def test_wait_times_out_with_state(workflows_harness: WorkflowsHarness, ledger: Ledger) -> None:
    run = workflows_harness.start(FAN_OUT)

    with pytest.raises(TimeoutError, match=rf"Run {run.id} is still running after 0.2 s"):
        ledger.wait(run.id, 0.2)
    run.wait(RUN_TIMEOUT_S)


def test_unknown_run_explained(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="is not in the ledger"):
        ledger.get("no-such-run")


def test_ledger_needs_redis() -> None:
    amqp_app = create_app("amqp://guest:guest@127.0.0.1:5672//", main="tests.ledger.amqp")
    assert ledger_for(amqp_app) is None
    with pytest.raises(ConfigurationError, match="the ledger needs Redis"):
        require_ledger(amqp_app)

    off = create_app("redis://127.0.0.1:6379/0", main="tests.ledger.off")
    off.conf[SETTING_LEDGER] = False
    assert ledger_for(off) is None
    with pytest.raises(ConfigurationError, match="The run ledger is off"):
        require_ledger(off)

    wrong = create_app("memory://localhost/", main="tests.ledger.wrong")
    wrong.conf[SETTING_LEDGER_URL] = "amqp://127.0.0.1//"
    with pytest.raises(ConfigurationError, match="is not a Redis URL"):
        ledger_for(wrong)


def test_ledger_url_from_environment(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKFLOWS_CELERY_LEDGER_URL", redis_url)
    amqp_app = create_app("amqp://guest:guest@127.0.0.1:5672//", main="tests.ledger.environment")

    recorder = ledger_for(amqp_app)
    assert recorder is not None
    assert recorder.url == redis_url


def test_runs_commands_list_show_cancel(
    workflows_harness: WorkflowsHarness, ledger: Ledger, redis_url: str
) -> None:
    finished = workflows_harness.run(FAN_OUT)
    ledger.wait(finished.id, RUN_TIMEOUT_S)

    listing = run_command("runs", "--broker", redis_url, "--limit", "50")
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"^{finished.id}  finished .* 10  +0  recipe$", listing.stdout, re.M), listing.stdout

    shown = run_command("runs", "show", finished.id, "--broker", redis_url)
    assert shown.returncode == 0, shown.stderr
    assert f"Run {finished.id} of recipe: finished" in shown.stdout
    assert "└── 1  split  queue 'tests.ledger.split'  x1  (1 done)" in shown.stdout
    assert "  1 -> 2: 3" in shown.stdout

    as_json = json.loads(run_command("runs", "show", finished.id, "--json", "--broker", redis_url).stdout)
    assert as_json["state"] == FINISHED
    assert len(as_json["steps"]) == 10

    again = run_command("cancel", finished.id, "--broker", redis_url)
    assert again.returncode == 1
    assert "has already finished" in again.stderr


# -- A real worker -------------------------------------------------------------------


#: Named recipes of the real worker's recipe folder.
NAMED_RECIPES = {
    "forward": {
        "1": {"service": "Delayed forwarder", "queue": "test.forwarder", "output": 2},
        "2": {"service": "Delayed forwarder", "queue": "test.forwarder"},
        "start": [[1, {"delay": 0, "from": "forward"}]],
    },
    "reject": {
        "1": {"service": "Rejector", "queue": "test.rejector"},
        "start": [[1, {"from": "{sample}"}]],
    },
}


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("recipes")
    for name, recipe in NAMED_RECIPES.items():
        (folder / f"{name}.json").write_text(json.dumps(recipe))
    return folder


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, recipe_dir: Path) -> Iterator[WorkerProcess]:
    """One real worker on Redis for the module's tests, with the named recipes."""
    process = WorkerProcess(
        REDIS_URL,
        [
            "tests.services_for_tests:Rejector",
            "tests.services_for_tests:DelayedForwarder",
            "tests.services_for_tests:FanOut",
            "RecipeDispatcher",
        ],
        "solo",
        "workflows_celery",
        tmp_path_factory.mktemp("worker-logs"),
        env={"WORKFLOWS_CELERY_RECIPE_DIR": str(recipe_dir)},
    )
    process.start()
    try:
        process.wait_until_ready()
        yield process
    finally:
        process.stop()


def test_real_worker_records_run(worker: WorkerProcess, redis_url: str, tmp_path: Path) -> None:
    app = create_app(redis_url, main="tests.ledger.client")
    ledger = require_ledger(app)
    path = write_recipe(
        tmp_path, "rejected.json", {"1": {"service": "Rejector", "queue": "test.rejector"}, "start": [[1, {}]]}
    )
    run_id = start_recipe(path, app=app, origin="rejected.json")

    try:
        record = ledger.wait(run_id, RUN_TIMEOUT_S)
    except TimeoutError:
        pytest.fail(worker.describe())
    assert record.state == FAILED
    assert record.origin == "rejected.json"
    (step,) = record.steps
    assert step.outcome == STEP_DEAD_LETTERED
    assert step.worker.startswith(worker.node_name)
    assert step.started_at <= step.ended_at


def test_real_worker_hears_cancel_broadcast(worker: WorkerProcess, redis_url: str) -> None:
    app = create_app(redis_url, main="tests.ledger.canceller")
    ledger = require_ledger(app)
    recipe = {
        "1": {"service": "Delayed forwarder", "queue": "test.forwarder", "output": 2},
        "2": {"service": "Rejector", "queue": "test.rejector"},
        "start": [[1, {"delay": CANCEL_DELAY_S}]],
    }
    run_id = start_recipe(recipe, app=app)
    # The first step has sent the delayed message, which the worker now holds.
    assert wait_for(lambda: len(ledger.get(run_id).steps) == 1), worker.describe()

    cancel_run(app, run_id)

    record = ledger.wait(run_id, RUN_TIMEOUT_S)
    assert [(step.node, step.outcome) for step in record.steps] == [(1, STEP_DONE), (2, STEP_CANCELLED)]
    assert record.state == CANCELLED


def test_real_worker_dispatches_zocalo_request(worker: WorkerProcess, redis_url: str) -> None:
    app = create_app(redis_url, main="tests.ledger.zocalo")
    ledger = require_ledger(app)
    run_id = str(uuid.uuid4())
    transport = CeleryTransport(app)
    assert transport.connect()
    try:
        transport.send(
            "processing_recipe",
            {"recipes": ["forward", "reject"], "parameters": {"uuid": run_id, "sample": "lysozyme"}},
        )
        assert wait_for(lambda: _in_ledger(ledger, run_id), timeout_s=RUN_TIMEOUT_S), worker.describe()
        record = ledger.wait(run_id, RUN_TIMEOUT_S)
    finally:
        transport.disconnect()

    # The merged recipe: forward's two nodes, then reject's node as node 3.
    assert record.state == FAILED
    assert sorted((step.node, step.outcome) for step in record.steps) == [
        (1, STEP_DONE),
        (2, STEP_DONE),
        (3, STEP_DEAD_LETTERED),
    ]
    assert record.edges == {(None, 1): 1, (None, 3): 1, (1, 2): 1}
    assert record.origin == "forward + reject"


def test_named_recipes_merged_on_broker(worker: WorkerProcess, redis_url: str, recipe_dir: Path) -> None:
    result = run_command(
        "run", "forward", "reject", "--recipe-dir", str(recipe_dir), "-p", "sample=x", "--broker", redis_url
    )
    assert result.returncode == 0, result.stderr
    started = re.fullmatch(r"Started run ([0-9a-f-]{36}) of forward \+ reject on .*\n", result.stdout)
    assert started is not None, result.stdout

    record = require_ledger(create_app(redis_url, main="tests.ledger.named")).wait(started.group(1), RUN_TIMEOUT_S)
    assert record.origin == "forward + reject"
    assert sorted(step.node for step in record.steps) == [1, 2, 3]


def _in_ledger(ledger: Ledger, run_id: str) -> bool:
    try:
        ledger.get(run_id, steps=False)
    except LedgerError:
        return False
    return True


def test_real_worker_fan_out_with_delayed_checkpoints(worker: WorkerProcess, redis_url: str) -> None:
    app = create_app(redis_url, main="tests.ledger.fanout")
    ledger = require_ledger(app)
    recipe = {
        "1": {"service": "Fan-out", "queue": "test.fanout", "output": {"item": 2}},
        "2": {"service": "Delayed forwarder", "queue": "test.forwarder", "output": 3},
        "3": {"service": "Delayed forwarder", "queue": "test.forwarder"},
        "start": [[1, {"items": 3, "delay": CHECKPOINT_DELAY_S}]],
    }
    run_id = start_recipe(recipe, app=app)

    # Each item has checked in and waits out its delay, so the run goes on.
    assert wait_for(lambda: len(ledger.get(run_id).steps) >= 4), worker.describe()
    assert ledger.get(run_id).state == RUNNING

    record = ledger.wait(run_id, RUN_TIMEOUT_S)
    assert record.state == FINISHED
    assert record.step_count == 1 + 3 + 3 + 3
    assert record.edges == {(None, 1): 1, (1, 2): 3, (2, 2): 3, (2, 3): 3}
    assert record.finished_at is not None
    assert record.finished_at >= max(step.ended_at for step in record.steps)

