"""The ``workflows-celery`` command: start recipes and validate them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workflows.recipe import Recipe
from workflows.services.common_service import CommonService

from workflows_celery import __version__
from workflows_celery.constants import EMBEDDED_BROKER_URL
from workflows_celery.errors import ConfigurationError, WorkflowsCeleryError
from workflows_celery.recipes import (
    load_recipe,
    prepare_recipe,
    unresolved_destinations,
    validate_recipe,
)
from workflows_celery.redaction import mask_url

logger = logging.getLogger(__name__)

#: Seconds an embedded run may take before ``run`` gives up waiting.
DEFAULT_RUN_TIMEOUT_S = 300.0

#: Seconds ``status --once`` listens: one heartbeat interval and a margin.
DEFAULT_STATUS_WAIT_S = 8.0

#: Seconds between two refreshes of the live status table.
STATUS_REFRESH_S = 1.0

#: Terminal escape sequence that moves the cursor home and clears the screen.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def parse_parameter(text: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE``; a VALUE that is a JSON object or array is decoded."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(
            f"invalid parameter {text!r}: expected KEY=VALUE, e.g. --param ispyb_dcid=1234"
        )
    if value.lstrip().startswith(("{", "[")):
        try:
            return key, json.loads(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"invalid parameter {key!r}: value looks like JSON but is not valid ({error})"
            ) from None
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``workflows-celery`` command."""
    parser = argparse.ArgumentParser(
        prog="workflows-celery",
        description="Run python-workflows recipes and services on Celery.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="start a recipe",
        description=(
            "Start a recipe. With --broker the run is sent to that broker for "
            "`celery worker` processes and its run ID is printed. Without it the "
            "recipe runs here, on an in-memory broker with an in-process worker "
            "hosting the installed services the recipe names, and the steps it "
            "took are printed when no message is left in flight."
        ),
    )
    run.add_argument("recipe", help="recipe JSON file")
    run.add_argument(
        "-p",
        "--param",
        dest="parameters",
        action="append",
        type=parse_parameter,
        default=[],
        metavar="KEY=VALUE",
        help="recipe parameter filling {KEY} placeholders (repeatable); a JSON "
        "object or array value is decoded, for {$REPLACE:KEY}",
    )
    run.add_argument(
        "-b",
        "--broker",
        metavar="URL",
        help="Celery broker URL, e.g. redis://127.0.0.1:6379/0 (default: embedded in-memory broker)",
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

    validate = commands.add_parser(
        "validate",
        help="validate recipe files",
        description="Validate recipes; the exit status is 1 when any is invalid.",
    )
    validate.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe JSON file")
    validate.set_defaults(handler=command_validate)

    status = commands.add_parser(
        "status",
        help="show the services and workers that are alive",
        description=(
            "Show every hosted service instance that broadcasts its status: host, "
            "service, state, share of time busy, messages processed, worker and when "
            "it was last heard from. Without --once the table refreshes in place "
            "until interrupted."
        ),
    )
    status.add_argument("-b", "--broker", metavar="URL", help="Celery broker URL")
    status.add_argument(
        "--once", action="store_true", help="listen for --wait seconds, print once and exit"
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_STATUS_WAIT_S,
        metavar="SECONDS",
        help=f"with --once, seconds to listen (default {DEFAULT_STATUS_WAIT_S:.0f}, "
        "one heartbeat interval and a margin)",
    )
    status.set_defaults(handler=command_status)

    shutdown = commands.add_parser(
        "shutdown",
        help="stop hosted services by host or by service",
        description=(
            "Stop service instances through the workflows command topic, as zocalo.shutdown "
            "does: every instance of a service class, or the one instance with a host ID "
            "(see 'workflows-celery status'). A worker process left without services "
            "stops its worker."
        ),
    )
    shutdown.add_argument("-b", "--broker", metavar="URL", help="Celery broker URL")
    shutdown.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="a service class name (e.g. SamplePipethrough) or a host ID (contains dots)",
    )
    shutdown.set_defaults(handler=command_shutdown)

    _add_dlq_commands(commands)
    return parser


