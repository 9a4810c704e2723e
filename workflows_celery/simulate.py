"""Stand-in services that walk any recipe without its real services.

Each stand-in forwards every payload it receives to all outputs of its node,
named and unnamed, so a run reaches every node the recipe's outputs connect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import workflows.recipe
from workflows.recipe import Recipe
from workflows.recipe.wrapper import RecipeWrapper
from workflows.services.common_service import CommonService

from workflows_celery.messages import Destination
from workflows_celery.services import transport_of


@dataclass(frozen=True)
class StepRecord:
    """One step a run took: which node ran, where its message came from."""

    node: int
    service: str
    destination: Destination
    recipe_path: tuple[int, ...]
    finished_at: float
    #: The run's ``environment["ID"]``, when the step's message carried one.
    run_id: str | None = None


def recipe_destinations(recipe: Recipe) -> set[Destination]:
    """Return every queue and topic a recipe's nodes send to."""
    found = set()
    for key, node in recipe.recipe.items():
        if isinstance(key, int) and isinstance(node, Mapping):
            if node.get("queue"):
                found.add(Destination(str(node["queue"])))
            if node.get("topic"):
                found.add(Destination(str(node["topic"]), is_topic=True))
    return found


def reachable_nodes(recipe: Recipe) -> set[int]:
    """Return the nodes reachable from ``start`` through outputs of any name."""
    pending = [int(node) for node, _ in recipe["start"]]
    seen: set[int] = set()
    while pending:
        node = pending.pop()
        if node in seen or node not in recipe.recipe:
            continue
        seen.add(node)
        pending.extend(_output_targets(recipe[node].get("output")))
    return seen


def _output_targets(output: Any) -> list[int]:
    if output is None:
        return []
    if isinstance(output, Mapping):
        return [target for value in output.values() for target in _output_targets(value)]
    if isinstance(output, (list, tuple)):
        return [int(target) for target in output]
    return [int(output)]


def make_stand_in(recipe: Recipe) -> type[CommonService]:
    """Build a service class that stands in for every service of ``recipe``."""
    destinations = sorted(recipe_destinations(recipe), key=lambda d: (d.is_topic, d.name))

    class StandIn(CommonService):
        _service_name = "Simulated services"
        _logger_name = "workflows.service.simulated"

        def initializing(self) -> None:
            for destination in destinations:
                subscribe = (
                    workflows.recipe.wrap_subscribe_broadcast
                    if destination.is_topic
                    else workflows.recipe.wrap_subscribe
                )
                subscribe(
                    transport_of(self),
                    destination.name,
                    self._make_callback(destination),
                    log_extender=self.extend_log,
                )

        def _make_callback(self, destination: Destination) -> Any:
            def forward(rw: RecipeWrapper, header: Mapping[str, Any], payload: Any) -> None:
                step = rw.recipe_step or {}
                output = step.get("output")
                if isinstance(output, Mapping):
                    for name in output:
                        rw.send_to(name, payload)
                elif output is not None:
                    rw.send(payload)

            return forward

    return StandIn


def format_tree(steps: list[StepRecord]) -> list[str]:
    """Draw the steps as a tree below ``start``, each step under the one that sent it.

    Steps with the same node and path are drawn once with a count.
    """
    counts: dict[tuple[int, ...], int] = {}
    info: dict[tuple[int, ...], StepRecord] = {}
    for step in steps:
        key = step.recipe_path + (step.node,)
        counts[key] = counts.get(key, 0) + 1
        info.setdefault(key, step)
    children: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for key in counts:
        children.setdefault(key[:-1], []).append(key)
    for siblings in children.values():
        siblings.sort()

    lines = ["start"]

    def draw(parent: tuple[int, ...], prefix: str) -> None:
        siblings = children.get(parent, [])
        for index, key in enumerate(siblings):
            last = index == len(siblings) - 1
            step = info[key]
            times = f"  x{counts[key]}" if counts[key] > 1 else ""
            lines.append(
                f"{prefix}{'└── ' if last else '├── '}{step.node}  {step.service}  "
                f"{step.destination.kind} {step.destination.name}  "
                f"path {list(step.recipe_path)}{times}"
            )
            draw(key, prefix + ("    " if last else "│   "))

    draw((), "")
    return lines
