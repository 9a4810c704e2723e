"""``workflows-celery run``, ``pickup`` and ``validate``: start recipes and check them.

``run`` takes recipe files and names of recipes in the recipe folder, merges
them as Zocalo's dispatcher does, applies the parameters, and either sends the
run to a broker (``--broker``) or runs it here on the embedded broker. When
the broker cannot be reached, the run is spooled and ``pickup`` sends it later.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from workflows.recipe import Recipe
from workflows.services.common_service import CommonService

from workflows_celery.catalog import StartRequest, build_recipe, is_recipe_name, recipe_folder
from workflows_celery.cli.common import add_broker_option, add_recipe_options, broker_app
from workflows_celery.constants import EMBEDDED_BROKER_URL
from workflows_celery.errors import TransportNotConnectedError, WorkflowsCeleryError
from workflows_celery.recipes import load_recipe, unresolved_destinations, validate_recipe
from workflows_celery.redaction import mask_url

logger = logging.getLogger(__name__)

#: Seconds an embedded run may take before ``run`` gives up waiting.
DEFAULT_RUN_TIMEOUT_S = 300.0

#: Exit status when the broker is unreachable and the run waits in the spool
#: (``EX_TEMPFAIL`` of sysexits.h: try again later).
EXIT_SPOOLED = 75


def add_commands(commands: Any) -> None:
    """Add the ``run``, ``pickup`` and ``validate`` commands."""
    run = commands.add_parser(
        "run",
        help="start a recipe",
        description=(
            "Start a run of one or more recipes, merged into one: recipe JSON files "
            "and names of recipes in the recipe folder (NAME is NAME.json there). "
            "With --broker the run is sent to that broker for `celery worker` "
            "processes and its run ID is printed; when the broker cannot be "
            "reached, the run is spooled for 'workflows-celery pickup' and the exit "
            f"status is {EXIT_SPOOLED}. Without --broker the recipe runs here, on an "
            "in-memory broker with an in-process worker hosting the installed "
            "services the recipe names, and the steps it took are printed when no "
            "message is left in flight."
        ),
    )
    add_recipe_options(
        run,
        "recipe JSON file, or name of a recipe in the recipe folder",
        "recipe parameter filling {KEY} placeholders (repeatable); a JSON "
        "object or array value is decoded, for {$REPLACE:KEY}; 'uuid' sets the run ID",
    )
    add_broker_option(
        run, "Celery broker URL, e.g. redis://127.0.0.1:6379/0 (default: embedded in-memory broker)"
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the final recipe and where its first messages would go; send nothing",
    )
    run.add_argument(
        "--spool-dir",
        type=Path,
        metavar="DIR",
        help="where to keep runs the broker could not take (default: WORKFLOWS_CELERY_SPOOL_DIR, "
        "else ~/.local/state/workflows-celery/spool)",
    )
    run.add_argument(
        "--no-spool",
        action="store_true",
        help="fail instead of spooling when the broker cannot be reached",
    )
    run.add_argument(
        "--simulate",
        action="store_true",
        help="replace every node's service by a stand-in that forwards each payload "
        "to all of its node's outputs (embedded mode only)",
    )
    run.add_argument(
        "--services",
        metavar="NAMES",
        help="services to host in the embedded worker, comma separated (default: "
        "the installed services whose names the recipe's nodes give)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_RUN_TIMEOUT_S,
        metavar="SECONDS",
        help=f"embedded mode: give up waiting for the run after this many seconds (default {DEFAULT_RUN_TIMEOUT_S:.0f})",
    )
    run.set_defaults(handler=command_run)

    pickup = commands.add_parser(
        "pickup",
        help="send the runs spooled while the broker was unreachable",
        description=(
            "Send spooled runs to the broker, oldest first, each with the run ID "
            "that 'run' printed. A run that cannot be started from its file moves to "
            f"the spool's 'rejected' folder (exit status 1). When the broker cannot "
            f"be reached, the runs stay spooled and the exit status is {EXIT_SPOOLED}."
        ),
    )
    add_broker_option(pickup, "Celery broker URL (default: CELERY_BROKER_URL)")
    pickup.add_argument("--spool-dir", type=Path, metavar="DIR", help="spool folder (default as for 'run')")
    pickup.set_defaults(handler=command_pickup)

    validate = commands.add_parser(
        "validate",
        help="validate recipe files",
        description="Validate recipes; the exit status is 1 when any is invalid.",
    )
    validate.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe JSON file")
    validate.set_defaults(handler=command_validate)


def command_validate(args: argparse.Namespace) -> int:
    """Validate each recipe file and report every problem."""
    failures = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path)
            validate_recipe(recipe, path)
        except WorkflowsCeleryError as error:
            failures += 1
            # The error names the file already.
            print(f"error: {error}", file=sys.stderr)
            continue
        placeholders = unresolved_destinations(recipe)
        note = f" (placeholders to fill at run time: {', '.join(placeholders)})" if placeholders else ""
        print(f"{path}: valid{note}")
    if failures:
        print(f"{failures} of {len(args.recipes)} recipes invalid", file=sys.stderr)
        return 1
    return 0


def build_run(args: argparse.Namespace, *, allow_unresolved: bool | None = None) -> tuple[str, Recipe, str]:
    """Merge the command's recipes and apply its parameters; return run ID, recipe and its name.

    An argument that names an existing file, or that is not a plain recipe
    name (it has a ``/`` or ends in ``.json``), is a recipe file. Any other is
    the name of a recipe in the recipe folder. ``allow_unresolved`` keeps
    placeholders in queue and topic names (default: with ``--simulate``).
    """
    names = [item for item in args.recipes if is_recipe_name(item) and not Path(item).is_file()]
    files = [Path(item) for item in args.recipes if item not in names]
    request = StartRequest(recipes=names, parameters=dict(args.parameters))
    folder = recipe_folder(folder=args.recipe_dir)
    if allow_unresolved is None:
        allow_unresolved = args.simulate
    run_id, recipe = build_recipe(request, folder, files=files, allow_unresolved=allow_unresolved)
    return run_id, recipe, " + ".join(args.recipes)


def command_run(args: argparse.Namespace) -> int:
    """Start a recipe on a broker, print it (``--dry-run``), or run it here in the embedded mode."""
    if args.broker and args.simulate:
        print(
            "error: --simulate runs the recipe here, on the embedded broker; "
            "drop --broker to simulate",
            file=sys.stderr,
        )
        return 2
    run_id, recipe, origin = build_run(args)
    if args.dry_run:
        return _dry_run(run_id, recipe, args.broker)
    if args.broker:
        return _run_on_broker(run_id, recipe, origin, args)
    return _run_embedded(run_id, recipe, origin, args)


def _dry_run(run_id: str, recipe: Recipe, broker_url: str | None) -> int:
    from workflows_celery.application import create_app
    from workflows_celery.canvas import first_messages

    # A dry-run transport only builds the messages, so no broker is contacted.
    app = create_app(broker_url or EMBEDDED_BROKER_URL, main="workflows_celery.dry_run")
    _, messages = first_messages(recipe, environment={"ID": run_id}, app=app, allow_unresolved=True)
    print(json.dumps(json.loads(recipe.serialize()), indent=2, sort_keys=True))
    print(f"Run {run_id} would send {len(messages)} first message(s):")
    for outgoing in messages:
        node = outgoing.message.get("recipe-pointer") if isinstance(outgoing.message, dict) else None
        delay = f" after {outgoing.delay_s:g} s" if outgoing.delay_s else ""
        print(f"  node {node} to {outgoing.destination}{delay}")
    return 0


def _run_on_broker(run_id: str, recipe: Recipe, origin: str, args: argparse.Namespace) -> int:
    from workflows_celery.application import create_app
    from workflows_celery.canvas import start_recipe
    from workflows_celery.ledger import ledger_for
    from workflows_celery.spool import default_spool_folder, spool_run

    app = create_app(args.broker)
    try:
        start_recipe(recipe, environment={"ID": run_id}, app=app, origin=origin)
    except TransportNotConnectedError as error:
        if args.no_spool:
            raise
        folder = args.spool_dir or default_spool_folder()
        path = spool_run(folder, run_id, recipe, origin)
        print(
            f"warning: {error}\nRun {run_id} of {origin} spooled to {path}; start it later "
            f"with: workflows-celery pickup --broker {mask_url(args.broker)}"
            + (f" --spool-dir {folder}" if args.spool_dir else ""),
            file=sys.stderr,
        )
        return EXIT_SPOOLED
    print(f"Started run {run_id} of {origin} on {mask_url(args.broker)}")
    if ledger_for(app) is None:
        print(
            "note: the run is not in a run ledger, because the broker is not Redis; set "
            "WORKFLOWS_CELERY_LEDGER_URL=redis://... here and for the workers to record runs",
            file=sys.stderr,
        )
    return 0


def command_pickup(args: argparse.Namespace) -> int:
    """Start the spooled runs, oldest first."""
    from workflows_celery.spool import default_spool_folder, pick_up, spooled_files

    folder = args.spool_dir or default_spool_folder()
    waiting = len(spooled_files(folder))
    if not waiting:
        print(f"No spooled runs in {folder}")
        return 0
    app = broker_app(args)
    started = rejected = 0
    try:
        for outcome, detail in pick_up(folder, app):
            if outcome == "started":
                started += 1
                spooled_at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(detail.spooled_at))
                print(f"Started run {detail.run_id} of {detail.origin} (spooled {spooled_at})")
            else:
                rejected += 1
                path, error = detail
                print(f"error: {error}; the file is kept as {path}", file=sys.stderr)
    except TransportNotConnectedError as error:
        left = len(spooled_files(folder))
        print(f"error: {error}; {left} run(s) stay spooled in {folder}", file=sys.stderr)
        return EXIT_SPOOLED
    print(f"{started} run(s) started, {rejected} rejected")
    return 1 if rejected else 0


def _run_embedded(run_id: str, recipe: Recipe, origin: str, args: argparse.Namespace) -> int:
    from workflows_celery import dlq
    from workflows_celery.canvas import start_recipe
    from workflows_celery.embedded import embedded_worker
    from workflows_celery.simulate import format_tree, make_stand_in, reachable_nodes

    for problem in unresolved_destinations(recipe):
        print(f"note: {problem} has no value; simulated under that literal name", file=sys.stderr)

    services: list[Any]
    if args.simulate:
        services = [make_stand_in(recipe)]
    elif args.services:
        services = [args.services]
    else:
        services = services_named_in(recipe)
        if not services:
            print(
                "error: no installed service matches the services this recipe names; "
                "use --simulate to run it with stand-ins, or --services NAMES",
                file=sys.stderr,
            )
            return 2

    started = time.monotonic()
    with embedded_worker(services) as (app, tracker):
        start_recipe(recipe, environment={"ID": run_id}, app=app, allow_unresolved=args.simulate)
        print(f"Run {run_id} of {origin} on the embedded broker ({EMBEDDED_BROKER_URL})")
        finished = tracker.wait_until_idle(args.timeout)
        elapsed = time.monotonic() - started
        steps = sorted(tracker.steps, key=lambda step: step.finished_at)
        # The in-memory broker ends with this process, so its dead letters are
        # printed here rather than left for 'workflows-celery dlq'.
        dead_letters = [
            letter for queue in sorted(tracker.dead_lettered) for letter in dlq.read(app, queue)
        ]

    for line in format_tree(steps):
        print(line)
    reached = {step.node for step in steps}
    reachable = reachable_nodes(recipe)
    print(
        f"{len(steps)} step{'' if len(steps) == 1 else 's'} run, "
        f"{len(reached & reachable)} of {len(reachable)} reachable nodes reached, {elapsed:.2f} s"
    )
    for queue, count in sorted(tracker.undeliverable.items()):
        print(
            f"warning: {count} message(s) sent to queue {queue!r}, which no hosted "
            "service reads; they were not processed",
            file=sys.stderr,
        )
    for letter in dead_letters:
        print(f"warning: dead-lettered {dlq.describe(letter)}", file=sys.stderr)
    if not finished:
        print(
            f"error: the run still had {tracker.in_flight} message(s) in flight "
            f"after {args.timeout:.0f} s",
            file=sys.stderr,
        )
        return 1
    # A run that left messages unprocessed or dead-lettered did not complete.
    return 1 if dead_letters or tracker.undeliverable else 0


def services_named_in(recipe: Recipe) -> list[type[CommonService]]:
    """Return the installed services whose entry-point or display name a node gives."""
    from workflows_celery.services import known_services

    requested = {
        str(node.get("service"))
        for key, node in recipe.recipe.items()
        if isinstance(key, int) and isinstance(node, dict) and node.get("service")
    }
    found: list[type[CommonService]] = []
    for name, entry in known_services().items():
        try:
            service_class = entry.load()
        except Exception:  # a broken plug-in must not stop the run
            logger.warning("Cannot load service entry point %r", name, exc_info=True)
            continue
        display_name = getattr(service_class, "_service_name", None)
        if (name in requested or display_name in requested) and service_class not in found:
            found.append(service_class)
    return found
