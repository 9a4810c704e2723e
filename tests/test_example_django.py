"""The Django example in examples/django, against a real worker on Redis.

Django is configured once for this module from the example's own settings,
with the broker and the recipe folder overridden. One ``celery -A proj worker``
subprocess, started in examples/django without ``--services``, hosts
SamplePipethrough because the example's CELERY_WORKFLOWS_SERVICES setting
names it. Most runs end on a queue of the test's own, which the test reads to
see that the run reached its last node. The run state view reads the run
ledger, which is in the broker's Redis.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celery
import django
import pytest
from celery import Celery
from conftest import REDIS_URL
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import Client
from django.test.utils import (
    override_settings,
    setup_test_environment,
    teardown_test_environment,
)
from helpers import Harness, Recorder, wait_for
from workers import (
    DESTINATION_QUEUE,
    PREFORK_CONCURRENCY,
    REPO_ROOT,
    WORKER_READY_TIMEOUT_S,
    WorkerProcess,
    check_one_step_run,
    exclusive_sample_queues,
    purge_queues,
)

from soak.brokers import free_port
from workflows_celery import create_app

EXAMPLE_DIR = REPO_ROOT / "examples" / "django"

#: Seconds a run may take from the start request to its last node.
RUN_TIMEOUT_S = 15.0

#: Seconds the view may take to return 503 when nothing listens on the broker's port.
BROKER_DOWN_LIMIT_S = 5.0

#: Seconds a start may take when no worker reads the run's queue: it only publishes.
PUBLISH_LIMIT_S = 2.0

#: Seconds the subprocess of the import check may take.
SUBPROCESS_TIMEOUT_S = 60.0

#: Seconds that ``GET /runs/<id>/?wait=`` waits for a run on the worker to end.
STATE_WAIT_S = 20

#: Seconds that the state view may take beyond the wait it was asked for.
STATE_OVERHEAD_S = 1.0

#: Environment variables that the example's settings read, which the tests set themselves.
SETTINGS_VARIABLES = (
    "CELERY_BROKER_URL",
    "RECIPE_DIR",
    "CELERY_WORKFLOWS_LEDGER_URL",
    "DJANGO_TIME_ZONE",
)

#: Two steps: SamplePipethrough on the worker, then the test's own queue.
RELAY_RECIPE = {
    "1": {
        "service": "Message Pipethrough",
        "queue": DESTINATION_QUEUE,
        "parameters": {"sample": "{sample}"},
        "output": 2,
    },
    "2": {"service": "Test reply", "queue": "{reply_queue}"},
    "start": [[1, {"sample": "{sample}"}]],
}

#: One SamplePipethrough step with no output, so the run ends on the worker.
ONE_STEP_RECIPE = {
    "1": {"service": "Message Pipethrough", "queue": DESTINATION_QUEUE},
    "start": [[1, {"sample": "{sample}"}]],
}

#: One step on the test's own queue, which no worker reads.
DIRECT_RECIPE = {
    "1": {"service": "Test reply", "queue": "{reply_queue}"},
    "start": [[1, {"sample": "{sample}"}]],
}


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipe folder with the test recipes, and a valid recipe just outside it."""
    root = tmp_path_factory.mktemp("django-recipes")
    folder = root / "recipes"
    folder.mkdir()
    (folder / "relay.json").write_text(json.dumps(RELAY_RECIPE))
    (folder / "direct.json").write_text(json.dumps(DIRECT_RECIPE))
    (folder / "one-step.json").write_text(json.dumps(ONE_STEP_RECIPE))
    (root / "outside.json").write_text(json.dumps(DIRECT_RECIPE))
    return folder


