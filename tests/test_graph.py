"""``workflows-celery graph``: recipes and runs as DOT text, SVG and PNG."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from test_cli import run_command, write_recipe
from workflows.recipe import Recipe
from workflows.recipe.wrapper import RecipeWrapper

from workflows_celery import recipe_step, start_recipe
from workflows_celery.constants import SETTING_LEDGER_URL
from workflows_celery.graph import recipe_dot
from workflows_celery.ledger import require_ledger
from workflows_celery.testing import WorkflowsHarness

REPOSITORY = Path(__file__).resolve().parents[1]

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")

RECIPE = {
    "1": {"service": "Find spots", "queue": "tests.graph.find", "output": {"spots": 2, "failure": [3, 4]}},
    "2": {"service": "Count", "queue": "tests.graph.count", "output": 5},
    "3": {"service": "Notify", "topic": "tests.graph.failures"},
    "4": {"service": "Store", "queue": "tests.graph.store"},
    "5": {"service": "Store", "queue": "tests.graph.store"},
    "start": [[1, {"image": "x.cbf"}]],
}


def find(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    for spot in range(2):
        rw.send_to("spots", {"spot": spot})


def count(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    if payload.get("again"):
        rw.send(payload)
    else:
        rw.checkpoint({**payload, "again": True})


def store(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    """Keep nothing: the end of the run."""


@pytest.fixture
def workflows_app(workflows_app: Celery, redis_url: str) -> Celery:
    workflows_app.conf[SETTING_LEDGER_URL] = redis_url
    recipe_step(workflows_app, "tests.graph.find", name="Find spots")(find)
    recipe_step(workflows_app, "tests.graph.count", name="Count")(count)
    recipe_step(workflows_app, "tests.graph.store", name="Store")(store)
    return workflows_app


def test_dot_shows_nodes_and_outputs() -> None:
    dot = recipe_dot(Recipe(RECIPE), title="spots")

    assert 'n1 [label="1: Find spots\\nqueue tests.graph.find"];' in dot
    assert 'n3 [label="3: Notify\\ntopic tests.graph.failures", shape=hexagon];' in dot
    assert "  start -> n1;" in dot
    assert '  n1 -> n2 [label="spots"];' in dot
    assert '  n1 -> n3 [label="failure"];' in dot
    assert '  n1 -> n4 [label="failure"];' in dot
    assert "  n2 -> n5;" in dot
    assert 'label="spots"; labelloc=t;' in dot


def test_dot_quotes_odd_names() -> None:
    recipe = Recipe({"1": {"service": 'say "hi" \\ bye', "queue": "q"}, "start": [[1, {}]]})
    assert 'label="1: say \\"hi\\" \\\\ bye\\nqueue q"' in recipe_dot(recipe)


@pytest.mark.redis
def test_run_picture_counts_messages(workflows_harness: WorkflowsHarness) -> None:
    run = workflows_harness.run(RECIPE)
    record = require_ledger(workflows_harness.app).wait(run.id, 30)

    dot = recipe_dot(Recipe(RECIPE), record)
    assert '  start -> n1 [label="(1)"];' in dot
    assert '  n1 -> n2 [label="spots (2)"];' in dot
    assert '  n1 -> n4 [label="failure (0)"];' in dot
    assert '  n2 -> n5 [label="(2)"];' in dot
    assert '  n2 -> n2 [style=dashed, label="checkpoint (2)"];' in dot
    assert 'fillcolor="#c6efce", xlabel="4 done"' in dot
    assert 'n4 [label="4: Store\\nqueue tests.graph.store", fillcolor="#eeeeee"]' in dot


@needs_dot
def test_shared_recipe_drawn_as_svg(shared_recipes: list[Path], tmp_path: Path) -> None:
    recipe = next(path for path in shared_recipes if "relion" in path.name)
    picture = tmp_path / "relion.svg"

    result = run_command("graph", str(recipe), "--output", str(picture))

    assert result.returncode == 0, result.stderr
    svg = picture.read_text()
    assert "<svg" in svg
    assert "Cluster submission" in svg
    assert "images_particles" in svg


@needs_dot
@pytest.mark.redis
def test_run_drawn_as_png(workflows_harness: WorkflowsHarness, redis_url: str, tmp_path: Path) -> None:
    run = workflows_harness.run(RECIPE)
    require_ledger(workflows_harness.app).wait(run.id, 30)
    path = write_recipe(tmp_path, "spots.json", RECIPE)
    picture = tmp_path / "run.png"

    result = run_command("graph", path, "--run", run.id, "--broker", redis_url, "-o", str(picture))

    assert result.returncode == 0, result.stderr
    assert picture.read_bytes().startswith(b"\x89PNG")


def test_named_recipe_as_dot_on_stdout() -> None:
    result = run_command("graph", "spot-finding", "--recipe-dir", str(REPOSITORY / "examples" / "recipes"))

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("digraph recipe {")
    assert "queue per_image_analysis" in result.stdout


def test_unknown_suffix_rejected(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "spots.json", RECIPE)
    result = run_command("graph", path, "-o", str(tmp_path / "spots.jpeg"))

    assert result.returncode == 1
    assert "end the file name in .svg, .png, .dot or .gv" in result.stderr


def test_missing_dot_explained(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "spots.json", RECIPE)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run(
        [sys.executable, "-m", "workflows_celery", "graph", path, "-o", str(tmp_path / "x.svg")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Graphviz's 'dot' program is not on the PATH" in result.stderr


def test_missing_output_folder_explained(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "spots.json", RECIPE)
    result = run_command("graph", path, "-o", str(tmp_path / "absent" / "spots.dot"))

    assert result.returncode == 1
    assert "check that its folder exists" in result.stderr


@pytest.mark.redis
def test_run_of_other_recipe_warned(workflows_harness: WorkflowsHarness, redis_url: str, tmp_path: Path) -> None:
    run_id = start_recipe(RECIPE, app=workflows_harness.app, origin="spots.json")
    require_ledger(workflows_harness.app).wait(run_id, 30)
    other = write_recipe(tmp_path, "other.json", RECIPE)

    result = run_command("graph", other, "--run", run_id, "--broker", redis_url)

    assert result.returncode == 0, result.stderr
    assert f"warning: run {run_id} was started from 'spots.json', not '{other}'" in result.stderr


def test_merged_recipes_drawn_together() -> None:
    result = run_command(
        "graph", "pipethrough", "spot-finding", "--recipe-dir", str(REPOSITORY / "examples" / "recipes")
    )

    assert result.returncode == 0, result.stderr
    assert 'label="pipethrough + spot-finding"' in result.stdout
    # The second recipe's nodes come after the first one's four.
    assert "5: Find spots" in result.stdout
