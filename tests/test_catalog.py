"""Named recipes, Zocalo-format start requests, the dispatcher service and the spool."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from workflows.recipe.wrapper import RecipeWrapper

from workflows_celery import create_app, dlq, recipe_step
from workflows_celery.canvas import check_run_id
from workflows_celery.catalog import (
    StartRequest,
    build_recipe,
    named_recipe_path,
    recipe_folder,
)
from workflows_celery.constants import DISPATCHER_QUEUE, SETTING_RECIPE_DIR
from workflows_celery.dispatcher import RecipeDispatcher
from workflows_celery.errors import (
    InvalidRecipeError,
    InvalidRunIdError,
    InvalidStartRequestError,
    RecipeNotFoundError,
    TransportNotConnectedError,
)
from workflows_celery.services import load_service
from workflows_celery.spool import (
    REJECTED_FOLDER,
    SpooledRun,
    pick_up,
    spool_run,
    spooled_files,
)
from workflows_celery.testing import Run, WorkflowsHarness

#: Queues of the step functions that the named recipes below use.
FIND_QUEUE = "tests.catalog.find"
STORE_QUEUE = "tests.catalog.store"

FIND_SPOTS = {
    "1": {"service": "Find", "queue": FIND_QUEUE, "parameters": {"image": "{image}"}, "output": 2},
    "2": {"service": "Store", "queue": "{results}"},
    "start": [[1, {"dcid": "{ispyb_dcid}"}]],
}
NOTIFY = {
    "1": {"service": "Store", "queue": STORE_QUEUE, "parameters": {"run": "{uuid}"}},
    "start": [[1, {"note": "started"}]],
}


def find(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    rw.send({"image": rw.recipe_step["parameters"]["image"], "dcid": payload["dcid"]})


def store(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    rw.send({"stored": payload, "run": rw.recipe_step["parameters"]["run"]})


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "find-spots.json").write_text(json.dumps(FIND_SPOTS))
    (folder / "notify.json").write_text(json.dumps(NOTIFY))
    (folder / "broken.json").write_text('{"1": {"queue": "x", "output": 5}, "start": [[1, {}]]}')
    (tmp_path / "outside.json").write_text(json.dumps(NOTIFY))
    return folder


@pytest.fixture
def workflows_app(workflows_app: Celery, recipes: Path) -> Celery:
    workflows_app.conf[SETTING_RECIPE_DIR] = str(recipes)
    recipe_step(workflows_app, FIND_QUEUE)(find)
    recipe_step(workflows_app, STORE_QUEUE)(store)
    return workflows_app


# -- Named recipes and merging -------------------------------------------------------


def test_named_recipe_found_by_name(recipes: Path) -> None:
    assert named_recipe_path(recipes, "notify") == recipes / "notify.json"


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", ".hidden", "sub/notify", ""])
def test_recipe_name_cannot_leave_folder(recipes: Path, name: str) -> None:
    with pytest.raises(RecipeNotFoundError, match="Invalid recipe name"):
        named_recipe_path(recipes, name)


def test_unknown_recipe_lists_known_names(recipes: Path) -> None:
    with pytest.raises(RecipeNotFoundError, match="'spots' not found") as caught:
        named_recipe_path(recipes, "spots")
    assert "it has: broken, find-spots, notify" in str(caught.value)


def test_recipe_folder_from_setting_then_environment(
    recipes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app("memory://localhost/", main="tests.catalog.folder")
    monkeypatch.delenv("WORKFLOWS_CELERY_RECIPE_DIR", raising=False)
    assert recipe_folder(app) is None
    monkeypatch.setenv("WORKFLOWS_CELERY_RECIPE_DIR", "/srv/recipes")
    assert recipe_folder(app) == Path("/srv/recipes")
    app.conf[SETTING_RECIPE_DIR] = str(recipes)
    assert recipe_folder(app) == recipes
    assert recipe_folder(app, "/other") == Path("/other")


def test_merged_recipes_start_together(recipes: Path) -> None:
    request = StartRequest(
        recipes=["find-spots", "notify"],
        parameters={"image": "x_0001.cbf", "results": "results.i03", "ispyb_dcid": 1234},
        custom_recipe={"1": {"queue": "custom.{ispyb_dcid}"}, "start": [[1, {}]]},
    )
    run_id, recipe = build_recipe(request, recipes)

    queues = sorted(node["queue"] for key, node in recipe.recipe.items() if isinstance(key, int))
    assert queues == ["custom.1234", "results.i03", FIND_QUEUE, STORE_QUEUE]
    assert len(recipe["start"]) == 3
    # The run ID is the uuid parameter, which the recipes can use.
    assert any(node.get("parameters") == {"run": run_id} for node in recipe.recipe.values() if isinstance(node, dict))


def test_uuid_parameter_becomes_run_id(recipes: Path) -> None:
    run_id, _ = build_recipe(StartRequest(["notify"], {"uuid": "run-1234"}), recipes)
    assert run_id == "run-1234"


def test_invalid_part_named_in_error(recipes: Path) -> None:
    with pytest.raises(InvalidRecipeError, match=r"\(in broken\)"):
        build_recipe(StartRequest(["notify", "broken"]), recipes)


def test_unfilled_placeholder_names_request(recipes: Path) -> None:
    with pytest.raises(InvalidRecipeError, match=r"unresolved placeholder in .*'\{results\}' \(in find-spots\)"):
        build_recipe(StartRequest(["find-spots"], {"image": "x", "ispyb_dcid": 1}), recipes)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ([], "expected a JSON object"),
        ({"recipes": ["a"], "extra": 1}, "unknown field"),
        ({"recipes": [1]}, "'recipes' must be a list of recipe names"),
        ({"recipes": ["a"], "parameters": [1]}, "'parameters' must be an object"),
        ({"recipes": ["a"], "custom_recipe": "x"}, "'custom_recipe' must be a recipe object"),
        ({"parameters": {}}, "names no recipe"),
    ],
)
def test_malformed_request_rejected(message: Any, expected: str) -> None:
    with pytest.raises(InvalidStartRequestError, match=expected):
        StartRequest.from_message(message)


def test_request_round_trips_zocalo_format() -> None:
    message = {"recipes": ["a", "b"], "parameters": {"x": 1}, "custom_recipe": {"start": []}}
    assert StartRequest.from_message(message).to_message() == message
    assert StartRequest.from_message({"recipes": "a"}).recipes == ["a"]


# -- The dispatcher service ----------------------------------------------------------


def test_dispatcher_found_by_service_name() -> None:
    assert load_service("RecipeDispatcher") is RecipeDispatcher


@pytest.mark.workflows_services("RecipeDispatcher")
def test_dispatcher_starts_zocalo_request(workflows_harness: WorkflowsHarness) -> None:
    workflows_harness.send(
        DISPATCHER_QUEUE,
        {
            "recipes": ["find-spots", "notify"],
            "parameters": {"image": "x_0001.cbf", "results": "tests.catalog.results", "ispyb_dcid": 7},
        },
    )
    workflows_harness.wait_until_idle()

    started = {message.run_id for message in workflows_harness.sent if message.run_id}
    assert len(started) == 1
    run = Run(workflows_harness, started.pop())
    assert sorted(step.service for step in run.steps) == ["Find", "Store"]
    assert run.payloads_sent_by(None) == [{"dcid": "7"}, {"note": "started"}]
    results = workflows_harness.sent_to("tests.catalog.results")
    assert [message.payload for message in results] == [{"image": "x_0001.cbf", "dcid": "7"}]
    assert workflows_harness.dead_lettered == {}


@pytest.mark.workflows_services("workflows_celery.dispatcher:RecipeDispatcher")
@pytest.mark.parametrize(
    ("request_message", "error"),
    [
        ({"recipes": ["no-such-recipe"]}, "Recipe 'no-such-recipe' not found"),
        ({"recipes": ["broken"]}, "(in broken)"),
        ({"recipe": ["notify"]}, "unknown field(s) 'recipe'"),
        ("not a request", "expected a JSON object"),
    ],
    ids=["unknown", "invalid", "misspelt-field", "not-an-object"],
)
def test_dispatcher_dead_letters_bad_request(
    workflows_harness: WorkflowsHarness, request_message: Any, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    workflows_harness.send(DISPATCHER_QUEUE, request_message)
    workflows_harness.wait_until_idle()

    assert workflows_harness.dead_lettered == {DISPATCHER_QUEUE: 1}
    assert [message.run_id for message in workflows_harness.sent if message.run_id] == []
    assert "Rejected start request" in caplog.text
    letters = dlq.read(workflows_harness.app, DISPATCHER_QUEUE)
    assert [letter.message for letter in letters] == [request_message]
    assert letters[0].error is not None
    assert error in letters[0].error


# -- The spool -----------------------------------------------------------------------


def test_spool_file_private_and_ordered(tmp_path: Path, recipes: Path) -> None:
    spool = tmp_path / "spool"
    first_id, first = build_recipe(StartRequest(["notify"]), recipes)
    second_id, second = build_recipe(StartRequest(["notify"]), recipes)
    first_path = spool_run(spool, first_id, first, "notify")
    second_path = spool_run(spool, second_id, second, "notify")

    assert spooled_files(spool) == [first_path, second_path]
    assert stat.S_IMODE(os.stat(first_path).st_mode) == 0o600
    assert SpooledRun.read(first_path).run_id == first_id


def test_pickup_starts_oldest_first(
    tmp_path: Path, recipes: Path, workflows_harness: WorkflowsHarness
) -> None:
    spool = tmp_path / "spool"
    run_ids = []
    for note in ("first", "second"):
        run_id, recipe = build_recipe(StartRequest(["notify"], {"note": note}), recipes)
        spool_run(spool, run_id, recipe, "notify")
        run_ids.append(run_id)
    (spool / "garbage.json").write_text("not json")

    outcomes = list(pick_up(spool, workflows_harness.app))
    workflows_harness.wait_until_idle()

    assert [kind for kind, _ in outcomes] == ["started", "started", "rejected"]
    assert [outcome.run_id for kind, outcome in outcomes if kind == "started"] == run_ids
    assert spooled_files(spool) == []
    assert (spool / REJECTED_FOLDER / "garbage.json").is_file()
    started_runs = [message.run_id for message in workflows_harness.sent if message.node is not None]
    assert started_runs == run_ids


def test_pickup_stops_when_broker_unreachable(tmp_path: Path, recipes: Path) -> None:
    spool = tmp_path / "spool"
    run_id, recipe = build_recipe(StartRequest(["notify"]), recipes)
    path = spool_run(spool, run_id, recipe, "notify")
    app = create_app("redis://127.0.0.1:1/0", main="tests.catalog.unreachable")

    with pytest.raises(TransportNotConnectedError):
        list(pick_up(spool, app))
    assert spooled_files(spool) == [path]


@pytest.mark.parametrize("run_id", ["run/one", "../x", " ", "a b", "x" * 129])
def test_unusable_run_id_rejected(recipes: Path, run_id: str) -> None:
    with pytest.raises(InvalidRunIdError, match="Invalid run ID"):
        build_recipe(StartRequest(["notify"], {"uuid": run_id}), recipes)


def test_whole_number_run_id_accepted() -> None:
    check_run_id(1234)
    with pytest.raises(InvalidRunIdError):
        check_run_id(True)