@pytest.fixture(scope="module", autouse=True)
def django_project(recipe_dir: Path) -> Iterator[Celery]:
    """Configure Django from the example's settings and yield the example's Celery app."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLE_DIR))
        patch.setenv("DJANGO_SETTINGS_MODULE", "proj.settings")
        # Celery prefers CELERY_BROKER_URL from the environment to any setting,
        # and the settings module reads the others, so all are left unset.
        for variable in SETTINGS_VARIABLES:
            patch.delenv(variable, raising=False)
        # Creating the example's app makes it Celery's current app, which later
        # modules must not inherit.
        previous_app = celery.current_app._get_current_object()
        django.setup()
        from proj.celery import app

        setup_test_environment()
        try:
            with override_settings(CELERY_BROKER_URL=REDIS_URL, RECIPE_DIR=recipe_dir):
                yield app
        finally:
            teardown_test_environment()
            previous_app.set_current()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """``celery -A proj worker`` in examples/django, hosting the services of its settings."""
    with exclusive_sample_queues():
        purge_queues(REDIS_URL, DESTINATION_QUEUE)
        process = WorkerProcess(
            REDIS_URL,
            None,
            "prefork",
            "proj",
            tmp_path_factory.mktemp("django-worker"),
            cwd=EXAMPLE_DIR,
        )
        process.start()
        try:
            process.wait_until_ready()
            process.wait_for_output(
                r"Started service Message Pipethrough",
                count=PREFORK_CONCURRENCY,
                timeout_s=WORKER_READY_TIMEOUT_S,
            )
            yield process
        finally:
            process.stop()


@pytest.fixture
def redis_harness(unique: str) -> Iterator[Harness]:
    """Transports and queues of the test's own on Redis, deleted afterwards."""
    app = create_app(REDIS_URL, main=f"tests.django.{unique}")
    harness = Harness(app, unique)
    try:
        yield harness
    finally:
        harness.close()
        app.close()


def listen(harness: Harness) -> tuple[str, Recorder]:
    """Subscribe to a new queue of the test's own and return its name and recorder."""
    queue = harness.queue("reply")
    recorder = Recorder()
    harness.transport().subscribe(queue, recorder)
    return queue, recorder


def post_run(body: Any) -> Any:
    """POST ``body`` as JSON to the run API and return the response."""
    return Client().post("/runs/", body, content_type="application/json")


def wait_for_message(
    recorder: Recorder, timeout_s: float, worker: WorkerProcess | None = None
) -> Any:
    """Wait for the first message on the recorder's queue and return it."""
    arrived = wait_for(lambda: bool(recorder.messages), timeout_s)
    details = f"\n{worker.describe()}" if worker is not None else ""
    assert arrived, f"no message arrived within {timeout_s:.0f} s{details}"
    return recorder.messages[0]


def check_reached_last_node(message: Any, run_id: str, sample: str) -> None:
    """Check that ``message`` is run ``run_id`` at node 2 of the relay recipe, after node 1."""
    assert message["environment"]["ID"] == run_id
    assert message["recipe-pointer"] == 2
    assert message["recipe-path"] == [1]
    assert message["recipe"]["1"]["parameters"]["sample"] == sample


# -- Starting runs on the worker ----------------------------------------------------


def test_post_run_reaches_last_node(worker: WorkerProcess, redis_harness: Harness) -> None:
    queue, recorder = listen(redis_harness)
    sample = f"lysozyme-{redis_harness.suffix}"

    response = post_run({"recipe": "relay", "parameters": {"sample": sample, "reply_queue": queue}})

    assert response.status_code == 202, response.content
    run_id = response.json()["run_id"]
    assert str(uuid.UUID(run_id)) == run_id
    message = wait_for_message(recorder, RUN_TIMEOUT_S, worker)
    check_reached_last_node(message, run_id, sample)


def test_command_run_reaches_last_node(worker: WorkerProcess, redis_harness: Harness) -> None:
    queue, recorder = listen(redis_harness)
    sample = f"thaumatin-{redis_harness.suffix}"
    output = io.StringIO()

    call_command(
        "start_recipe", "relay", "--param", f"sample={sample}", "-p", f"reply_queue={queue}",
        stdout=output,
    )  # fmt: skip

    run_id = output.getvalue().strip()
    assert str(uuid.UUID(run_id)) == run_id
    message = wait_for_message(recorder, RUN_TIMEOUT_S, worker)
    check_reached_last_node(message, run_id, sample)


def test_post_without_consumer_returns_at_once(redis_harness: Harness) -> None:
    # No worker reads the test's own queue, so this start has no worker to wait for.
    queue, recorder = listen(redis_harness)

    started = time.monotonic()
    response = post_run({"recipe": "direct", "parameters": {"sample": "x", "reply_queue": queue}})
    elapsed_s = time.monotonic() - started

    assert response.status_code == 202, response.content
    assert elapsed_s < PUBLISH_LIMIT_S
    message = wait_for_message(recorder, RUN_TIMEOUT_S)
    assert message["environment"]["ID"] == response.json()["run_id"]
    assert message["recipe-pointer"] == 1


