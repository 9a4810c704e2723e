"""Recipe routing at run time, recipe canvases on real brokers, and recipe validation.

The routing tests run one embedded worker for the whole module. It hosts
``RecipeProbe``, a ``CommonService`` that records every message it receives and
then sends onwards as its node's ``parameters.action`` specifies. It also hosts
``relay``, a step function that records and forwards. Each test starts its own
run and reads the visits of that run ID only.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import workflows.recipe
from celery import Celery, group
from celery import current_app as celery_current_app
from workflows.recipe.wrapper import RecipeWrapper
from workflows.services.common_service import CommonService

from workflows_celery import (
    CeleryTransport,
    create_app,
    recipe_canvas,
    recipe_step,
    start_recipe,
)
from workflows_celery.constants import EMBEDDED_BROKER_URL
from workflows_celery.errors import InvalidRecipeError
from workflows_celery.recipes import load_recipe, prepare_recipe
from workflows_celery.application import default_app
from workflows_celery.canvas import current_workflows_app
from workflows_celery.testing import Run, WorkflowsHarness, embedded_harness

PROBE_QUEUE = "tests.recipes.probe"
PLACEHOLDER_QUEUE = "tests.recipes.filled-in"
RELAY_QUEUE = "tests.recipes.relay"
PROBE_TOPIC = "tests.recipes.broadcast"

#: Seconds a run in the embedded worker may take before a test fails.
RUN_TIMEOUT_S = 15.0


# -- Test services ------------------------------------------------------------------


@dataclass(frozen=True)
class Visit:
    """One message a test service received, as its recipe wrapper showed it."""

    node: int
    via: str
    payload: Any
    recipe_step: dict[str, Any]
    recipe_path: list[int]
    environment: dict[str, Any]
    at: float


class Journal:
    """Visits of the test services, grouped by run ID (``environment["ID"]``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._visits: dict[str, list[Visit]] = {}

    def record(self, rw: RecipeWrapper, payload: Any, via: str) -> None:
        visit = Visit(
            node=rw.recipe_pointer,
            via=via,
            payload=payload,
            recipe_step=json.loads(json.dumps(rw.recipe_step)),
            recipe_path=list(rw.recipe_path),
            environment=dict(rw.environment),
            at=time.monotonic(),
        )
        with self._lock:
            self._visits.setdefault(str(rw.environment.get("ID")), []).append(visit)

    def visits(self, run_id: str) -> list[Visit]:
        with self._lock:
            return sorted(self._visits.get(run_id, []), key=lambda visit: visit.at)


JOURNAL = Journal()


def act(rw: RecipeWrapper, payload: Any) -> None:
    """Send to the node's outputs as its ``parameters.action`` specifies (none: send nothing)."""
    parameters = rw.recipe_step.get("parameters") or {}
    action = parameters.get("action")
    if action == "send":
        rw.send(payload)
    elif action == "send_to":
        for output in parameters["outputs"]:
            rw.send_to(output, payload)
    elif action == "default_channel":
        rw.set_default_channel(parameters["channel"])
        rw.send(payload)
    elif action == "fan_out":
        for index in range(parameters["count"]):
            rw.send({"index": index})
    elif action == "checkpoint":
        done = payload.get("round", 0)
        if done < parameters["rounds"]:
            rw.checkpoint({"round": done + 1}, delay=parameters.get("delay", 0))
        else:
            rw.send(payload)


class RecipeProbe(CommonService):
    """Records every recipe message on its queues and topic, then acts on queue messages."""

    _service_name = "Recipe probe"
    _logger_name = "tests.recipe_probe"

    def initializing(self) -> None:
        for queue_name in (PROBE_QUEUE, PLACEHOLDER_QUEUE):
            workflows.recipe.wrap_subscribe(
                self._transport,
                queue_name,
                self.on_queue_message,
                acknowledgement=True,
                log_extender=self.extend_log,
            )
        workflows.recipe.wrap_subscribe_broadcast(
            self._transport, PROBE_TOPIC, self.on_broadcast, log_extender=self.extend_log
        )

    def on_queue_message(self, rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
        JOURNAL.record(rw, payload, via=f"queue {header['destination']}")
        act(rw, payload)
        self._transport.ack(header)

    def on_broadcast(self, rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
        JOURNAL.record(rw, payload, via=f"topic {header['destination']}")


def relay(rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None:
    """Record a message and forward it to all unnamed outputs."""
    JOURNAL.record(rw, payload, via=f"queue {header['destination']}")
    rw.send(payload)


@pytest.fixture(scope="module")
def embedded() -> Iterator[WorkflowsHarness]:
    """One embedded worker for the module, hosting ``RecipeProbe`` and ``relay``."""
    app = create_app(EMBEDDED_BROKER_URL, main="tests.test_recipes")
    recipe_step(app, RELAY_QUEUE, name="Relay")(relay)
    with embedded_harness([RecipeProbe], app=app) as harness:
        yield harness


def run(
    embedded: WorkflowsHarness,
    recipe: dict[str, Any],
    parameters: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
) -> list[Visit]:
    """Start a run, wait until none of its messages is in flight and return its visits."""
    run_environment = {"ID": str(uuid.uuid4()), **(environment or {})}
    finished = embedded.run(recipe, parameters, environment=run_environment, timeout_s=RUN_TIMEOUT_S)
    assert finished.id == run_environment["ID"]
    return JOURNAL.visits(finished.id)


def probe(**node: Any) -> dict[str, Any]:
    """Build a node for ``RecipeProbe``'s queue."""
    return {"service": "Recipe probe", "queue": PROBE_QUEUE, **node}


def nodes_of(visits: list[Visit]) -> list[int]:
    return sorted(visit.node for visit in visits)


# -- Routing through outputs --------------------------------------------------------


def test_named_output_reaches_only_its_node(embedded: Any) -> None:
    recipe = {
        "1": probe(
            parameters={"action": "send_to", "outputs": ["success"]},
            output={"success": 2, "failure": 3},
        ),
        "2": probe(),
        "3": probe(),
        "start": [[1, {"image": "x_0001.cbf"}]],
    }
    visits = run(embedded, recipe)

    assert nodes_of(visits) == [1, 2]
    assert visits[1].payload == {"image": "x_0001.cbf"}
    assert visits[1].recipe_path == [1]


def test_unconnected_output_name_dropped(embedded: Any, caplog: pytest.LogCaptureFixture) -> None:
    recipe = {
        "1": probe(
            parameters={"action": "send_to", "outputs": ["nothing-connected", "success"]},
            output={"success": 2},
        ),
        "2": probe(),
        "start": [[1, {}]],
    }
    visits = run(embedded, recipe)

    assert nodes_of(visits) == [1, 2]
    errors = [record for record in caplog.records if record.levelname in ("WARNING", "ERROR")]
    assert errors == []


def test_default_channel_makes_send_use_it(embedded: Any) -> None:
    recipe = {
        "1": probe(
            parameters={"action": "default_channel", "channel": "success"},
            output={"success": 2, "failure": 3},
        ),
        "2": probe(),
        "3": probe(),
        "start": [[1, {"n": 1}]],
    }
    visits = run(embedded, recipe)

    assert nodes_of(visits) == [1, 2]


def test_unnamed_output_list_sends_one_each(embedded: Any) -> None:
    recipe = {
        "1": probe(parameters={"action": "send"}, output=[2, 3, 4]),
        "2": probe(),
        "3": probe(),
        "4": probe(),
        "start": [[1, {"n": 1}]],
    }
    visits = run(embedded, recipe)

    assert nodes_of(visits) == [1, 2, 3, 4]
    assert all(visit.payload == {"n": 1} for visit in visits)


def test_dynamic_fan_out_sends_n_messages(embedded: Any) -> None:
    recipe = {
        "1": probe(parameters={"action": "fan_out", "count": 5}, output=2),
        "2": probe(),
        "start": [[1, {}]],
    }
    visits = run(embedded, recipe)

    fanned_out = [visit for visit in visits if visit.node == 2]
    assert sorted(visit.payload["index"] for visit in fanned_out) == [0, 1, 2, 3, 4]
    assert all(visit.recipe_path == [1] for visit in fanned_out)


def test_fan_in_runs_once_per_message(embedded: Any) -> None:
    relay_node = {"service": "Relay", "queue": RELAY_QUEUE}
    recipe = {
        "1": probe(parameters={"action": "send"}, output=[2, 3]),
        "2": {**relay_node, "output": 4},
        "3": {**relay_node, "output": 4},
        "4": probe(),
        "start": [[1, {"n": 1}]],
    }
    visits = run(embedded, recipe)

    joined = [visit for visit in visits if visit.node == 4]
    assert len(joined) == 2
    assert sorted(visit.recipe_path for visit in joined) == [[1, 2], [1, 3]]
    relayed = [visit for visit in visits if visit.node in (2, 3)]
    assert {visit.via for visit in relayed} == {f"queue {RELAY_QUEUE}"}


def test_topic_node_reaches_broadcast_subscriber(embedded: Any) -> None:
    recipe = {
        "1": probe(parameters={"action": "send"}, output=2),
        "2": {"service": "Recipe probe", "topic": PROBE_TOPIC},
        "start": [[1, {"n": 1}]],
    }
    visits = run(embedded, recipe)

    assert [(visit.node, visit.via) for visit in visits] == [
        (1, f"queue {PROBE_QUEUE}"),
        (2, f"topic {PROBE_TOPIC}"),
    ]


def test_delayed_topic_node_held(embedded: Any) -> None:
    recipe = {
        "1": probe(parameters={"action": "send"}, output=2),
        "2": {"service": "Recipe probe", "topic": PROBE_TOPIC, "transport-delay": 0.4},
        "start": [[1, {}]],
    }
    visits = run(embedded, recipe)

    assert [visit.via for visit in visits] == [f"queue {PROBE_QUEUE}", f"topic {PROBE_TOPIC}"]
    assert visits[1].at - visits[0].at >= 0.4


def test_node_with_queue_and_topic_gets_both(embedded: Any) -> None:
    recipe = {
        "1": probe(topic=PROBE_TOPIC),
        "start": [[1, {"n": 1}]],
    }
    visits = run(embedded, recipe)

    assert sorted(visit.via for visit in visits) == [
        f"queue {PROBE_QUEUE}",
        f"topic {PROBE_TOPIC}",
    ]
    assert all(visit.node == 1 for visit in visits)


def test_transport_delay_holds_next_step(embedded: Any) -> None:
    recipe = {
        "1": probe(parameters={"action": "send"}, output=2),
        "2": probe(**{"transport-delay": 0.7}),
        "start": [[1, {}]],
    }
    visits = run(embedded, recipe)

    assert nodes_of(visits) == [1, 2]
    waited_s = visits[1].at - visits[0].at
    assert waited_s >= 0.7
    assert waited_s < 5.0


@pytest.mark.parametrize("delay_s", [0, 0.3])
def test_checkpoint_returns_to_same_node(embedded: Any, delay_s: float) -> None:
    recipe = {
        "1": probe(parameters={"action": "send"}, output=2),
        "2": probe(parameters={"action": "checkpoint", "rounds": 2, "delay": delay_s}, output=3),
        "3": probe(),
        "start": [[1, {}]],
    }
    visits = run(embedded, recipe)

    checkpointed = [visit for visit in visits if visit.node == 2]
    assert [visit.payload.get("round", 0) for visit in checkpointed] == [0, 1, 2]
    assert all(visit.recipe_path == [1] for visit in checkpointed)
    assert [(visit.node, visit.recipe_path) for visit in visits if visit.node == 3] == [(3, [1, 2])]
    gaps_s = [later.at - earlier.at for earlier, later in zip(checkpointed, checkpointed[1:])]
    assert all(gap >= delay_s for gap in gaps_s), gaps_s


# -- Parameters, node keys, environment and path ------------------------------------


def test_queue_placeholder_filled_by_parameters(embedded: Any) -> None:
    recipe = {
        "1": {"service": "Recipe probe", "queue": "tests.recipes.{which}"},
        "start": [[1, {}]],
    }
    visits = run(embedded, recipe, parameters={"which": "filled-in"})

    assert [visit.via for visit in visits] == [f"queue {PLACEHOLDER_QUEUE}"]
    assert visits[0].recipe_step["queue"] == PLACEHOLDER_QUEUE


def test_replace_inserts_structure(embedded: Any) -> None:
    settings = {"resolution": [1.5, 2.0], "mode": {"fast": True}, "label": None}
    recipe = {
        "1": probe(parameters={"settings": "{$REPLACE:settings}", "dcid": "{dcid}"}),
        "start": [[1, {}]],
    }
    visits = run(embedded, recipe, parameters={"settings": settings, "dcid": "1234"})

    assert visits[0].recipe_step["parameters"] == {"settings": settings, "dcid": "1234"}


def test_extra_node_keys_arrive_untouched(embedded: Any) -> None:
    node = probe(
        parameters={"dcid": 1234, "nested": {"list": [1, "two", {"three": 3.5}]}},
        job_parameters={"working_directory": "/dls/tmp/run", "timeout_s": 30},
        wrapper={"task_information": "i03"},
        **{"arbitrary-key": [True, None, {"deep": {"deeper": []}}]},
    )
    recipe = {"1": node, "start": [[1, {}]]}
    visits = run(embedded, recipe)

    assert visits[0].recipe_step == node


def test_environment_carried_to_every_step(embedded: Any) -> None:
    recipe = {
        "1": probe(parameters={"action": "send"}, output=2),
        "2": {"service": "Relay", "queue": RELAY_QUEUE, "output": 3},
        "3": probe(),
        "start": [[1, {}]],
    }
    environment = {"beamline": "i03", "nested": {"visit": "cm12345-1"}}
    visits = run(embedded, recipe, environment=environment)

    assert nodes_of(visits) == [1, 2, 3]
    for visit in visits:
        assert visit.environment == {"ID": visit.environment["ID"], **environment}


def test_recipe_path_grows_each_step(embedded: Any) -> None:
    recipe = {
        "1": probe(parameters={"action": "send"}, output=2),
        "2": {"service": "Relay", "queue": RELAY_QUEUE, "output": 3},
        "3": probe(parameters={"action": "send"}, output=4),
        "4": probe(),
        "start": [[1, {}]],
    }
    visits = run(embedded, recipe)

    assert [(visit.node, visit.recipe_path) for visit in visits] == [
        (1, []),
        (2, [1]),
        (3, [1, 2]),
        (4, [1, 2, 3]),
    ]


# -- Recipe canvases on real brokers ------------------------------------------------


@pytest.fixture
def queue_names(broker_app: Celery) -> Iterator[list[str]]:
    """Names of broker queues a test creates; they are deleted after the test."""
    names: list[str] = []
    yield names
    with broker_app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in names:
            channel.queue_delete(name)


def receive(
    transport: CeleryTransport, queue_name: str
) -> queue.Queue[tuple[float, dict[str, Any], Any]]:
    """Subscribe to a queue; each message arrives as (monotonic time, header, message)."""
    received: queue.Queue[tuple[float, dict[str, Any], Any]] = queue.Queue()
    transport.subscribe(
        queue_name, lambda header, message: received.put((time.monotonic(), header, message))
    )
    return received


def canvas_recipe(unique: str) -> dict[str, Any]:
    return {
        "1": {"service": "A", "queue": f"tests.canvas.{unique}.a", "output": 3},
        "2": {"service": "B", "queue": f"tests.canvas.{unique}.b", "transport-delay": 0.7},
        "3": {"service": "C", "queue": f"tests.canvas.{unique}.c"},
        "start": [[1, {"first": 1}], [2, {"second": 2}]],
    }


def test_canvas_signatures_routed_explicitly(broker_app: Celery, unique: str) -> None:
    canvas = recipe_canvas(canvas_recipe(unique), environment={"ID": "run-1"}, app=broker_app)

    assert isinstance(canvas, group)
    assert len(canvas.tasks) == 2
    first, second = canvas.tasks
    assert first.options["queue"].name == f"tests.canvas.{unique}.a"
    assert second.options["queue"].name == f"tests.canvas.{unique}.b"
    assert "countdown" not in first.options
    assert second.options["countdown"] == 0.7
    assert first.kwargs["message"]["environment"] == {"ID": "run-1"}
    assert first.kwargs["message"]["recipe-pointer"] == 1
    assert second.kwargs["message"]["payload"] == {"second": 2}


def test_canvas_messages_land_in_queues(
    broker_app: Celery, unique: str, queue_names: list[str]
) -> None:
    recipe = canvas_recipe(unique)
    queue_names.extend(recipe[node]["queue"] for node in ("1", "2", "3"))
    run_id = f"run-{unique}"
    transport = CeleryTransport(broker_app)
    try:
        first = receive(transport, f"tests.canvas.{unique}.a")
        delayed = receive(transport, f"tests.canvas.{unique}.b")
        sent_at = time.monotonic()
        result = recipe_canvas(recipe, environment={"ID": run_id}, app=broker_app).apply_async()

        assert result.id == run_id
        _, header, message = first.get(timeout=10)
        assert header["workflows-recipe"] is True
        assert message["recipe-pointer"] == 1
        assert message["recipe-path"] == []
        assert message["payload"] == {"first": 1}
        assert message["environment"] == {"ID": run_id}

        received_at, _, message = delayed.get(timeout=10)
        assert message["recipe-pointer"] == 2
        assert message["environment"] == {"ID": run_id}
        assert received_at - sent_at >= 0.7
        assert first.empty()
        assert delayed.empty()
    finally:
        transport.disconnect()


def test_canvas_without_environment_gets_new_id(
    broker_app: Celery, unique: str, queue_names: list[str]
) -> None:
    recipe = {"1": {"service": "A", "queue": f"tests.canvas.{unique}.new"}, "start": [[1, {}]]}
    queue_names.append(f"tests.canvas.{unique}.new")
    transport = CeleryTransport(broker_app)
    try:
        received = receive(transport, f"tests.canvas.{unique}.new")
        first = recipe_canvas(recipe, app=broker_app).apply_async()
        second = recipe_canvas(recipe, app=broker_app).apply_async()

        assert str(uuid.UUID(first.id)) == first.id
        assert first.id != second.id
        run_ids = {received.get(timeout=10)[2]["environment"]["ID"] for _ in range(2)}
        assert run_ids == {first.id, second.id}
    finally:
        transport.disconnect()


def test_canvas_delayed_topic_reaches_subscriber(broker_app: Celery, unique: str) -> None:
    topic = f"tests.canvas.{unique}.topic"
    recipe = {
        "1": {"service": "A", "topic": topic, "transport-delay": 0.5},
        "2": {"service": "B", "topic": topic},
        "start": [[1, {"first": 1}], [2, {"second": 2}]],
    }
    transport = CeleryTransport(broker_app)
    received: queue.Queue[tuple[float, Any]] = queue.Queue()
    try:
        transport.subscribe_broadcast(
            topic, lambda header, message: received.put((time.monotonic(), message))
        )
        sent_at = time.monotonic()
        result = recipe_canvas(recipe, app=broker_app).apply_async()

        _, immediate = received.get(timeout=10)
        delayed_at, delayed = received.get(timeout=10)
        assert immediate["recipe-pointer"] == 2
        assert delayed["recipe-pointer"] == 1
        assert delayed["environment"]["ID"] == result.id
        assert delayed_at - sent_at >= 0.5
    finally:
        transport.disconnect()


SENDER_SCRIPT = textwrap.dedent(
    """
    import sys

    from workflows_celery import create_app, start_recipe

    broker_url, recipe_text, run_id, tests_folder = sys.argv[1:]
    app = create_app(broker_url)
    print(start_recipe(recipe_text, environment={"ID": run_id}, app=app))

    service_modules = sorted(
        name for name in sys.modules if name.startswith("workflows.services.sample_")
    )
    test_modules = sorted(
        name
        for name, module in list(sys.modules.items())
        if name == "conftest"
        or name.startswith(("tests.", "test_"))
        or (getattr(module, "__file__", None) or "").startswith(tests_folder)
    )
    assert not service_modules, f"service modules imported: {service_modules}"
    assert not test_modules, f"test modules imported: {test_modules}"
    """
)


def test_sender_imports_no_service_code(redis_url: str, unique: str) -> None:
    app = create_app(redis_url, main=f"tests.{unique}")
    queue_name = f"tests.sender.{unique}"
    recipe = {"1": {"service": "Message Pipethrough", "queue": queue_name}, "start": [[1, {"n": 1}]]}
    run_id = f"run-{unique}"
    transport = CeleryTransport(app)
    try:
        received = receive(transport, queue_name)
        sender = subprocess.run(
            [
                sys.executable,
                "-c",
                SENDER_SCRIPT,
                redis_url,
                json.dumps(recipe),
                run_id,
                str(Path(__file__).parent),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert sender.returncode == 0, sender.stderr
        assert sender.stdout.strip() == run_id
        _, header, message = received.get(timeout=10)
        assert header["workflows-recipe"] is True
        assert message["environment"]["ID"] == run_id
        assert message["payload"] == {"n": 1}
    finally:
        transport.disconnect()
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(queue_name)
        app.close()


# -- Validation ---------------------------------------------------------------------


INVALID_RECIPES = {
    "cycle": (
        {"1": {"queue": "a", "output": 2}, "2": {"queue": "b", "output": 1}, "start": [[1, {}]]},
        r"Recipe contains cycle \(\['start', 1, 2\] -> 1\)",
    ),
    "missing node": (
        {"1": {"queue": "a", "output": 3}, "start": [[1, {}]]},
        r'Node "3" is referenced via .* but missing',
    ),
    "unreferenced node": (
        {"1": {"queue": "a"}, "2": {"queue": "b"}, "start": [[1, {}]]},
        r'unreferenced node "2"',
    ),
    "non-numeric node": (
        {"1": {"queue": "a"}, "one": {"queue": "b"}, "start": [[1, {}]]},
        r'Node "one" is not numeric',
    ),
    "empty start": ({"1": {"queue": "a"}, "start": []}, r'"start" node empty'),
    "node not an object": (
        {"1": {"queue": "a", "output": 2}, "2": 5, "start": [[1, {}]]},
        r'Node "2" is a JSON int',
    ),
    "start not a list": ({"1": {"queue": "a"}, "start": 1}, r'"start" node is a JSON int'),
}


@pytest.mark.parametrize("case", sorted(INVALID_RECIPES))
def test_prepare_recipe_rejects_invalid_graph(case: str) -> None:
    recipe, problem = INVALID_RECIPES[case]

    with pytest.raises(InvalidRecipeError, match=f"^Invalid recipe: .*{problem}"):
        prepare_recipe(json.dumps(recipe))


def test_load_recipe_rejects_malformed_json(tmp_path: Any) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"1": {"queue": "a"}, "start": [[1, {}]]', encoding="utf-8")

    with pytest.raises(InvalidRecipeError, match="is not valid JSON") as raised:
        load_recipe(str(path))
    assert str(path) in str(raised.value)


def test_load_recipe_rejects_duplicate_keys() -> None:
    text = '{"1": {"queue": "a"}, "1": {"queue": "b"}, "start": [[1, {}]]}'

    with pytest.raises(InvalidRecipeError, match="key '1' appears twice"):
        load_recipe(text)


def test_load_recipe_rejects_missing_file(tmp_path: Any) -> None:
    path = tmp_path / "absent.json"

    with pytest.raises(InvalidRecipeError, match="cannot read"):
        load_recipe(path)


def test_prepare_recipe_rejects_unresolved_queue() -> None:
    recipe = {"1": {"queue": "results.{beamline}"}, "start": [[1, {}]]}

    with pytest.raises(InvalidRecipeError, match=r"node 1 queue 'results.\{beamline\}'"):
        prepare_recipe(recipe, {"other": "value"})
    assert prepare_recipe(recipe, {"beamline": "i03"})[1]["queue"] == "results.i03"
    assert prepare_recipe(recipe, allow_unresolved=True)[1]["queue"] == "results.{beamline}"


@pytest.mark.parametrize(
    ("queue", "parameters"),
    [
        ("results.{n:d}", {"n": "abc"}),
        ("results.{n.x}", {"n": "abc"}),
        ("results.{0}", {"n": "abc"}),
    ],
    ids=["format-mismatch", "attribute", "positional"],
)
def test_prepare_recipe_rejects_unfit_placeholder(queue: str, parameters: dict[str, Any]) -> None:
    recipe = {"1": {"queue": queue}, "start": [[1, {}]]}

    with pytest.raises(InvalidRecipeError, match="placeholder does not fit the parameters") as caught:
        prepare_recipe(recipe, parameters, origin="spots")
    assert "(in spots)" in str(caught.value)


def test_prepare_recipe_rejects_non_string_queue() -> None:
    recipe = {"1": {"queue": "{$REPLACE:n}"}, "start": [[1, {}]]}

    with pytest.raises(InvalidRecipeError, match=r'Node "1" queue is a JSON list \(\[1\]\)'):
        prepare_recipe(recipe, {"n": [1]})


def test_start_recipe_names_origin_in_errors(embedded: WorkflowsHarness) -> None:
    recipe = {"1": {"queue": "results.{beamline}"}, "start": [[1, {}]]}

    with pytest.raises(InvalidRecipeError, match=r"\(in spot-finding\)") as caught:
        start_recipe(recipe, app=embedded.app, origin="spot-finding")
    assert "--param" not in str(caught.value)


def test_start_recipe_uses_current_app(embedded: WorkflowsHarness) -> None:
    recipe = {"1": probe(), "start": [[1, {"image": "x_0001.cbf"}]]}
    previous = celery_current_app._get_current_object()
    embedded.app.set_current()
    try:
        run_id = start_recipe(recipe)
    finally:
        previous.set_current()

    run = Run(embedded, run_id).wait(RUN_TIMEOUT_S)
    assert run.nodes_run() == [1]


def test_start_recipe_skips_app_without_setup() -> None:
    plain = Celery("tests.plain", broker=EMBEDDED_BROKER_URL, set_as_current=False)
    previous = celery_current_app._get_current_object()
    plain.set_current()
    try:
        chosen = current_workflows_app()
    finally:
        previous.set_current()
    assert chosen is default_app()


def test_recipe_file_errors_name_origin_only(tmp_path: Any) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")

    for source in (broken, tmp_path / "absent.json"):
        with pytest.raises(InvalidRecipeError) as caught:
            prepare_recipe(source, origin="spots")
        assert "spots" in str(caught.value)
        assert str(tmp_path) not in str(caught.value)


def test_start_recipe_sends_nothing_for_invalid(embedded: WorkflowsHarness) -> None:
    sent_before = len(embedded.sent)
    recipe = {"1": probe(output=2), "start": [[1, {}]]}

    with pytest.raises(InvalidRecipeError, match='Node "2"'):
        start_recipe(recipe, app=embedded.app)
    assert len(embedded.sent) == sent_before