def _add_dlq_commands(commands: Any) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="inspect and re-inject dead-lettered messages",
        description=(
            "Operate dead-letter queues (dlq.<queue>). QUEUE may be given as "
            "'per_image_analysis' or 'dlq.per_image_analysis'. The broker is "
            "--broker or CELERY_BROKER_URL."
        ),
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    def add(name: str, help_text: str, handler: Any) -> argparse.ArgumentParser:
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument("-b", "--broker", metavar="URL", help="Celery broker URL")
        action.set_defaults(handler=handler)
        return action

    listing = add(
        "list",
        "count the messages in dead-letter queues; the exit status is 1 when any "
        "holds messages and 2 when they cannot be counted",
        command_dlq_list,
    )
    listing.add_argument(
        "queues",
        nargs="*",
        metavar="QUEUE",
        help="queues to check (default: every dlq.* queue; on RabbitMQ this needs the "
        "management API)",
    )
    listing.add_argument(
        "--management-url",
        metavar="URL",
        help="RabbitMQ management API address (default: http://BROKER-HOST:15672)",
    )
    show = add("show", "print the messages of a dead-letter queue", command_dlq_show)
    show.add_argument("queue", metavar="QUEUE")
    show.add_argument("--json", action="store_true", help="print one JSON record per message")
    export = add(
        "export", "write each message of a dead-letter queue to a JSON file", command_dlq_export
    )
    export.add_argument("queue", metavar="QUEUE")
    export.add_argument("--dir", required=True, type=Path, help="folder for the files")
    reinject = add(
        "reinject",
        "send dead-lettered messages back to their queue and remove them from the dead-letter queue",
        command_dlq_reinject,
    )
    reinject.add_argument("queue", nargs="?", metavar="QUEUE")
    reinject.add_argument("--run", metavar="ID", help="only messages of this recipe run")
    reinject.add_argument(
        "--id", dest="message_ids", action="append", metavar="MESSAGE_ID", help="only this message (repeatable)"
    )
    reinject.add_argument("--to", metavar="QUEUE", help="send to this queue instead of the original one")
    reinject.add_argument(
        "--file", dest="files", action="append", type=Path, metavar="FILE",
        help="re-inject a message written by 'dlq export' (repeatable); no QUEUE needed",
    )
    purge = add("purge", "delete dead-lettered messages", command_dlq_purge)
    purge.add_argument("queue", metavar="QUEUE")
    purge.add_argument("--run", metavar="ID", help="only messages of this recipe run")
    purge.add_argument(
        "--id", dest="message_ids", action="append", metavar="MESSAGE_ID", help="only this message (repeatable)"
    )


def _broker_app(args: argparse.Namespace) -> Any:
    from workflows_celery.application import create_app

    if not args.broker and not os.environ.get("CELERY_BROKER_URL"):
        raise ConfigurationError(
            "No broker given: use --broker URL (e.g. redis://127.0.0.1:6379/0) "
            "or set CELERY_BROKER_URL"
        )
    return create_app(args.broker)


def command_dlq_list(args: argparse.Namespace) -> int:
    """Print dead-letter queues with their counts; return 1 when any contains messages."""
    from workflows_celery import dlq
    from workflows_celery.leases import uses_redis

    try:
        app = _broker_app(args)
        missing: set[str] = set()
        if args.queues:
            counts = {}
            for queue in args.queues:
                name = dlq.dead_letter_queue_name(queue)
                found = dlq.count_if_declared(app, queue)
                counts[name] = found or 0
                if found is None and not uses_redis(app):
                    missing.add(name)
        else:
            counts = dlq.list_queues(app, management_url=args.management_url)
    except Exception as error:  # reported apart from "messages present" (exit 1)
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, messages in sorted(counts.items()):
        note = " (no such queue)" if name in missing else ""
        print(f"{name}  {messages} message{'s' if messages != 1 else ''}{note}")
    if not counts:
        print("no dead-letter queues")
    return 1 if any(counts.values()) else 0


def command_dlq_show(args: argparse.Namespace) -> int:
    """Print the messages of one dead-letter queue."""
    from workflows_celery import dlq

    letters = dlq.read(_broker_app(args), args.queue)
    for letter in letters:
        if args.json:
            print(dlq.encode_record(letter))
        else:
            print(dlq.describe(letter))
    if not args.json:
        print(f"{len(letters)} message(s) in {dlq.dead_letter_queue_name(args.queue)}")
    return 0


def command_dlq_export(args: argparse.Namespace) -> int:
    """Write the messages of one dead-letter queue to files."""
    from workflows_celery import dlq

    paths = dlq.export(_broker_app(args), args.queue, args.dir)
    for path in paths:
        print(path)
    print(f"{len(paths)} message(s) written to {args.dir}")
    return 0


def command_dlq_reinject(args: argparse.Namespace) -> int:
    """Re-inject dead-lettered messages from a queue or from exported files."""
    from workflows_celery import dlq

    app = _broker_app(args)
    if args.files:
        letters = dlq.reinject_files(app, args.files, to_queue=args.to)
    elif args.queue:
        letters = dlq.reinject(
            app,
            args.queue,
            run_id=args.run,
            message_ids=set(args.message_ids or ()),
            to_queue=args.to,
        )
    else:
        print("error: name a dead-letter QUEUE or give --file FILE", file=sys.stderr)
        return 2
    for letter in letters:
        print(f"re-injected {dlq.describe(letter)}")
    print(f"{len(letters)} message(s) re-injected")
    return _nothing_matched(args, letters)


