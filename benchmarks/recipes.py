"""Recipes of the benchmark: a linear pipeline, a fan-out, and filler nodes.

Every node reads the benchmark queue, so one service serves every step, as
the three tasks of the Celery chain share one queue. The node numbers follow
the messages: 1 first, the node with ``last`` at the end.
"""

from __future__ import annotations

from typing import Any

#: Service name written into every benchmark node.
SERVICE_NAME = "Benchmark step"
#: Queue of the filler nodes, which no message reaches.
FILLER_QUEUE = "benchmark.filler"


def linear_recipe(queue: str, payload: Any, *, nodes: int = 3, total_nodes: int = 0) -> dict[str, Any]:
    """Return a recipe of ``nodes`` steps in a line, started with ``payload``.

    ``total_nodes`` (when larger than ``nodes``) pads the recipe with filler
    nodes that no message reaches, so that every message carries a recipe of
    that many nodes while the path stays the same.
    """
    recipe: dict[str, Any] = {}
    for number in range(1, nodes + 1):
        node: dict[str, Any] = {"service": SERVICE_NAME, "queue": queue}
        if number < nodes:
            node["output"] = [number + 1]
        else:
            node["parameters"] = {"last": True}
            if total_nodes > nodes:
                # workflows rejects unreferenced nodes; the last step sends nothing.
                node["output"] = {"filler": [nodes + 1]}
        recipe[str(number)] = node
    recipe.update(_filler_nodes(nodes + 1, total_nodes))
    recipe["start"] = [[1, payload]]
    return recipe


def fanout_recipe(queue: str, payload: Any, fanout: int) -> dict[str, Any]:
    """Return a recipe whose first step sends ``fanout`` messages to its second, the last."""
    return {
        "1": {"service": SERVICE_NAME, "queue": queue, "parameters": {"fanout": fanout}, "output": [2]},
        "2": {"service": SERVICE_NAME, "queue": queue, "parameters": {"last": True}},
        "start": [[1, payload]],
    }


def _filler_nodes(first: int, total_nodes: int) -> dict[str, Any]:
    """Return nodes ``first`` to ``total_nodes``, shaped like nodes of real recipes."""
    nodes: dict[str, Any] = {}
    for number in range(first, total_nodes + 1):
        nodes[str(number)] = {
            "service": "Filler step",
            "queue": FILLER_QUEUE,
            "parameters": {
                "dcid": "{ispyb_dcid}",
                "image": f"/dls/i04/data/2026/cm12345-1/sample_{number}/image_00001.cbf",
                "program": "xia2",
            },
            "output": {"success": [number + 1] if number < total_nodes else []},
        }
    return nodes
