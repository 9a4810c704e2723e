"""The ``workflows-celery`` command: ``run`` (embedded, simulated, on a broker) and ``validate``.

Commands that start a worker run in a subprocess, as a user runs them, except
one run that checks what an in-process call leaves behind. Argument and
validation checks call ``main()`` in this process.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from celery import _state as celery_state
from conftest import SHARED_RECIPES

from workflows_celery import CeleryTransport, create_app
from workflows_celery.cli import main
from workflows_celery.recipes import prepare_recipe
from workflows_celery.simulate import reachable_nodes

REPOSITORY = Path(__file__).resolve().parents[1]
PIPETHROUGH_RECIPE = REPOSITORY / "examples" / "recipes" / "pipethrough.json"

SUMMARY = re.compile(r"^(\d+) steps? run, (\d+) of (\d+) reachable nodes reached, [\d.]+ s$", re.M)
TREE_NODE = re.compile(r"[├└]── (\d+)  ")

SHARED_RECIPE_NAMES = sorted(path.name for path in SHARED_RECIPES.glob("*.json")) or [
    pytest.param("absent", marks=pytest.mark.skip(reason=f"no shared recipes at {SHARED_RECIPES}"))
]


def run_command(*arguments: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m workflows_celery`` with ``arguments`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "workflows_celery", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPOSITORY,
    )


def write_recipe(folder: Path, name: str, recipe: Any) -> str:
    path = folder / name
    path.write_text(recipe if isinstance(recipe, str) else json.dumps(recipe), encoding="utf-8")
    return str(path)


# -- Arguments and help ----------------------------------------------------------


def test_module_help_lists_commands() -> None:
    result = run_command("--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: workflows-celery")
    assert "run" in result.stdout
    assert "validate" in result.stdout


def test_param_without_equals_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", str(PIPETHROUGH_RECIPE), "--param", "sample"])

    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "argument -p/--param: invalid parameter 'sample': expected KEY=VALUE" in error


def test_param_with_invalid_json_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", str(PIPETHROUGH_RECIPE), "--param", "settings={not json"])

    assert exited.value.code == 2
    assert "invalid parameter 'settings': value looks like JSON" in capsys.readouterr().err


def test_simulate_with_broker_rejected(
    capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    status = main(["run", str(PIPETHROUGH_RECIPE), "--simulate", "--broker", redis_url])

    assert status == 2
    assert "--simulate runs the recipe here" in capsys.readouterr().err


# -- run ----------------------------------------------------------------------------


def test_run_embedded_pipethrough_prints_tree() -> None:
    result = run_command("run", "examples/recipes/pipethrough.json", "--param", "sample=x")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(
        r"Run [0-9a-f-]{36} of examples/recipes/pipethrough\.json on the embedded broker .*",
        lines[0],
    )
    assert lines[1:6] == [
        "start",
        "└── 1  Message Pipethrough  queue transient.destination  path []",
        "    ├── 2  Message Pipethrough  queue transient.destination  path [1]",
        "    │   └── 4  Message Pipethrough  queue transient.destination  path [1, 2]",
        "    └── 3  Message Pipethrough  queue transient.destination  path [1]",
    ]
    assert lines[6].startswith("4 steps run, 4 of 4 reachable nodes reached, ")


def test_run_in_process_keeps_default_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = {"1": {"service": "Anything", "queue": "tests.cli.in-process"}, "start": [[1, {}]]}
    path = write_recipe(tmp_path, "in-process.json", recipe)
    default_app_before = celery_state.default_app

    status = main(["run", "--simulate", path])

    assert status == 0
    assert "1 step run, 1 of 1 reachable nodes reached" in capsys.readouterr().out
    assert celery_state.default_app is default_app_before


def test_run_embedded_without_services_fails(tmp_path: Path) -> None:
    recipe = {"1": {"service": "No such service", "queue": "tests.cli.nowhere"}, "start": [[1, {}]]}
    path = write_recipe(tmp_path, "unknown.json", recipe)

    result = run_command("run", path)

    assert result.returncode == 2
    assert "no installed service matches" in result.stderr


def test_run_on_broker_prints_run_id(broker_url: str, unique: str, tmp_path: Path) -> None:
    queue_name = f"tests.cli.{unique}"
    recipe = {"1": {"service": "Anything", "queue": "{target}"}, "start": [[1, {"n": 1}]]}
    path = write_recipe(tmp_path, "on-broker.json", recipe)
    app = create_app(broker_url, main=f"tests.{unique}")
    transport = CeleryTransport(app)
    received: queue.Queue[Any] = queue.Queue()
    try:
        transport.subscribe(queue_name, lambda header, message: received.put(message))
        result = run_command("run", path, "--param", f"target={queue_name}", "--broker", broker_url)

        assert result.returncode == 0, result.stderr
        started = re.fullmatch(r"Started run ([0-9a-f-]{36}) of (.+) on (.+)\n", result.stdout)
        assert started is not None, result.stdout
        assert started.group(2) == path
        assert ":guest@" not in started.group(3)
        message = received.get(timeout=10)
        assert message["environment"]["ID"] == started.group(1)
        assert message["payload"] == {"n": 1}
    finally:
        transport.disconnect()
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(queue_name)
        app.close()


def test_run_on_broker_rejects_unresolved_queue(
    capsys: pytest.CaptureFixture[str], redis_url: str, tmp_path: Path
) -> None:
    recipe = {"1": {"service": "Anything", "queue": "{target}"}, "start": [[1, {}]]}
    path = write_recipe(tmp_path, "unresolved.json", recipe)

    status = main(["run", path, "--broker", redis_url])

    assert status == 1
    error = capsys.readouterr().err
    assert "unresolved placeholder in node 1 queue '{target}'" in error
    assert path in error


# -- validate -----------------------------------------------------------------------


INVALID_FILES = {
    "malformed JSON": ('{"1": {"queue": "a"}, "start": [[1, {}]]', "is not valid JSON"),
    "cycle": (
        {"1": {"queue": "a", "output": 2}, "2": {"queue": "b", "output": 1}, "start": [[1, {}]]},
        "Recipe contains cycle",
    ),
    "missing node": ({"1": {"queue": "a", "output": 3}, "start": [[1, {}]]}, 'Node "3"'),
    "unreferenced node": (
        {"1": {"queue": "a"}, "2": {"queue": "b"}, "start": [[1, {}]]},
        'unreferenced node "2"',
    ),
    "non-numeric node": (
        {"1": {"queue": "a"}, "one": {"queue": "b"}, "start": [[1, {}]]},
        'Node "one" is not numeric',
    ),
    "empty start": ({"1": {"queue": "a"}, "start": []}, '"start" node empty'),
    "node not an object": ({"1": [], "start": [[1, {}]]}, 'Node "1" is a JSON list'),
    "duplicate keys": (
        '{"1": {"queue": "a"}, "1": {"queue": "b"}, "start": [[1, {}]]}',
        "key '1' appears twice",
    ),
    "node without destination": (
        {"1": {"queue": "a", "output": 2}, "2": {"service": "Lost"}, "start": [[1, {}]]},
        'Node "2" has neither "queue" nor "topic"',
    ),
}

VALID_RECIPE = {"1": {"queue": "a", "output": {"success": 2}}, "2": {"topic": "b"}, "start": [[1, {}]]}


@pytest.mark.parametrize("case", sorted(INVALID_FILES))
def test_validate_reports_invalid_file(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe, problem = INVALID_FILES[case]
    path = write_recipe(tmp_path, "invalid.json", recipe)

    status = main(["validate", path])

    assert status == 1
    output = capsys.readouterr()
    assert output.out == ""
    assert output.err.startswith("error: Invalid recipe")
    assert path in output.err
    assert problem in output.err
    assert "1 of 1 recipes invalid" in output.err


def test_validate_fails_when_any_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    valid = write_recipe(tmp_path, "valid.json", VALID_RECIPE)
    invalid = write_recipe(tmp_path, "invalid.json", {"1": {"queue": "a"}, "start": []})

    status = main(["validate", valid, invalid])

    assert status == 1
    output = capsys.readouterr()
    assert output.out == f"{valid}: valid\n"
    assert "error: Invalid recipe" in output.err
    assert str(invalid) in output.err
    assert "1 of 2 recipes invalid" in output.err


def test_validate_passes_valid_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    valid = write_recipe(tmp_path, "valid.json", VALID_RECIPE)
    placeholder = write_recipe(
        tmp_path, "placeholder.json", {"1": {"queue": "results.{beamline}"}, "start": [[1, {}]]}
    )

    status = main(["validate", valid, placeholder])

    assert status == 0
    output = capsys.readouterr()
    assert output.out.splitlines() == [
        f"{valid}: valid",
        f"{placeholder}: valid (placeholders to fill at run time: node 1 queue 'results.{{beamline}}')",
    ]
    assert output.err == ""


def test_validate_missing_file_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "absent.json")

    assert main(["validate", path]) == 1
    assert f"error: Invalid recipe: cannot read '{path}'" in capsys.readouterr().err


# -- Published recipes ------------------------------------------------------------------


@pytest.mark.parametrize("name", SHARED_RECIPE_NAMES)
def test_shared_recipe_validates(
    name: str, shared_recipes: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(SHARED_RECIPES / name)

    assert main(["validate", path]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: valid")


@pytest.mark.parametrize("name", SHARED_RECIPE_NAMES)
def test_shared_recipe_simulation_reaches_all(name: str, shared_recipes: list[Path]) -> None:
    path = SHARED_RECIPES / name
    reachable = reachable_nodes(prepare_recipe(path, allow_unresolved=True))

    started = time.monotonic()
    result = run_command("run", "--simulate", str(path))
    elapsed_s = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    summary = SUMMARY.search(result.stdout)
    assert summary is not None, result.stdout
    steps, reached, total = (int(group) for group in summary.groups())
    assert total == len(reachable)
    assert reached == total
    assert steps >= reached
    assert {int(node) for node in TREE_NODE.findall(result.stdout)} == reachable
    assert "warning:" not in result.stderr
    assert elapsed_s < 20


def test_shared_recipes_found(shared_recipes: list[Path]) -> None:
    assert [path.name for path in shared_recipes] == SHARED_RECIPE_NAMES
    assert SHARED_RECIPE_NAMES



def test_run_embedded_reports_dead_letters(tmp_path: Path) -> None:
    recipe = tmp_path / "reject.json"
    recipe.write_text(
        json.dumps(
            {
                "1": {"service": "Rejector", "queue": "test.rejector"},
                "start": [[1, {"image": 3}]],
            }
        )
    )
    result = run_command(
        "run", str(recipe), "--services", "tests.services_for_tests:Rejector"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 step run" in result.stdout
    assert "warning: dead-lettered" in result.stderr
    assert "from test.rejector" in result.stderr
    assert "rejected" in result.stderr
