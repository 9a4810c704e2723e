"""``workflows-celery dlq``: inspect, export, re-inject and purge dead-lettered messages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from workflows_celery.cli.common import add_broker_option, broker_app


def add_commands(commands: Any) -> None:
    """Add the ``dlq`` command and its actions."""
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
        add_broker_option(action)
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


def command_dlq_list(args: argparse.Namespace) -> int:
    """Print dead-letter queues with their counts; return 1 when any contains messages."""
    from workflows_celery import dlq
    from workflows_celery.leases import uses_redis

    try:
        app = broker_app(args)
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

    letters = dlq.read(broker_app(args), args.queue)
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

    paths = dlq.export(broker_app(args), args.queue, args.dir)
    for path in paths:
        print(path)
    print(f"{len(paths)} message(s) written to {args.dir}")
    return 0


def command_dlq_reinject(args: argparse.Namespace) -> int:
    """Re-inject dead-lettered messages from a queue or from exported files."""
    from workflows_celery import dlq

    app = broker_app(args)
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
        broker_app(args), args.queue, run_id=args.run, message_ids=set(args.message_ids or ())
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