def command_dlq_purge(args: argparse.Namespace) -> int:
    """Delete messages from one dead-letter queue."""
    from workflows_celery import dlq

    letters = dlq.purge(
        _broker_app(args), args.queue, run_id=args.run, message_ids=set(args.message_ids or ())
    )
    print(f"{len(letters)} message(s) deleted from {dlq.dead_letter_queue_name(args.queue)}")
    return _nothing_matched(args, letters)


def _nothing_matched(args: argparse.Namespace, letters: list[Any]) -> int:
    """Return 1, with a message, when --run or --id selected no message at all."""
    if letters or not (getattr(args, "run", None) or getattr(args, "message_ids", None)):
        return 0
    print(
        "error: no message matched --run/--id; run IDs and message IDs must be given "
        "in full (see 'workflows-celery dlq show QUEUE')",
        file=sys.stderr,
    )
    return 1


def command_status(args: argparse.Namespace) -> int:
    """Print the status of every service heard from, once or refreshing in place."""
    from workflows_celery.constants import STATUS_TOPIC
    from workflows_celery.monitor import StatusBoard, format_table
    from workflows_celery.transport import CeleryTransport

    app = _broker_app(args)
    board = StatusBoard()
    transport = CeleryTransport(app)
    if not transport.connect():
        raise ConfigurationError(f"Cannot reach the broker {mask_url(app.conf.broker_url)}")

    def show() -> None:
        rows = board.snapshot()
        print(json.dumps(rows, indent=2) if args.json else format_table(rows), flush=True)

    try:
        transport.subscribe_broadcast(STATUS_TOPIC, board)
        if args.once:
            time.sleep(max(args.wait, 0.0))
            show()
            return 0
        while True:
            if sys.stdout.isatty():
                print(CLEAR_SCREEN, end="")
            show()
            time.sleep(STATUS_REFRESH_S)
    except KeyboardInterrupt:
        return 0
    finally:
        transport.disconnect()


def command_shutdown(args: argparse.Namespace) -> int:
    """Broadcast a shutdown command for each target."""
    from workflows_celery.constants import COMMAND_TOPIC
    from workflows_celery.control import shutdown_command
    from workflows_celery.transport import CeleryTransport

    app = _broker_app(args)
    transport = CeleryTransport(app)
    for target in args.targets:
        transport.broadcast(COMMAND_TOPIC, shutdown_command(target))
        kind = "host" if "." in target else "service"
        print(f"Sent shutdown to {kind} {target} on {mask_url(app.conf.broker_url)}")
    return 0


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


def command_run(args: argparse.Namespace) -> int:
    """Start a recipe on a broker, or run it here in the embedded mode."""
    parameters = dict(args.parameters)
    if args.broker:
        if args.simulate:
            print(
                "error: --simulate runs the recipe here, on the embedded broker; "
                "drop --broker to simulate",
                file=sys.stderr,
            )
            return 2
        return _run_on_broker(args.recipe, parameters, args.broker)
    return _run_embedded(args, parameters)


def _run_on_broker(path: str, parameters: dict[str, Any], broker_url: str) -> int:
    from workflows_celery.application import create_app
    from workflows_celery.canvas import start_recipe

    app = create_app(broker_url)
    run_id = start_recipe(path, parameters, app=app)
    print(f"Started run {run_id} of {path} on {mask_url(broker_url)}")
    return 0


def _run_embedded(args: argparse.Namespace, parameters: dict[str, Any]) -> int:
    from workflows_celery import dlq
    from workflows_celery.canvas import start_recipe
    from workflows_celery.embedded import embedded_worker
    from workflows_celery.simulate import format_tree, make_stand_in, reachable_nodes

    recipe = prepare_recipe(args.recipe, parameters, allow_unresolved=args.simulate)
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
        run_id = start_recipe(recipe, app=app, allow_unresolved=args.simulate)
        print(f"Run {run_id} of {args.recipe} on the embedded broker ({EMBEDDED_BROKER_URL})")
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

    wanted = {
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
        if (name in wanted or display_name in wanted) and service_class not in found:
            found.append(service_class)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    handler = logging.StreamHandler()
    handler.setLevel(level)  # services set their own loggers to INFO
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    try:
        return int(args.handler(args))
    except WorkflowsCeleryError as error:
        hint = ""
        if "unresolved placeholder" in str(error):
            hint = " with --param KEY=VALUE"
        print(f"error: {error}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
