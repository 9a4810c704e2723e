"""``workflows-celery runs`` and ``cancel``: read and stop runs through the run ledger."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from workflows_celery.cli.common import add_broker_option, broker_app
from workflows_celery.ledger import LedgerError, LedgerStep, RunRecord, require_ledger

#: Runs that ``runs`` lists by default (``--limit``).
DEFAULT_RUNS_LISTED = 20


def add_commands(commands: Any) -> None:
    """Add the ``runs`` and ``cancel`` commands."""
    runs = commands.add_parser(
        "runs",
        help="list recent runs, or show one run's steps",
        description=(
            "List the latest runs of the run ledger with their state, or with 'show ID' "
            "one run's steps as a tree, with the messages that crossed each edge. The "
            "ledger is in Redis: the result backend or the broker, or workflows_ledger_url."
        ),
    )
    add_broker_option(runs, "Celery broker URL (default: CELERY_BROKER_URL)")
    runs.add_argument("--limit", type=int, default=DEFAULT_RUNS_LISTED, metavar="N", help="runs to list")
    runs.add_argument("--json", action="store_true", help="print JSON")
    runs.add_argument("action", nargs="?", choices=["show"], help="show one run")
    runs.add_argument("run_id", nargs="?", metavar="ID", help="the run to show")
    runs.set_defaults(handler=command_runs)

    cancel = commands.add_parser(
        "cancel",
        help="stop a run",
        description=(
            "Cancel a run: workers drop its queued and delayed messages when they take "
            "them, so no further step starts. Steps already running finish. As with "
            "Celery's revoke, workers hear of it through a broadcast."
        ),
    )
    add_broker_option(cancel, "Celery broker URL (default: CELERY_BROKER_URL)")
    cancel.add_argument("run_id", metavar="ID")
    cancel.set_defaults(handler=command_cancel)


def command_runs(args: argparse.Namespace) -> int:
    """List recent runs, or show one."""
    ledger = require_ledger(broker_app(args))
    if args.action == "show":
        if not args.run_id:
            print("error: give the run ID: workflows-celery runs show ID", file=sys.stderr)
            return 2
        try:
            record = ledger.get(args.run_id)
        except LedgerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(record.as_dict(), indent=2))
        else:
            for line in describe_run(record):
                print(line)
        return 0
    records = ledger.recent(args.limit)
    if args.json:
        print(json.dumps([record.as_dict() for record in records], indent=2))
        return 0
    if not records:
        print("No runs in the ledger")
        return 0
    print(f"{'RUN ID':36}  {'STATE':9}  {'STARTED (UTC)':19}  {'SECONDS':>8}  {'STEPS':>6}  {'IN FLIGHT':>9}  RECIPE")
    for record in records:
        print(
            f"{record.run_id:36}  {record.state:9}  {_time(record.started_at):19}  "
            f"{_duration(record):>8}  {record.step_count:>6}  {record.in_flight:>9}  {record.origin}"
        )
    return 0


def command_cancel(args: argparse.Namespace) -> int:
    """Cancel a run."""
    from workflows_celery.control import cancel_run

    try:
        record = cancel_run(broker_app(args), args.run_id)
    except LedgerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"Cancelled run {record.run_id}: {record.in_flight} message(s) in flight will be "
        "dropped; steps already running finish"
    )
    return 0


def describe_run(record: RunRecord) -> list[str]:
    """Return the lines of ``runs show``: a summary, the steps as a tree, and the edges."""
    lines = [
        f"Run {record.run_id} of {record.origin or 'unknown recipe'}: {record.state}",
        f"started {_time(record.started_at)} UTC, {_duration(record)} s, {record.step_count} step(s), "
        f"{record.sent} message(s) sent, {record.in_flight} in flight, {record.failed} dead-lettered",
    ]
    children: dict[int | None, list[LedgerStep]] = {}
    for step in record.steps:
        children.setdefault(step.sender, []).append(step)
    lines.append("start")
    lines += _tree(children, None, "", set())
    if record.step_count > len(record.steps):
        lines.append(f"(the ledger keeps the latest {len(record.steps)} of {record.step_count} steps)")
    if record.edges:
        lines.append("messages per edge:")
        for (sender, node), count in sorted(record.edges.items(), key=lambda item: _sort_key(item[0])):
            lines.append(f"  {'start' if sender is None else sender} -> {node}: {count}")
    return lines


def _tree(
    children: dict[int | None, list[LedgerStep]], sender: int | None, indent: str, seen: set[int | None]
) -> list[str]:
    """Draw the steps sent by ``sender``, grouping steps of one node, and recurse once per node."""
    by_node: dict[int | None, list[LedgerStep]] = {}
    for step in children.get(sender, []):
        by_node.setdefault(step.node, []).append(step)
    lines = []
    nodes = sorted(by_node, key=lambda node: -1 if node is None else node)
    for position, node in enumerate(nodes):
        steps = by_node[node]
        last = position == len(nodes) - 1
        outcomes: dict[str, int] = {}
        for step in steps:
            outcomes[step.outcome] = outcomes.get(step.outcome, 0) + 1
        summary = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
        first = steps[0]
        lines.append(
            f"{indent}{'└── ' if last else '├── '}{node}  {first.service}  {first.destination}  "
            f"x{len(steps)}  ({summary})"
        )
        if node not in seen and node != sender:
            lines += _tree(children, node, indent + ("    " if last else "│   "), seen | {node})
    return lines


def _sort_key(edge: tuple[int | None, int | None]) -> tuple[int, int]:
    sender, node = edge
    return (-1 if sender is None else sender, -1 if node is None else node)


def _time(timestamp: float | None) -> str:
    """Write a time in UTC, as the dlq commands do."""
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(record: RunRecord) -> str:
    if record.started_at is None:
        return "-"
    end = record.finished_at or record.updated_at or record.started_at
    return f"{max(end - record.started_at, 0.0):.2f}"
