"""The Flask example (examples/flask) with Flask's test client and a real worker on Redis.

The web app under test is made by the example's own ``create_app``, pointed at
the suite's Redis and a temporary recipe folder. The worker is a real
``celery -A flask_runs.make_celery worker`` subprocess started in
examples/flask. It gets its broker only from ``FLASK_CELERY__broker_url`` and
its services only from the example's settings, so a run that reaches its end
shows that the worker reads the web app's configuration.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import workflows.recipe
from celery import Celery
from celery import _state as celery_state
from conftest import REDIS_URL
from flask import Flask
from flask.testing import FlaskClient
from helpers import Harness, delete_queues, wait_for
from workers import (
    DESTINATION_QUEUE,
    QUEUE_LOCK_TIMEOUT_S,
    REPO_ROOT,
    WORKER_READY_TIMEOUT_S,
    WorkerProcess,
    check_one_step_run,
    exclusive_sample_queues,
    purge_queues,
)

from workflows_celery import routing

EXAMPLE_DIR = REPO_ROOT / "examples" / "flask"
sys.path.insert(0, str(EXAMPLE_DIR))

from flask_runs import create_app

# Waiting for another run to release the sample queues (QUEUE_LOCK_TIMEOUT_S)
# counts towards the timeout of the first test that starts the worker.
pytestmark = pytest.mark.timeout(QUEUE_LOCK_TIMEOUT_S + 60)

#: Seconds a run may take to pass through the worker and reach its last node.
DELIVERY_TIMEOUT_S = 30.0
#: Seconds a start may take when no worker reads its queue, because the view only publishes.
START_TIMEOUT_S = 2.0
#: Seconds a start may take to return 503 when nothing listens on the broker's port.
BROKER_DOWN_TIMEOUT_S = 5.0
#: Seconds a subprocess that imports the example may take.
SUBPROCESS_TIMEOUT_S = 30.0
#: Seconds that ``GET /runs/<id>?wait=`` waits for a run on the worker to end.
STATE_WAIT_S = 20
#: Seconds that the state view may take beyond the wait it was asked for.
STATE_OVERHEAD_S = 1.0

#: Celery reads this variable before its ``broker_url`` setting, so it would
#: override the broker that the tests configure.
CELERY_BROKER_VARIABLE = "CELERY_BROKER_URL"

#: Recipes of the temporary recipe folder, by name.
RECIPES: dict[str, dict[str, Any]] = {
    # One SamplePipethrough step, then the queue that the test reads.
    "to-reply": {
        "1": {
            "service": "Message Pipethrough",
            "queue": DESTINATION_QUEUE,
            "output": 2,
        },
        "2": {"service": "Test reply", "queue": "{reply_queue}"},
        "start": [[1, {"sample": "{sample}"}]],
    },
    # One SamplePipethrough step with no output, so the run ends on the worker.
    "one-step": {
        "1": {"service": "Message Pipethrough", "queue": DESTINATION_QUEUE},
        "start": [[1, {"sample": "{sample}"}]],
    },
    # One step on a queue that no worker reads.
    "unread": {
        "1": {"service": "Nobody", "queue": "{queue}"},
        "start": [[1, {"test": "unread"}]],
    },
    # A node without a queue or a topic, which workflows-celery rejects.
    "no-destination": {
        "1": {"service": "Nowhere"},
        "start": [[1, {}]],
    },
}


# -- Fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _isolated_celery_state() -> Iterator[None]:
    """Keep the shell's broker variable and the example's default app out of other tests."""
    previous_default_app = celery_state.default_app
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(CELERY_BROKER_VARIABLE, raising=False)
        yield
    # celery_init_app makes its Celery app the default of the whole process.
    celery_state.set_default_app(previous_default_app)


@pytest.fixture(scope="module")
def module_unique() -> str:
    """A random suffix for the queues that the module's recipes name."""
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def recipe_folder(tmp_path_factory: pytest.TempPathFactory, module_unique: str) -> Path:
    """A recipe folder with :data:`RECIPES`, next to recipes that must stay out of reach."""
    base = tmp_path_factory.mktemp("flask-example")
    folder = base / "recipes"
    folder.mkdir()
    for name, recipe in RECIPES.items():
        (folder / f"{name}.json").write_text(json.dumps(recipe), encoding="utf-8")

    # Valid recipes that a request must never start: one outside the folder,
    # and one in it whose name starts with a dot.
    reachable_only_by_mistake = {
        "1": {"service": "Nobody", "queue": outside_queue(module_unique)},
        "start": [[1, {"test": "outside"}]],
    }
    (base / "outside.json").write_text(json.dumps(reachable_only_by_mistake), encoding="utf-8")
    (folder / ".hidden.json").write_text(json.dumps(reachable_only_by_mistake), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def flask_app(recipe_folder: Path, module_unique: str) -> Iterator[Flask]:
    """The example's web app on the suite's Redis, with the temporary recipe folder."""
    app = create_app(
        {
            "TESTING": True,
            "CELERY": {"broker_url": REDIS_URL},
            "RECIPE_FOLDER": str(recipe_folder),
        }
    )
    yield app
    celery_app = app.extensions["celery"]
    delete_queues(celery_app, [outside_queue(module_unique)])
    celery_app.close()


@pytest.fixture
def client(flask_app: Flask) -> FlaskClient:
    """Flask's test client of the web app."""
    return flask_app.test_client()


@pytest.fixture
def harness(flask_app: Flask, unique: str) -> Iterator[Harness]:
    """Subscriptions and queue names on the web app's broker, deleted after the test."""
    created = Harness(flask_app.extensions["celery"], unique)
    try:
        yield created
    finally:
        created.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One ``celery -A flask_runs.make_celery worker`` for the module, set up like the web app."""
    with exclusive_sample_queues():
        purge_queues(REDIS_URL, DESTINATION_QUEUE)
        # The broker comes from the Flask settings alone: no ``-b`` option,
        # and no variable that Celery would read first.
        process = WorkerProcess(
            None,
            None,
            "solo",
            "flask_runs.make_celery",
            tmp_path_factory.mktemp("flask-worker-logs"),
            env={"FLASK_CELERY__broker_url": REDIS_URL},
            cwd=EXAMPLE_DIR,
        )
        process.env.pop(CELERY_BROKER_VARIABLE, None)

        process.start()
        try:
            process.wait_until_ready()
            # No --services option: the worker hosts the services of its settings.
            process.wait_for_output(r"Started service ", timeout_s=WORKER_READY_TIMEOUT_S)
            yield process
        finally:
            process.stop()


# -- Helpers ------------------------------------------------------------------


def outside_queue(module_unique: str) -> str:
    """Return the queue of the recipes that no request may start."""
    return f"test.flask.outside.{module_unique}"


def waiting_messages(app: Celery, queue: str) -> int:
    """Return the number of messages waiting in ``queue``."""
    with app.connection_for_read() as connection, connection.channel() as channel:
        declared = routing.task_queue(queue).bind(channel).queue_declare()
        return int(declared.message_count)


def free_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_example_process(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run Python code in examples/flask in a new interpreter and check that it succeeded."""
    environment = {
        key: value for key, value in os.environ.items() if key != CELERY_BROKER_VARIABLE
    }
    completed = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=EXAMPLE_DIR,
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, (
        f"script failed with exit code {completed.returncode}\n"
        f"--- stdout ---\n{completed.stdout}\n--- stderr ---\n{completed.stderr}"
    )
    return completed


def run_example_script(script: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run Python code in examples/flask in a new interpreter and return the JSON it prints."""
    completed = run_example_process(script, *args, env=env)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def check_json_error(response: Any, status: int, fragment: str) -> None:
    """Check that ``response`` is a JSON error with ``status`` and ``fragment`` in its message."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert fragment in response.get_json()["error"]


# -- Starting runs ------------------------------------------------------------


def test_post_runs_reaches_last_node(
    client: FlaskClient, harness: Harness, worker: WorkerProcess, unique: str
) -> None:
    reply_queue = harness.queue("reply")
    arrivals: list[tuple[Any, dict[str, Any], Any]] = []

    def record(rw: Any, header: dict[str, Any], message: Any) -> None:
        arrivals.append((rw, header, message))

    workflows.recipe.wrap_subscribe(harness.transport(), reply_queue, record)
    sample = f"lysozyme-{unique}"

    response = client.post(
        "/runs",
        json={"recipe": "to-reply", "parameters": {"reply_queue": reply_queue, "sample": sample}},
    )

    assert response.status_code == 202, response.get_data(as_text=True)
    run_id = response.get_json()["run_id"]
    assert wait_for(lambda: len(arrivals) >= 1, DELIVERY_TIMEOUT_S), (
        f"run {run_id} did not reach {reply_queue} within {DELIVERY_TIMEOUT_S:.0f} s\n"
        + worker.describe()
    )
    rw, _, _ = arrivals[0]
    assert rw is not None, f"the last node got a message without a recipe: {arrivals[0]}"
    assert rw.environment["ID"] == run_id
    assert rw.recipe_pointer == 2
    assert rw.recipe_path == [1]
    # The worker ran node 1 of this run, whose payload has the parameter filled in.
    worker.wait_for_output(
        rf"\[Message Pipethrough run {re.escape(run_id)} step 1\] === Consume ====(.|\n)*?"
        + re.escape(sample),
        timeout_s=5,
    )


def test_post_runs_without_worker_returns_at_once(
    client: FlaskClient, flask_app: Flask, harness: Harness
) -> None:
    # No worker reads this queue, so the run's first message must wait there.
    queue = harness.queue("unread")

    started = time.monotonic()
    response = client.post("/runs", json={"recipe": "unread", "parameters": {"queue": queue}})
    elapsed_s = time.monotonic() - started

    assert response.status_code == 202, response.get_data(as_text=True)
    assert uuid.UUID(response.get_json()["run_id"])
    assert elapsed_s < START_TIMEOUT_S
    assert waiting_messages(flask_app.extensions["celery"], queue) == 1


def test_web_process_imports_no_service(recipe_folder: Path, harness: Harness) -> None:
    queue = harness.queue("no-import")
    script = """
import json, sys
from importlib.metadata import entry_points
from flask_runs import create_app

app = create_app({
    "CELERY": {"broker_url": sys.argv[1], "workflows_services": ["SamplePipethrough"]},
    "RECIPE_FOLDER": sys.argv[2],
})
client = app.test_client()
response = client.post("/runs", json={"recipe": "unread", "parameters": {"queue": sys.argv[3]}})
run_id = response.get_json()["run_id"]
state = client.get(f"/runs/{run_id}?wait=0.1")
services = sorted({entry.module for entry in entry_points(group="workflows.services")})
print(json.dumps({
    "status": response.status_code,
    "state_status": state.status_code,
    "state": state.get_json()["state"],
    "configured": app.extensions["celery"].conf.workflows_services,
    "services": services,
    "imported": [name for name in services if name in sys.modules],
}))
"""

    result = run_example_script(script, REDIS_URL, str(recipe_folder), queue)

    assert result["status"] == 202
    assert result["state_status"] == 200
    assert result["state"] == "running"
    assert result["configured"] == ["SamplePipethrough"]
    assert "workflows.services.sample_pipethrough" in result["services"]
    assert result["imported"] == []


def test_web_process_logs_started_run(recipe_folder: Path, harness: Harness) -> None:
    # Logging as `flask run` leaves it: nothing configured but Flask's own handler.
    script = """
import json, sys
from flask_runs import create_app

app = create_app({"CELERY": {"broker_url": sys.argv[1]}, "RECIPE_FOLDER": sys.argv[2]})
response = app.test_client().post(
    "/runs", json={"recipe": "unread", "parameters": {"queue": sys.argv[3]}}
)
print(json.dumps(response.get_json()))
"""

    completed = run_example_process(
        script, REDIS_URL, str(recipe_folder), harness.queue("logged")
    )

    run_id = json.loads(completed.stdout.strip().splitlines()[-1])["run_id"]
    assert f"INFO in runs: Started run {run_id} of recipe unread" in completed.stderr
    assert completed.stderr.count(run_id) == 1, completed.stderr


def test_worker_module_reads_prefixed_environment(tmp_path: Path) -> None:
    # Values that differ from the example's defaults, so that only the
    # environment can have set them.
    broker_url = "redis://127.0.0.1:6379/15"
    script = """
import json
from flask_runs.make_celery import celery_app, flask_app

print(json.dumps({
    "broker_url": celery_app.conf.broker_url,
    "services": celery_app.conf.workflows_services,
    "recipe_folder": flask_app.config["RECIPE_FOLDER"],
}))
"""

    result = run_example_script(
        script,
        env={
            "FLASK_CELERY__broker_url": broker_url,
            "FLASK_CELERY__workflows_services": '["SampleConsumer"]',
            "FLASK_RECIPE_FOLDER": str(tmp_path),
        },
    )

    assert result["broker_url"] == broker_url
    assert result["services"] == ["SampleConsumer"]
    assert result["recipe_folder"] == str(tmp_path)


# -- Errors -------------------------------------------------------------------


def test_post_runs_malformed_json(client: FlaskClient) -> None:
    response = client.post("/runs", data='{"recipe": ', content_type="application/json")

    assert response.status_code == 400
    assert "not valid JSON" in response.get_json()["error"]


def test_post_runs_body_not_json(client: FlaskClient) -> None:
    response = client.post("/runs", data="recipe=to-reply")

    assert response.status_code == 415
    assert "application/json" in response.get_json()["error"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ([], "JSON array"),
        ({}, 'no "recipe"'),
        ({"parameters": {"sample": "x"}}, 'no "recipe"'),
        ({"recipe": 7}, "invalid recipe name 7"),
        ({"recipe": "unread", "parameter": {}}, "'parameter'"),
    ],
    ids=["array", "empty", "no-recipe", "name-not-string", "unexpected-field"],
)
def test_post_runs_malformed_body(client: FlaskClient, body: Any, expected: str) -> None:
    response = client.post("/runs", json=body)

    assert response.status_code == 400
    assert expected in response.get_json()["error"]


def test_post_runs_unknown_recipe(client: FlaskClient) -> None:
    response = client.post("/runs", json={"recipe": "no-such-recipe"})

    assert response.status_code == 404
    error = response.get_json()["error"]
    assert "'no-such-recipe'" in error
    assert "to-reply, unread" in error


def test_post_runs_recipe_outside_folder_unknown(client: FlaskClient) -> None:
    # outside.json exists, but next to the recipe folder, not in it.
    response = client.post("/runs", json={"recipe": "outside"})

    assert response.status_code == 404


@pytest.mark.parametrize(
    "name",
    [
        "../outside",
        "../recipes/../outside",
        "subfolder/../../outside",
        "..\\outside",
        ".hidden",
        "..",
        "",
        "unread\x00",
    ],
)
def test_post_runs_path_traversal_rejected(
    client: FlaskClient, flask_app: Flask, recipe_folder: Path, module_unique: str, name: str
) -> None:
    response = client.post("/runs", json={"recipe": name})

    assert response.status_code == 400
    assert "invalid recipe name" in response.get_json()["error"]
    assert waiting_messages(flask_app.extensions["celery"], outside_queue(module_unique)) == 0


def test_post_runs_absolute_path_rejected(
    client: FlaskClient, flask_app: Flask, recipe_folder: Path, module_unique: str
) -> None:
    outside = recipe_folder.parent / "outside"

    response = client.post("/runs", json={"recipe": str(outside)})

    assert response.status_code == 400
    assert waiting_messages(flask_app.extensions["celery"], outside_queue(module_unique)) == 0


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (["reply_queue", "q"], '"parameters" is a JSON array'),
        ("reply_queue=q", '"parameters" is a JSON string'),
        ({"sample": "x"}, "'{reply_queue}'"),
    ],
    ids=["list", "string", "placeholder-unfilled"],
)
def test_post_runs_invalid_parameters(
    client: FlaskClient, parameters: Any, expected: str
) -> None:
    response = client.post("/runs", json={"recipe": "to-reply", "parameters": parameters})

    assert response.status_code == 400
    assert expected in response.get_json()["error"]