# -- Errors of the run API ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ('{"recipe": "direct", ', 400, "not valid JSON"),
        ('["direct"]', 400, "expected a JSON object"),
        ('{"parameters": {}}', 400, "missing field 'recipe'"),
        ('{"recipe": "direct", "params": {}}', 400, "unknown field 'params'"),
        ('{"recipe": "no-such-recipe"}', 404, "unknown recipe 'no-such-recipe'"),
        ('{"recipe": "direct", "parameters": ["sample"]}', 400, "not a JSON array"),
        ('{"recipe": "direct", "parameters": {"sample": "x"}}', 400, "{reply_queue}"),
    ],
    ids=[
        "malformed-json",
        "not-an-object",
        "missing-recipe",
        "unknown-field",
        "unknown-recipe",
        "parameters-not-an-object",
        "parameter-missing",
    ],
)
def test_post_rejects_bad_request(body: str, status: int, fragment: str) -> None:
    response = post_run(body)

    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    assert fragment in response.json()["error"]


def test_unknown_recipe_lists_available() -> None:
    response = post_run({"recipe": "no-such-recipe"})

    assert response.status_code == 404
    assert "available recipes: direct, one-step, relay" in response.json()["error"]


@pytest.mark.parametrize(
    "name",
    ["../outside", "..", "./direct", "recipes/../direct", "/tmp/outside", ["direct"]],
)
def test_post_rejects_name_outside_folder(
    name: Any, recipe_dir: Path, redis_harness: Harness
) -> None:
    # outside.json is a valid recipe next to the folder, so "../outside" would start.
    assert (recipe_dir.parent / "outside.json").is_file()
    queue = redis_harness.queue("reply")

    response = post_run({"recipe": name, "parameters": {"sample": "x", "reply_queue": queue}})

    assert response.status_code == 400, response.content
    assert "invalid recipe name" in response.json()["error"]


def test_post_rejects_other_content_type() -> None:
    response = Client().post("/runs/", {"recipe": "direct"})

    assert response.status_code == 415
    assert "application/json" in response.json()["error"]


def check_json_error(response: Any, status: int, fragment: str) -> None:
    """Check that ``response`` is a JSON error with ``status`` and ``fragment`` in its message."""
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    assert fragment in response.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("get", "/runs/", "POST"),
        ("get", "/runs", "POST"),
        ("put", "/runs/", "POST"),
        ("post", "/runs/abc/", "GET, HEAD"),
        ("delete", "/runs/abc", "GET, HEAD"),
    ],
)
def test_wrong_method_is_json(method: str, path: str, allowed: str) -> None:
    response = getattr(Client(), method)(path)

    check_json_error(response, 405, f"method {method.upper()} is not allowed on {path}")
    assert response["Allow"] == allowed


@pytest.mark.parametrize("path", ["/", "/nope", "/runs/a/b/", "/runs/abc/steps"])
def test_unknown_url_is_json(path: str) -> None:
    response = Client().get(path)

    check_json_error(response, 404, f"no route {path}")


def test_post_without_trailing_slash_starts(redis_harness: Harness) -> None:
    queue, recorder = listen(redis_harness)

    response = Client().post(
        "/runs",
        {"recipe": "direct", "parameters": {"sample": "x", "reply_queue": queue}},
        content_type="application/json",
    )

    assert response.status_code == 202, response.content
    message = wait_for_message(recorder, RUN_TIMEOUT_S)
    assert message["environment"]["ID"] == response.json()["run_id"]


# -- The state of a run ---------------------------------------------------------------------


def test_run_state_after_worker_ran_it(worker: WorkerProcess, redis_harness: Harness) -> None:
    response = post_run({"recipe": "one-step", "parameters": {"sample": redis_harness.suffix}})
    assert response.status_code == 202, response.content
    run_id = response.json()["run_id"]

    state = Client().get(f"/runs/{run_id}/", {"wait": STATE_WAIT_S})

    assert state.status_code == 200, state.content
    assert state["Content-Type"] == "application/json"
    check_one_step_run(state.json(), run_id, worker)


