"""The ``workflows-celery`` command: start, check and operate recipes and services.

Each module adds its commands to the parser: :mod:`.run` starts and validates
recipes, :mod:`.runs` reads and cancels runs in the run ledger, :mod:`.graph` draws
recipes and runs, :mod:`.monitor`
watches and stops services, and :mod:`.dlq` operates dead-letter queues.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from workflows_celery import __version__
from workflows_celery.cli import dlq, graph, monitor, run, runs
from workflows_celery.cli.common import parse_parameter
from workflows_celery.errors import WorkflowsCeleryError

__all__ = ["build_parser", "main", "parse_parameter"]


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
    run.add_commands(commands)
    runs.add_commands(commands)
    graph.add_commands(commands)
    monitor.add_commands(commands)
    dlq.add_commands(commands)
    return parser


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
    except BrokenPipeError:
        # The reader of the output went away (``... | head``). Python's docs
        # advise pointing stdout at devnull, so the exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except WorkflowsCeleryError as error:
        hint = ""
        if "unresolved placeholder" in str(error):
            hint = " with --param KEY=VALUE"
        print(f"error: {error}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
