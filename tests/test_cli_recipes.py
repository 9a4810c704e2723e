"""``workflows-celery run`` with named recipes, ``--dry-run``, the spool and ``pickup``."""

from __future__ import annotations

import json
import queue
import re
from pathlib import Path
from typing import Any

import pytest
from test_cli import SUMMARY, run_command, write_recipe

from workflows_celery import CeleryTransport, create_app
from workflows_celery.spool import REJECTED_FOLDER, spooled_files

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLE_RECIPES = REPOSITORY / "examples" / "recipes"

#: Exit status of a run spooled because the broker was unreachable.
EXIT_SPOOLED = 75

#: A broker address where nothing listens (port 1 needs root to bind).
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"


def test_named_recipe_runs_embedded() -> None:
    result = run_command("run", "pipethrough", "--recipe-dir", str(EXAMPLE_RECIPES), "-p", "sample=x")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Run ")
    assert " of pipethrough on the embedded broker" in result.stdout
    summary = SUMMARY.search(result.stdout)
    assert summary is not None, result.stdout
    assert summary.groups()[1:] == ("4", "4")


def test_named_recipes_merge_in_one_run() -> None:
    result = run_command(
        "run", "pipethrough", "spot-finding", "--recipe-dir", str(EXAMPLE_RECIPES), "--simulate",
        "-p", "sample=x", "-p", "ispyb_dcid=1", "-p", "image=x_0001.cbf",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert " of pipethrough + spot-finding on the embedded broker" in result.stdout
    summary = SUMMARY.search(result.stdout)
    assert summary is not None, result.stdout
    # Both recipes' nodes are reached: 4 of pipethrough and 5 of spot-finding.
    assert summary.groups()[1:] == ("9", "9")


def test_unknown_name_lists_recipes() -> None:
    result = run_command("run", "pipe", "--recipe-dir", str(EXAMPLE_RECIPES))

    assert result.returncode == 1
    assert "Recipe 'pipe' not found in" in result.stderr
    assert "it has: pipethrough, spot-finding" in result.stderr


def test_name_without_recipe_folder_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKFLOWS_CELERY_RECIPE_DIR", raising=False)
    result = run_command("run", "pipethrough")

    assert result.returncode == 1
    assert "no recipe folder is set; set WORKFLOWS_CELERY_RECIPE_DIR" in result.stderr


def test_dry_run_sends_nothing(tmp_path: Path) -> None:
    recipe = {
        "1": {"service": "Find", "queue": "tests.cli.{beamline}", "output": 2},
        "2": {"service": "Store", "queue": "tests.cli.store"},
        "3": {"service": "Later", "topic": "tests.cli.topic"},
        "start": [[1, {"n": 1}], [3, {"n": 2}]],
    }
    path = write_recipe(tmp_path, "dry.json", recipe)
    # The broker cannot be reached, which a dry run never notices.
    result = run_command("run", path, "-p", "beamline=i03", "--dry-run", "--broker", UNREACHABLE_BROKER)

    assert result.returncode == 0, result.stderr
    printed, _, first = result.stdout.partition("Run ")
    assert json.loads(printed)["1"]["queue"] == "tests.cli.i03"
    assert re.match(r"[0-9a-f-]{36} would send 2 first message\(s\):", first), first
    assert "node 1 to queue 'tests.cli.i03'" in first
    assert "node 3 to topic 'tests.cli.topic'" in first


@pytest.mark.redis
def test_spooled_run_picked_up_later(redis_url: str, unique: str, tmp_path: Path) -> None:
    queue_name = f"tests.cli.spool.{unique}"
    spool = tmp_path / "spool"
    path = write_recipe(tmp_path, "spooled.json", {"1": {"queue": "{target}"}, "start": [[1, {"n": 1}]]})
    spooled = run_command(
        "run", path, "-p", f"target={queue_name}", "--broker", UNREACHABLE_BROKER, "--spool-dir", str(spool)
    )

    assert spooled.returncode == EXIT_SPOOLED, spooled.stderr
    run_id = re.search(r"Run ([0-9a-f-]{36}) of .* spooled to ", spooled.stderr)
    assert run_id is not None, spooled.stderr
    assert "workflows-celery pickup --broker redis://127.0.0.1:1/0" in spooled.stderr
    assert len(spooled_files(spool)) == 1

    app = create_app(redis_url, main=f"tests.{unique}")
    transport = CeleryTransport(app)
    received: queue.Queue[Any] = queue.Queue()
    try:
        transport.subscribe(queue_name, lambda header, message: received.put(message))
        picked = run_command("pickup", "--broker", redis_url, "--spool-dir", str(spool))

        assert picked.returncode == 0, picked.stderr
        assert f"Started run {run_id.group(1)} of {path}" in picked.stdout
        assert "1 run(s) started, 0 rejected" in picked.stdout
        message = received.get(timeout=10)
        assert message["environment"]["ID"] == run_id.group(1)
        assert spooled_files(spool) == []
    finally:
        transport.disconnect()
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(queue_name)
        app.close()


def test_pickup_keeps_runs_while_unreachable(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    path = write_recipe(tmp_path, "kept.json", {"1": {"queue": "tests.cli.kept"}, "start": [[1, {}]]})
    assert run_command("run", path, "--broker", UNREACHABLE_BROKER, "--spool-dir", str(spool)).returncode == 75
    (spool / "0-not-a-run.json").write_text("{}")

    picked = run_command("pickup", "--broker", UNREACHABLE_BROKER, "--spool-dir", str(spool))

    # The unreadable file sorts first and is set aside; the run stays for later.
    assert picked.returncode == EXIT_SPOOLED, picked.stdout + picked.stderr
    assert "1 run(s) stay spooled" in picked.stderr
    assert len(spooled_files(spool)) == 1
    assert (spool / REJECTED_FOLDER / "0-not-a-run.json").is_file()


def test_no_spool_fails_at_once(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    path = write_recipe(tmp_path, "unspooled.json", {"1": {"queue": "tests.cli.none"}, "start": [[1, {}]]})
    result = run_command(
        "run", path, "--broker", UNREACHABLE_BROKER, "--no-spool", "--spool-dir", str(spool)
    )

    assert result.returncode == 1
    assert "unreachable" in result.stderr
    assert spooled_files(spool) == []


def test_pickup_with_empty_spool(tmp_path: Path) -> None:
    result = run_command("pickup", "--spool-dir", str(tmp_path / "empty"))

    assert result.returncode == 0
    assert "No spooled runs in" in result.stdout


def test_unusable_run_id_neither_sent_nor_spooled(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    path = write_recipe(tmp_path, "id.json", {"1": {"queue": "tests.cli.id"}, "start": [[1, {}]]})
    result = run_command(
        "run", path, "-p", "uuid=run/one", "--broker", UNREACHABLE_BROKER, "--spool-dir", str(spool)
    )

    assert result.returncode == 1
    assert "Invalid run ID 'run/one'" in result.stderr
    assert spooled_files(spool) == []