def test_run_state_wait_ends_on_time(redis_harness: Harness) -> None:
    # No worker reads the test's own queue, so the run cannot end while the view waits.
    queue = redis_harness.queue("reply")
    response = post_run({"recipe": "direct", "parameters": {"sample": "x", "reply_queue": queue}})
    run_id = response.json()["run_id"]
    wait_s = 1.0

    started = time.monotonic()
    state = Client().get(f"/runs/{run_id}", {"wait": wait_s})
    elapsed_s = time.monotonic() - started

    assert state.status_code == 200, state.content
    record = state.json()
    assert record["state"] == "running"
    assert record["in_flight"] == 1
    assert record["steps"] == []
    assert wait_s <= elapsed_s < wait_s + STATE_OVERHEAD_S


def test_run_state_unknown_run() -> None:
    response = Client().get(f"/runs/{uuid.uuid4()}/")

    check_json_error(response, 404, "no run")
    assert "7 days" in response.json()["error"]


@pytest.mark.parametrize(
    "run_id",
    ["bad*id", "a.b", "-leading-dash", "x" * 129, "run%00id", "run%20id", "%E2%9C%93"],
    ids=["star", "dot", "leading-dash", "too-long", "nul", "space", "non-ascii"],
)
def test_run_state_invalid_run_id(run_id: str) -> None:
    response = Client().get(f"/runs/{run_id}/")

    check_json_error(response, 400, "invalid run ID")


@pytest.mark.parametrize("wait", ["-1", "31", "abc", "nan", "inf", ""])
def test_run_state_invalid_wait(wait: str) -> None:
    response = Client().get(f"/runs/{uuid.uuid4()}/", {"wait": wait})

    check_json_error(response, 400, f"invalid wait {wait!r}")


# -- The management command's errors ------------------------------------------------------


def test_command_unknown_recipe_fails() -> None:
    with pytest.raises(
        CommandError, match=r"unknown recipe 'nope'; available recipes: direct, one-step, relay"
    ):
        call_command("start_recipe", "nope", stdout=io.StringIO())


def test_command_malformed_param_fails() -> None:
    with pytest.raises(CommandError, match=r"expected KEY=VALUE"):
        call_command("start_recipe", "direct", "--param", "sample", stdout=io.StringIO())


# -- Settings and imports -----------------------------------------------------------------


def test_default_recipe_folder_is_examples_recipes() -> None:
    # The module's own value, which override_settings leaves alone.
    default = sys.modules["proj.settings"].RECIPE_DIR

    assert default == REPO_ROOT / "examples" / "recipes"
    assert (default / "pipethrough.json").is_file()
    assert settings.RECIPE_DIR != default


def test_settings_reach_celery(django_project: Celery) -> None:
    conf = django_project.conf

    assert conf.workflows_services == ["SamplePipethrough"]
    assert conf.broker_url == REDIS_URL
    assert conf.broker_transport_options["socket_connect_timeout"] == 2
    assert conf.workflows_ledger_url is None


def test_time_zone_is_utc(django_project: Celery) -> None:
    assert settings.TIME_ZONE == "UTC"
    assert django_project.conf.timezone == "UTC"
    # Django moves TIME_ZONE into the process's clock.
    assert time.strftime("%Z") == "UTC"


# -- The web process and the command in processes of their own ---------------------------
#
# These start Django afresh with the settings from the environment, as a server
# does. A broker that cannot be reached is tested this way because a Celery app
# keeps its pool of producers for the broker it first used.

#: Run in a fresh interpreter as the web process: load the WSGI application,
#: make the requests given as a JSON list of [method, path, body] in the
#: argument, then print the responses and what the process imported. A path
#: may contain {run_id}, the run ID of the latest response that had one.
WEB_PROCESS = """
import json, sys, time
from proj.wsgi import application
from django.test import Client
from django.test.utils import setup_test_environment
from workflows.services.common_service import CommonService

setup_test_environment()
client = Client()
responses = []
run_id = None
for method, path, body in json.loads(sys.argv[1]):
    started = time.monotonic()
    if method == "POST":
        response = client.post(path, json.dumps(body), content_type="application/json")
    else:
        response = client.get(path.format(run_id=run_id))
    elapsed_s = time.monotonic() - started
    run_id = response.json().get("run_id", run_id)
    responses.append({
        "status": response.status_code, "body": response.json(), "elapsed_s": elapsed_s
    })

def subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)

print(json.dumps({
    "responses": responses,
    "services": sorted(
        f"{cls.__module__}:{cls.__qualname__}"
        for cls in subclasses(CommonService)
        # workflows-celery's own adapter for recipe_step functions.
        if not cls.__module__.startswith("workflows_celery.")
    ),
    "modules": sorted(name for name in sys.modules if name.startswith("workflows.services.sample")),
}))
"""


