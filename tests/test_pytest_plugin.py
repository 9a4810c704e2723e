"""The pytest fixtures of ``workflows_celery.pytest_plugin`` and the harness behind them.

The first tests use the fixtures as this suite enables them (tests/conftest.py).
The last ones run a small user project through pytester in a subprocess, once
beside pytest-celery's plugin and once without it.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from helpers import wait_for
from workflows.recipe.wrapper import RecipeWrapper

from workflows_celery import create_app, recipe_step
from workflows_celery.constants import EMBEDDED_BROKER_URL
from workflows_celery.testing import RunTimeoutError, WorkflowsHarness, embedded_harness

#: Queues of the step functions registered below; no other test uses them.
SPLIT_QUEUE = "tests.plugin.split"
COUNT_QUEUE = "tests.plugin.count"
SLOW_QUEUE = "tests.plugin.slow"
#: A queue that no hosted service reads, standing for a service outside the test.
OUTSIDE_QUEUE = "tests.plugin.outside"

#: Seconds a delayed checkpoint waits before it comes back.
CHECKPOINT_DELAY_S = 0.3
#: Seconds the slow run's delayed message waits; far longer than a quick run takes.
SLOW_DELAY_S = 4.0


def split(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    """Send one message per item to the ``item`` output."""
    for item in payload["items"]:
        rw.send_to("item", {"item": item})


def count(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    """Check in with a delay until the count reaches the node's ``until``, then send on."""
    reached = payload.get("count", 0) + 1
    if reached < rw.recipe_step["parameters"]["until"]:
        rw.checkpoint({"count": reached}, delay=CHECKPOINT_DELAY_S)
    else:
        rw.send({"count": reached})


