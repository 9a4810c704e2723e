"""Recipes as pictures: Graphviz DOT text, rendered to SVG or PNG by Graphviz's ``dot``.

Each node shows its number, service and queue or topic; each edge its output
name. With a run from the ledger, edges also show how many messages crossed
them and nodes are coloured by what happened there. DOT text needs nothing
else; SVG and PNG need the ``dot`` program of Graphviz on the ``PATH``, as
Celery's own ``celery graph`` output does.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

from workflows.recipe import Recipe

from workflows_celery.errors import ConfigurationError
from workflows_celery.ledger import FAILED, RUNNING, RunRecord

#: Output formats and the ``dot -T`` format of each; DOT text is written as it is.
RENDERED_FORMATS = {"svg": "svg", "png": "png"}
DOT_FORMATS = frozenset({"dot", "gv"})

#: Seconds ``dot`` may take to draw a recipe.
DOT_TIMEOUT_S = 60.0

#: Fill colours of nodes in a run's picture.
COLOUR_DONE = "#c6efce"
COLOUR_FAILED = "#ffc7ce"
COLOUR_WAITING = "#ffeb9c"
COLOUR_NOT_REACHED = "#eeeeee"


def recipe_dot(recipe: Recipe, run: RunRecord | None = None, *, title: str | None = None) -> str:
    """Return the recipe as a Graphviz digraph, with a run's counts and states if given."""
    lines = [
        "digraph recipe {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    if title:
        lines.append(f"  label={_quote(title)}; labelloc=t;")
    lines.append('  start [shape=circle, label="start", fillcolor="#dddddd"];')
    outcomes = _node_outcomes(run) if run is not None else {}
    for number, node in _nodes(recipe):
        label = f"{number}: {node.get('service') or '(no service)'}"
        for kind in ("queue", "topic"):
            if node.get(kind):
                label += f"\n{kind} {node[kind]}"
        attributes = [f"label={_quote(label)}"]
        if run is not None:
            attributes.append(f"fillcolor={_quote(_colour(outcomes.get(number), run))}")
            summary = _outcome_summary(outcomes.get(number))
            if summary:
                attributes.append(f"xlabel={_quote(summary)}")
        if node.get("topic") and not node.get("queue"):
            attributes.append('shape=hexagon')
        lines.append(f"  n{number} [{', '.join(attributes)}];")

    counted = dict(run.edges) if run is not None else {}
    for sender, target, name in _edges(recipe):
        label = name or ""
        if run is not None:
            count = counted.pop((sender, target), 0)
            label = f"{label} ({count})" if label else f"({count})"
        source = "start" if sender is None else f"n{sender}"
        lines.append(f"  {source} -> n{target}" + (f" [label={_quote(label)}]" if label else "") + ";")
    # Messages the run sent along no output of the recipe: checkpoints return
    # to their own node, and a service may send to any node.
    for (extra_sender, extra_target), count in sorted(counted.items(), key=_edge_sort_key):
        source = "start" if extra_sender is None else f"n{extra_sender}"
        kind = "checkpoint" if extra_sender == extra_target else "sent"
        lines.append(f'  {source} -> n{extra_target} [style=dashed, label={_quote(f"{kind} ({count})")}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, output_format: str) -> bytes:
    """Draw DOT text as SVG or PNG with Graphviz's ``dot``.

    Raises:
        ConfigurationError: the format is unknown, ``dot`` is not installed,
            or it failed.
    """
    if output_format not in RENDERED_FORMATS:
        raise ConfigurationError(
            f"Unknown picture format {output_format!r}; use svg, png, or dot for DOT text"
        )
    program = shutil.which("dot")
    if program is None:
        raise ConfigurationError(
            f"Cannot draw {output_format.upper()}: Graphviz's 'dot' program is not on the PATH; "
            "install Graphviz (e.g. apt install graphviz) or write DOT text (a .dot file)"
        )
    result = subprocess.run(
        [program, f"-T{RENDERED_FORMATS[output_format]}"],
        input=dot_text.encode(),
        capture_output=True,
        timeout=DOT_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise ConfigurationError(
            f"Graphviz's dot failed with exit status {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout


def _nodes(recipe: Recipe) -> Iterator[tuple[int, Mapping[str, Any]]]:
    for key in sorted(key for key in recipe.recipe if isinstance(key, int)):
        node = recipe.recipe[key]
        if isinstance(node, Mapping):
            yield key, node


def _edges(recipe: Recipe) -> Iterator[tuple[int | None, int, str | None]]:
    """Yield (sender, target, output name) for ``start`` and every output."""
    for entry in recipe.recipe.get("start") or []:
        yield None, int(entry[0]), None
    for number, node in _nodes(recipe):
        output = node.get("output")
        if isinstance(output, Mapping):
            for name, targets in output.items():
                for target in _targets(targets):
                    yield number, target, str(name)
        else:
            for target in _targets(output):
                yield number, target, None


def _targets(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(item) for item in value]
    return [int(value)]


def _node_outcomes(run: RunRecord) -> dict[int, dict[str, int]]:
    found: dict[int, dict[str, int]] = {}
    for step in run.steps:
        if step.node is not None:
            counts = found.setdefault(step.node, {})
            counts[step.outcome] = counts.get(step.outcome, 0) + 1
    return found


def _colour(outcomes: dict[str, int] | None, run: RunRecord) -> str:
    if not outcomes:
        return COLOUR_WAITING if run.state == RUNNING and run.in_flight else COLOUR_NOT_REACHED
    if outcomes.get("dead-lettered") or (run.state == FAILED and not outcomes.get("done")):
        return COLOUR_FAILED
    return COLOUR_DONE


def _outcome_summary(outcomes: dict[str, int] | None) -> str:
    if not outcomes:
        return ""
    return ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))


def _edge_sort_key(item: tuple[tuple[int | None, int | None], int]) -> tuple[int, int]:
    (sender, target), _ = item
    return (-1 if sender is None else sender, -1 if target is None else target)


def _quote(text: str) -> str:
    """Quote a DOT string: backslashes and quotes escaped, line breaks as DOT's ``\\n``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
