"""``workflows-celery graph``: draw a recipe, or a run of it, as a picture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from workflows_celery.catalog import StartRequest, build_recipe, is_recipe_name, recipe_folder
from workflows_celery.cli.common import add_broker_option, broker_app, parse_parameter
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
    graph.add_argument("recipe", metavar="RECIPE", help="recipe JSON file, or name of a recipe in the recipe folder")
    graph.add_argument("-o", "--output", type=Path, metavar="FILE", help="picture to write")
    graph.add_argument(
        "-p",
        "--param",
        dest="parameters",
        action="append",
        type=parse_parameter,
        default=[],
        metavar="KEY=VALUE",
        help="recipe parameter, as for 'run'; placeholders without one are drawn as they are",
    )
    graph.add_argument("--recipe-dir", metavar="DIR", help="folder of named recipes (default: WORKFLOWS_CELERY_RECIPE_DIR)")
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
    name = args.recipe
    as_name = is_recipe_name(name) and not Path(name).is_file()
    request = StartRequest(recipes=[name] if as_name else [], parameters=dict(args.parameters))
    files = [] if as_name else [Path(name)]
    _, recipe = build_recipe(request, recipe_folder(folder=args.recipe_dir), files=files, allow_unresolved=True)

    run = require_ledger(broker_app(args)).get(args.run) if args.run else None
    title = name if run is None else f"{name}: run {run.run_id} ({run.state})"
    dot_text = recipe_dot(recipe, run, title=title)
    if args.output is None:
        sys.stdout.write(dot_text)
        return 0
    if output_format in DOT_FORMATS:
        args.output.write_text(dot_text, encoding="utf-8")
    else:
        args.output.write_bytes(render(dot_text, output_format))
    print(f"Wrote {args.output}")
    return 0