def example_environment(
    broker_url: str, recipe_dir: Path, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Return the environment of a process of the example with this broker and recipe folder."""
    inherited = {
        name: value for name, value in os.environ.items() if name not in SETTINGS_VARIABLES
    }
    return {
        **inherited,
        "DJANGO_SETTINGS_MODULE": "proj.settings",
        "CELERY_BROKER_URL": broker_url,
        "RECIPE_DIR": str(recipe_dir),
        **(extra or {}),
    }


def run_in_example(
    arguments: list[str],
    broker_url: str,
    recipe_dir: Path,
    extra_environment: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run Python with ``arguments`` in examples/django and return the finished process.

    Python puts the folder first on ``sys.path`` for ``-c`` and for
    ``manage.py``, so ``proj`` is found there as in a server started there.
    """
    return subprocess.run(
        [sys.executable, *arguments],
        check=False,
        cwd=EXAMPLE_DIR,
        env=example_environment(broker_url, recipe_dir, extra_environment),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def requests_in_web_process(
    requests: list[tuple[str, str, Any]],
    broker_url: str,
    recipe_dir: Path,
    extra_environment: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Make ``requests`` in a fresh web process and return its report (see ``WEB_PROCESS``)."""
    result = run_in_example(
        ["-c", WEB_PROCESS, json.dumps(requests)], broker_url, recipe_dir, extra_environment
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def test_web_process_imports_no_service_code(recipe_dir: Path, redis_harness: Harness) -> None:
    queue = redis_harness.queue("reply")
    body = {"recipe": "direct", "parameters": {"sample": "x", "reply_queue": queue}}

    report = requests_in_web_process(
        [("POST", "/runs/", body), ("GET", "/runs/{run_id}/?wait=0.1", None)], REDIS_URL, recipe_dir
    )

    started, state = report["responses"]
    assert started["status"] == 202, started["body"]
    assert state["status"] == 200, state["body"]
    assert state["body"]["run_id"] == started["body"]["run_id"]
    assert state["body"]["state"] == "running"
    assert report["services"] == []
    assert report["modules"] == []


def test_broker_unreachable_returns_503(recipe_dir: Path) -> None:
    unused = f"redis://127.0.0.1:{free_port()}/0"
    body = {"recipe": "direct", "parameters": {"sample": "x", "reply_queue": "unused"}}

    report = requests_in_web_process([("POST", "/runs/", body)], unused, recipe_dir)

    (response,) = report["responses"]
    assert response["status"] == 503, response["body"]
    assert "unreachable" in response["body"]["error"]
    assert response["elapsed_s"] < BROKER_DOWN_LIMIT_S


def test_ledger_unreachable_returns_503(recipe_dir: Path) -> None:
    unused = f"redis://127.0.0.1:{free_port()}/0"

    report = requests_in_web_process(
        [("GET", f"/runs/{uuid.uuid4()}/?wait=5", None)],
        REDIS_URL,
        recipe_dir,
        {"CELERY_WORKFLOWS_LEDGER_URL": unused},
    )

    (response,) = report["responses"]
    assert response["status"] == 503, response["body"]
    assert "run ledger is unreachable" in response["body"]["error"]
    assert response["elapsed_s"] < STATE_OVERHEAD_S


def test_command_broker_unreachable_fails(recipe_dir: Path) -> None:
    unused = f"redis://127.0.0.1:{free_port()}/0"

    result = run_in_example(
        ["manage.py", "start_recipe", "direct", "-p", "sample=x", "-p", "reply_queue=unused"],
        unused,
        recipe_dir,
    )

    assert result.returncode == 1, result.stdout
    assert "unreachable" in result.stderr
    assert result.stdout == ""