def slow(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    """Send on after a long transport delay."""
    rw.send(payload, delay=SLOW_DELAY_S)


@pytest.fixture
def workflows_app(workflows_app: Celery) -> Celery:
    recipe_step(workflows_app, SPLIT_QUEUE)(split)
    recipe_step(workflows_app, COUNT_QUEUE)(count)
    recipe_step(workflows_app, SLOW_QUEUE)(slow)
    return workflows_app


def node(queue: str, **fields: Any) -> dict[str, Any]:
    return {"service": queue.rsplit(".", 1)[-1], "queue": queue, **fields}


@pytest.mark.workflows_services("SamplePipethrough")
def test_harness_records_what_each_step_sent(workflows_harness: WorkflowsHarness) -> None:
    recipe = {
        "1": node(SPLIT_QUEUE, output={"item": 2}),
        "2": node("transient.destination", output=3),
        "3": node("{sink}"),
        "start": [[1, {"items": ["a", "b", "c"]}]],
    }
    run = workflows_harness.run(recipe, {"sink": OUTSIDE_QUEUE})

    assert run.nodes_run() == [1, 2, 2, 2]
    assert run.payloads_sent_by(None) == [{"items": ["a", "b", "c"]}]
    assert run.payloads_sent_by(1) == [{"item": "a"}, {"item": "b"}, {"item": "c"}]
    assert run.payloads_to(2) == run.payloads_sent_by(1)
    # SamplePipethrough sends a counter of its own instead of the payload.
    assert [message.node for message in run.sent_by(2)] == [3, 3, 3]
    assert run.payloads_to(3) == run.payloads_sent_by(2)
    assert [message.sender for message in workflows_harness.sent_to(OUTSIDE_QUEUE)] == [2, 2, 2]
    assert {step.run_id for step in run.steps} == {run.id}


def test_wait_covers_delayed_checkpoints(workflows_harness: WorkflowsHarness) -> None:
    recipe = {
        "1": node(COUNT_QUEUE, parameters={"until": 3}, output=2),
        "2": node(OUTSIDE_QUEUE),
        "start": [[1, {}]],
    }
    run = workflows_harness.run(recipe)

    assert run.nodes_run() == [1, 1, 1]
    assert [message.sender for message in run.sent] == [None, 1, 1, 1]
    assert run.payloads_to(2) == [{"count": 3}]


def test_wait_follows_one_run_only(workflows_harness: WorkflowsHarness) -> None:
    slow_recipe = {"1": node(SLOW_QUEUE, output=2), "2": node(SPLIT_QUEUE), "start": [[1, {"items": []}]]}
    quick_recipe = {"1": node(SPLIT_QUEUE), "start": [[1, {"items": ["x"]}]]}
    slow_run = workflows_harness.start(slow_recipe)
    quick_run = workflows_harness.run(quick_recipe)

    assert quick_run.nodes_run() == [1]
    # The slow run's second step waits out its delay, far longer than the quick run took.
    assert 2 not in slow_run.nodes_run()
    assert slow_run.wait().nodes_run() == [1, 2]


def test_timeout_names_the_run(workflows_harness: WorkflowsHarness) -> None:
    recipe = {"1": node(SLOW_QUEUE, output=2), "2": node(SPLIT_QUEUE), "start": [[1, {"items": []}]]}
    run = workflows_harness.start(recipe)

    with pytest.raises(RunTimeoutError, match=rf"run {run.id} still had 1 message\(s\) in flight"):
        run.wait(timeout_s=0.5)
    run.wait()


@pytest.mark.workflows_services("SamplePipethrough")
def test_send_reaches_a_service_without_recipe(workflows_harness: WorkflowsHarness) -> None:
    workflows_harness.send("transient.destination", {"plain": True})
    workflows_harness.wait_until_idle()

    sent = workflows_harness.sent_to("transient.destination")
    assert [(message.payload, message.run_id, message.sender) for message in sent] == [
        ({"plain": True}, None, None)
    ]
    # SamplePipethrough takes recipe messages only, so the plain one is dead-lettered.
    assert workflows_harness.dead_lettered == {"transient.destination": 1}


def test_leftovers_do_not_reach_the_next_harness() -> None:
    unread = "tests.plugin.unread"
    recipe = {"1": node(SPLIT_QUEUE, output={"item": 2}), "2": node(unread), "start": [[1, {"items": [1]}]]}
    first_app = create_app(EMBEDDED_BROKER_URL, main="tests.plugin.first")
    recipe_step(first_app, SPLIT_QUEUE)(split)
    with embedded_harness([], app=first_app) as first:
        assert first.run(recipe).payloads_to(2) == [{"item": 1}]

    seen: list[Any] = []

    def take(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
        seen.append(payload)

    second_app = create_app(EMBEDDED_BROKER_URL, main="tests.plugin.second")
    recipe_step(second_app, unread, name="Late reader")(take)
    with embedded_harness([], app=second_app) as second:
        second.run({"1": node(unread), "start": [[1, {"fresh": True}]]})
    assert seen == [{"fresh": True}]


def test_status_heartbeats_belong_to_no_run(workflows_harness: WorkflowsHarness) -> None:
    run = workflows_harness.run({"1": node(SPLIT_QUEUE), "start": [[1, {"items": []}]]})
    assert wait_for(lambda: workflows_harness.sent_to("transient.status", topic=True))
    statuses = workflows_harness.sent_to("transient.status", topic=True)
    assert all(message.run_id is None for message in statuses)
    assert all(message.run_id == run.id for message in run.sent)


# -- A user project, run through pytester ------------------------------------------------

USER_CONFTEST = """
pytest_plugins = ["workflows_celery.pytest_plugin"]
"""

USER_TESTS = """
import pytest
from workflows_celery import create_app, recipe_step
from workflows_celery.constants import EMBEDDED_BROKER_URL

RECIPE = {
    "1": {"service": "Pipethrough", "queue": "transient.destination", "output": 2},
    "2": {"service": "Tag", "queue": "user.tag", "output": 3},
    "3": {"service": "Results", "queue": "user.results.{beamline}"},
    "start": [[1, {"image": "x_0001.cbf"}]],
}


@pytest.fixture
def workflows_app(workflows_app):
    @recipe_step(workflows_app, "user.tag")
    def tag(rw, header, payload):
        rw.send({"tagged": rw.recipe_step["service"]})

    return workflows_app


@pytest.mark.workflows_services("SamplePipethrough")
def test_pipeline(workflows_harness):
    run = workflows_harness.run(RECIPE, {"beamline": "i03"})
    assert run.nodes_run() == [1, 2]
    assert run.payloads_sent_by(2) == [{"tagged": "Tag"}]
    assert workflows_harness.sent_to("user.results.i03")[0].run_id == run.id


def test_no_services(workflows_services, workflows_harness):
    assert workflows_services == []
    run = workflows_harness.run({"1": {"queue": "user.tag"}, "start": [[1, {}]]})
    assert run.nodes_run() == [1]
"""


def _user_project(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)


def test_user_project_beside_pytest_celery(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_celery")
    _user_project(pytester)
    result = pytester.runpytest_subprocess("-p", "celery", "--fixtures")
    # pytest-celery's plugin is active: its fixtures are listed next to these.
    result.stdout.fnmatch_lines(["*celery_setup*", "*workflows_harness*"])
    result = pytester.runpytest_subprocess("-p", "celery")
    result.assert_outcomes(passed=2)


def test_user_project_without_pytest_celery(pytester: pytest.Pytester) -> None:
    _user_project(pytester)
    result = pytester.runpytest_subprocess("-p", "no:celery", "--fixtures")
    assert "celery_setup" not in result.stdout.str()
    result = pytester.runpytest_subprocess("-p", "no:celery")
    result.assert_outcomes(passed=2)