def test_post_runs_invalid_recipe(client: FlaskClient) -> None:
    response = client.post("/runs", json={"recipe": "no-destination"})

    assert response.status_code == 400
    error = response.get_json()["error"]
    assert "'no-destination'" in error
    assert 'Node "1" has neither "queue" nor "topic"' in error


def test_post_runs_broker_unreachable(recipe_folder: Path) -> None:
    app = create_app(
        {
            "TESTING": True,
            "CELERY": {"broker_url": f"redis://127.0.0.1:{free_port()}/0"},
            "RECIPE_FOLDER": str(recipe_folder),
        }
    )

    started = time.monotonic()
    response = app.test_client().post(
        "/runs", json={"recipe": "unread", "parameters": {"queue": "test.flask.unreachable"}}
    )
    elapsed_s = time.monotonic() - started
    app.extensions["celery"].close()

    assert response.status_code == 503
    assert "broker cannot be reached" in response.get_json()["error"]
    assert elapsed_s < BROKER_DOWN_TIMEOUT_S


# -- The state of a run -------------------------------------------------------


def test_run_state_after_worker_ran_it(
    client: FlaskClient, worker: WorkerProcess, unique: str
) -> None:
    response = client.post(
        "/runs", json={"recipe": "one-step", "parameters": {"sample": f"lysozyme-{unique}"}}
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    run_id = response.get_json()["run_id"]

    state = client.get(f"/runs/{run_id}?wait={STATE_WAIT_S}")

    assert state.status_code == 200, state.get_data(as_text=True)
    check_one_step_run(state.get_json(), run_id, worker)


def test_run_state_without_wait_is_immediate(client: FlaskClient, harness: Harness) -> None:
    queue = harness.queue("unread")
    run_id = client.post(
        "/runs", json={"recipe": "unread", "parameters": {"queue": queue}}
    ).get_json()["run_id"]

    state = client.get(f"/runs/{run_id}")

    assert state.status_code == 200, state.get_data(as_text=True)
    record = state.get_json()
    assert record["state"] == "running"
    assert record["in_flight"] == 1
    assert record["steps"] == []


def test_run_state_wait_ends_on_time(client: FlaskClient, harness: Harness) -> None:
    # No worker reads the queue, so the run cannot end while the view waits.
    queue = harness.queue("unread")
    run_id = client.post(
        "/runs", json={"recipe": "unread", "parameters": {"queue": queue}}
    ).get_json()["run_id"]
    wait_s = 1.0

    started = time.monotonic()
    state = client.get(f"/runs/{run_id}?wait={wait_s}")
    elapsed_s = time.monotonic() - started

    assert state.status_code == 200, state.get_data(as_text=True)
    assert state.get_json()["state"] == "running"
    assert wait_s <= elapsed_s < wait_s + STATE_OVERHEAD_S


def test_run_state_unknown_run(client: FlaskClient) -> None:
    response = client.get(f"/runs/{uuid.uuid4()}")

    check_json_error(response, 404, "no run")
    assert "7 days" in response.get_json()["error"]


@pytest.mark.parametrize(
    "run_id",
    ["bad*id", "a.b", "-leading-dash", "x" * 129, "run%00id", "run%20id", "%E2%9C%93"],
    ids=["star", "dot", "leading-dash", "too-long", "nul", "space", "non-ascii"],
)
def test_run_state_invalid_run_id(client: FlaskClient, run_id: str) -> None:
    response = client.get(f"/runs/{run_id}")

    check_json_error(response, 400, "invalid run ID")


def test_run_state_path_with_slash_not_found(client: FlaskClient) -> None:
    response = client.get("/runs/a/b")

    check_json_error(response, 404, "no route /runs/a/b")


@pytest.mark.parametrize("wait", ["-1", "31", "abc", "nan", "inf", ""])
def test_run_state_invalid_wait(client: FlaskClient, wait: str) -> None:
    response = client.get(f"/runs/{uuid.uuid4()}?wait={wait}")

    check_json_error(response, 400, f"invalid wait {wait!r}")


def test_run_state_ledger_unreachable(recipe_folder: Path) -> None:
    app = create_app(
        {
            "TESTING": True,
            "CELERY": {
                "broker_url": REDIS_URL,
                "workflows_ledger_url": f"redis://127.0.0.1:{free_port()}/0",
            },
            "RECIPE_FOLDER": str(recipe_folder),
        }
    )

    started = time.monotonic()
    response = app.test_client().get(f"/runs/{uuid.uuid4()}?wait=5")
    elapsed_s = time.monotonic() - started
    app.extensions["celery"].close()

    check_json_error(response, 503, "run ledger cannot be reached")
    assert elapsed_s < STATE_OVERHEAD_S


def test_run_state_without_ledger(recipe_folder: Path) -> None:
    app = create_app(
        {
            "TESTING": True,
            "CELERY": {"broker_url": REDIS_URL, "workflows_ledger": False},
            "RECIPE_FOLDER": str(recipe_folder),
        }
    )

    response = app.test_client().get(f"/runs/{uuid.uuid4()}")
    app.extensions["celery"].close()

    check_json_error(response, 501, "no run ledger")


# -- Errors of the app itself -------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/runs", "POST"), ("PUT", "/runs", "POST"), ("POST", "/runs/abc", "GET")],
)
def test_wrong_method_is_json(client: FlaskClient, method: str, path: str, allowed: str) -> None:
    response = client.open(path, method=method)

    check_json_error(response, 405, f"method {method} is not allowed on {path}; use {allowed}")
    assert allowed in response.headers["Allow"]


@pytest.mark.parametrize("path", ["/", "/nope", "/runs/"])
def test_unknown_url_is_json(client: FlaskClient, path: str) -> None:
    response = client.post(path, json={"recipe": "unread"})

    check_json_error(response, 404, f"no route {path}")


def test_unhandled_exception_is_json(recipe_folder: Path) -> None:
    # Without TESTING, Flask turns an exception into a 500 instead of raising it.
    app = create_app({"CELERY": {"broker_url": REDIS_URL}, "RECIPE_FOLDER": str(recipe_folder)})

    @app.get("/fails")
    def fails() -> None:
        raise RuntimeError("a bug in a view")

    response = app.test_client().get("/fails")
    app.extensions["celery"].close()

    check_json_error(response, 500, "Internal Server Error")
    assert "a bug in a view" not in response.get_data(as_text=True)
