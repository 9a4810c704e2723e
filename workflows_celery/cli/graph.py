"""``workflows-celery graph``: draw a recipe, or a run of it, as a picture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from workflows_celery.cli.common import add_broker_option, add_recipe_options, broker_app
from workflows_celery.cli.run import build_run
from workflows_celery.errors import ConfigurationError
from workflows_celery.graph import DOT_FORMATS, RENDERED_FORMATS, recipe_dot, render


def add_commands(commands: Any) -> None:
    """Add the ``graph`` command."""
    graph = commands.add_parser(
        "graph",
        help="draw a recipe as SVG, PNG or DOT text",
        description=(
            "Draw a recipe: nodes with their service and queue or topic, edges with "
            "their output names. With --run, edges show the messages of that run and "
            "nodes its outcomes, from the run ledger. The format follows the output "
            "file's suffix (.svg, .png, .dot or .gv); without --output, DOT text goes "
            "to standard output. SVG and PNG need Graphviz's 'dot' program."
        ),
    )
    add_recipe_options(
        graph,
        "recipe JSON file, or name of a recipe in the recipe folder; several are merged as 'run' merges them",
        "recipe parameter, as for 'run'; placeholders without one are drawn as they are",
    )
    graph.add_argument("-o", "--output", type=Path, metavar="FILE", help="picture to write")
    graph.add_argument("--run", metavar="ID", help="draw this run's message counts and node outcomes")
    add_broker_option(graph, "Celery broker URL, to find the run ledger for --run (default: CELERY_BROKER_URL)")
    graph.set_defaults(handler=command_graph)


def command_graph(args: argparse.Namespace) -> int:
    """Write the recipe's picture."""
    from workflows_celery.ledger import require_ledger

    output_format = "dot"
    if args.output is not None:
        output_format = args.output.suffix.lstrip(".").lower()
        if output_format not in DOT_FORMATS and output_format not in RENDERED_FORMATS:
            raise ConfigurationError(
                f"Cannot tell the picture format of {str(args.output)!r}: end the file name "
                "in .svg, .png, .dot or .gv"
            )
    _, recipe, name = build_run(args, allow_unresolved=True)
    run = require_ledger(broker_app(args)).get(args.run) if args.run else None
    if run is not None and run.origin not in (name, "recipe"):
        print(
            f"warning: run {run.run_id} was started from {run.origin!r}, not {name!r}; "
            "its counts are drawn on the recipe given here",
            file=sys.stderr,
        )
    title = name if run is None else f"{name}: run {run.run_id} ({run.state})"
    dot_text = recipe_dot(recipe, run, title=title)
    if args.output is None:
        sys.stdout.write(dot_text)
        return 0
    picture = dot_text.encode() if output_format in DOT_FORMATS else render(dot_text, output_format)
    try:
        args.output.write_bytes(picture)
    except OSError as error:
        raise ConfigurationError(
            f"Cannot write {str(args.output)!r}: {error.strerror}; check that its folder exists"
        ) from None
    print(f"Wrote {args.output}")
    return 0
