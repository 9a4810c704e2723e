"""``workflows-celery status`` and ``shutdown``: watch and stop hosted services."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from workflows_celery.cli.common import add_broker_option, broker_app
from workflows_celery.errors import ConfigurationError
from workflows_celery.redaction import mask_url

#: Seconds ``status --once`` listens: one heartbeat interval and a margin.
DEFAULT_STATUS_WAIT_S = 8.0

#: Seconds between two refreshes of the live status table.
STATUS_REFRESH_S = 1.0

#: Terminal escape sequence that moves the cursor home and clears the screen.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def add_commands(commands: Any) -> None:
    """Add the ``status`` and ``shutdown`` commands."""
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
    add_broker_option(status)
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
    add_broker_option(shutdown)
    shutdown.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="a service class name (e.g. SamplePipethrough) or a host ID (contains dots)",
    )
    shutdown.set_defaults(handler=command_shutdown)


def command_status(args: argparse.Namespace) -> int:
    """Print the status of every service heard from, once or refreshing in place."""
    from workflows_celery.constants import STATUS_TOPIC
    from workflows_celery.monitor import StatusBoard, format_table
    from workflows_celery.transport import CeleryTransport

    app = broker_app(args)
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

    app = broker_app(args)
    transport = CeleryTransport(app)
    for target in args.targets:
        transport.broadcast(COMMAND_TOPIC, shutdown_command(target))
        kind = "host" if "." in target else "service"
        print(f"Sent shutdown to {kind} {target} on {mask_url(app.conf.broker_url)}")
    return 0
