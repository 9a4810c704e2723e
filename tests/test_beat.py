"""Starting recipes from ``celery beat``: the start task and the ready-made app's settings module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from helpers import wait_for
from workflows.recipe.wrapper import RecipeWrapper

from workflows_celery import recipe_step
from workflows_celery.constants import START_TASK_NAME
from workflows_celery.testing import Run, WorkflowsHarness

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Queue of the step function the started recipes run.
ECHO_QUEUE = "tests.beat.echo"

#: Seconds between two runs in the test schedule.
SCHEDULE_INTERVAL_S = 0.5
#: Seconds beat may take to start and send its first two tasks.
BEAT_TIMEOUT_S = 30.0


def echo(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    rw.send({"echo": payload, "parameter": rw.recipe_step["parameters"]["which"]})


@pytest.fixture
def workflows_app(workflows_app: Celery) -> Celery:
    recipe_step(workflows_app, ECHO_QUEUE)(echo)
    return workflows_app


def write_recipe(folder: Path) -> Path:
    path = folder / "echo.json"
    path.write_text(
        json.dumps(
            {
                "1": {"service": "Echo", "queue": ECHO_QUEUE, "parameters": {"which": "{which}"}, "output": 2},
                "2": {"service": "Results", "queue": "tests.beat.results"},
                "start": [[1, {"image": "x_0001.cbf"}]],
            }
        )
    )
    return path


def started_run(harness: WorkflowsHarness, run_id: str) -> Run:
    """Wait until the start task has sent the first message of ``run_id``, and return the run."""
    assert wait_for(lambda: any(m.run_id == run_id for m in harness.sent)), (
        f"the start task sent no message of run {run_id}"
    )
    return Run(harness, run_id).wait()


def test_start_task_runs_recipe_file(workflows_harness: WorkflowsHarness, tmp_path: Path) -> None:
    run_id = str(uuid.uuid4())
    workflows_harness.app.send_task(
        START_TASK_NAME,
        kwargs={
            "recipe": str(write_recipe(tmp_path)),
            "parameters": {"which": "scheduled"},
            "environment": {"ID": run_id},
        },
    )
    run = started_run(workflows_harness, run_id)
    assert run.nodes_run() == [1]
    assert run.payloads_to(2) == [{"echo": {"image": "x_0001.cbf"}, "parameter": "scheduled"}]


def test_start_task_takes_recipe_object(workflows_harness: WorkflowsHarness, tmp_path: Path) -> None:
    run_id = str(uuid.uuid4())
    recipe = json.loads(write_recipe(tmp_path).read_text())
    workflows_harness.app.send_task(
        START_TASK_NAME,
        kwargs={"recipe": recipe, "parameters": {"which": "object"}, "environment": {"ID": run_id}},
    )
    assert started_run(workflows_harness, run_id).payloads_to(2)[0]["parameter"] == "object"


def test_start_task_rejects_invalid_recipe(
    workflows_harness: WorkflowsHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "missing.json"
    workflows_harness.app.send_task(START_TASK_NAME, kwargs={"recipe": str(missing)})
    assert wait_for(lambda: f"cannot read {str(missing)!r}" in caplog.text), caplog.text
    assert workflows_harness.sent == []


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_ready_made_app_loads_settings_module(tmp_path: Path) -> None:
    (tmp_path / "site_settings.py").write_text(
        textwrap.dedent(
            """
            broker_url = "redis://127.0.0.1:6379/15"
            workflows_namespace = "site"
            beat_schedule = {"nightly": {"task": "workflows_celery.start_recipe", "schedule": 60.0}}
            """
        )
    )
    result = _run_python(
        "import workflows_celery as w; c = w.default_app().conf; "
        "print(c.broker_url, c.broker_transport, c.workflows_namespace, sorted(c.beat_schedule))",
        {"CELERY_CONFIG_MODULE": "site_settings", "PYTHONPATH": str(tmp_path), "CELERY_BROKER_URL": ""},
    )
    assert result.returncode == 0, result.stderr
    # workflows-celery's Redis defaults apply to a broker set in the module.
    assert result.stdout.split() == ["redis://127.0.0.1:6379/15", "workflows-redis", "site", "['nightly']"]


def test_unimportable_settings_module_named() -> None:
    result = _run_python(
        "import workflows_celery as w; w.default_app()",
        {"CELERY_CONFIG_MODULE": "no_such_settings_module"},
    )
    assert result.returncode != 0
    assert (
        "CELERY_CONFIG_MODULE='no_such_settings_module' names a module that cannot be imported"
        in result.stderr
    )
    assert "put its folder on PYTHONPATH" in result.stderr


@pytest.mark.redis
def test_beat_sends_start_tasks_on_schedule(redis_url: str, tmp_path: Path, unique: str) -> None:
    queue = f"tests.beat.{unique}"
    (tmp_path / "beat_settings.py").write_text(
        textwrap.dedent(
            f"""
            task_default_queue = {queue!r}
            beat_schedule = {{
                "echo": {{
                    "task": "workflows_celery.start_recipe",
                    "schedule": {SCHEDULE_INTERVAL_S},
                    "kwargs": {{"recipe": "examples/recipes/pipethrough.json"}},
                }},
            }}
            """
        )
    )
    client = redis.Redis.from_url(redis_url)
    command = [
        sys.executable, "-m", "celery", "-A", "workflows_celery", "beat",
        "-s", str(tmp_path / "schedule"), "--pidfile=", "-l", "INFO",
    ]  # fmt: skip
    env = {
        **os.environ,
        "CELERY_CONFIG_MODULE": "beat_settings",
        "PYTHONPATH": str(tmp_path),
        "CELERY_BROKER_URL": redis_url,
    }
    log_path = tmp_path / "beat.log"
    with log_path.open("wb") as log:
        beat = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        sent = wait_for(lambda: client.llen(queue) >= 2, timeout_s=BEAT_TIMEOUT_S)
        assert sent, f"beat sent {client.llen(queue)} task(s)\n{log_path.read_text()}"
        message = json.loads(client.lindex(queue, 0) or b"{}")
        assert message["headers"]["task"] == START_TASK_NAME
    finally:
        beat.send_signal(signal.SIGTERM)
        try:
            beat.wait(30)
        except subprocess.TimeoutExpired:
            beat.kill()
            beat.wait(10)
        client.delete(queue)
        client.close()
