"""Operating dead-letter queues: count, read, export, re-inject and purge.

A dead-letter queue ``dlq.<queue>`` contains step task messages moved there by
:mod:`workflows_celery.deadletter` (or by RabbitMQ's own dead-lettering). Every
operation reads the queue with unacknowledged gets and puts back what it does
not consume, so a crash in the middle loses nothing: the broker returns the
unacknowledged messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import kombu.utils.json
from celery import Celery
from kombu.message import Message

from workflows_celery import rabbitmq_api, routing
from workflows_celery.constants import (
    DEAD_LETTER_PREFIX,
    HEADER_DEAD_LETTER_ERROR,
    HEADER_DEATH,
    HEADER_DELIVERY_COUNT,
    HEADER_REINJECTED,
    STEP_TASK_NAME,
)
from workflows_celery.deadletter import publish_copy
from workflows_celery.errors import ConfigurationError
from workflows_celery.messages import (
    Destination,
    OutgoingMessage,
    destination_from_kwargs,
)
from workflows_celery.redaction import mask_url

logger = logging.getLogger(__name__)


def dead_letter_queue_name(queue: str) -> str:
    """Accept ``queue`` or ``dlq.queue`` and return the dead-letter queue name."""
    return queue if queue.startswith(DEAD_LETTER_PREFIX) else f"{DEAD_LETTER_PREFIX}{queue}"


@dataclass
class DeadLetter:
    """One message in a dead-letter queue, as an operator sees it."""

    message_id: str
    dead_letter_queue: str
    destination: Destination | None
    headers: dict[str, Any]
    message: Any
    reason: str | None = None
    dead_lettered_at: int | None = None
    error: str | None = None
    #: The ``x-death`` records, latest first, with times in seconds since the epoch.
    deaths: list[dict[str, Any]] = field(default_factory=list)
    #: True for a message that is not a step task message; it is kept and
    #: re-injected byte for byte.
    raw: bool = False
    _kombu_message: Message | None = field(default=None, repr=False, compare=False)

    @property
    def run_id(self) -> str | None:
        """The recipe run ID (``environment.ID``) of a recipe message, if any."""
        if isinstance(self.message, dict):
            environment = self.message.get("environment")
            if isinstance(environment, dict) and environment.get("ID") is not None:
                return str(environment["ID"])
        return None

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready record that ``reinject_files`` reads back."""
        return {
            "message-id": self.message_id,
            "dead-letter-queue": self.dead_letter_queue,
            "queue": self.destination.name if self.destination else None,
            "is-topic": bool(self.destination and self.destination.is_topic),
            "reason": self.reason,
            "dead-lettered-at": self.dead_lettered_at,
            "error": self.error,
            "x-death": self.deaths,
            "run-id": self.run_id,
            "headers": self.headers,
            "message": self.message,
            "raw": self.raw,
        }


def _parse(queue_name: str, message: Message) -> DeadLetter:
    """Describe one message taken off the dead-letter queue ``queue_name``."""
    headers = dict(message.headers or {})
    deaths = headers.get(HEADER_DEATH)
    death: dict[str, Any] = {}
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        death = deaths[0]
    details = headers.get(HEADER_DEAD_LETTER_ERROR)
    error = details.get("error") if isinstance(details, dict) else None

    try:
        body = message.decode()
    except Exception as decode_error:  # kept as raw bytes for the operator
        logger.debug("Message in %s cannot be decoded: %s", queue_name, decode_error)
        body = message.body
    kwargs = body[1] if isinstance(body, (list, tuple)) and len(body) > 1 else None
    original = death.get("queue") or queue_name[len(DEAD_LETTER_PREFIX) :]
    step_kwargs = kwargs if isinstance(kwargs, dict) and headers.get("task") == STEP_TASK_NAME else None

    if step_kwargs is not None:
        destination = destination_from_kwargs(step_kwargs) or Destination(str(original))
        workflows_headers = dict(step_kwargs.get("headers") or {})
        content = step_kwargs.get("message")
    else:
        # Not a step task message (a message the worker could not run, or one
        # dead-lettered by RabbitMQ itself), so the body is kept as it is.
        destination = Destination(str(original))
        workflows_headers = {}
        content = body

    return DeadLetter(
        message_id=str(headers.get("id") or message.properties.get("message_id") or ""),
        dead_letter_queue=queue_name,
        destination=destination,
        headers=workflows_headers,
        message=content,
        reason=death.get("reason"),
        dead_lettered_at=_epoch_seconds(death.get("time")),
        deaths=[
            {**record, "time": _epoch_seconds(record.get("time"))}
            for record in (deaths if isinstance(deaths, list) else [])
            if isinstance(record, dict)
        ],
        error=error,
        raw=step_kwargs is None,
        _kombu_message=message,
    )


def _epoch_seconds(value: Any) -> int | None:
    """Return the time of an ``x-death`` record in seconds since the epoch.

    workflows-celery writes a number; RabbitMQ writes an AMQP timestamp, which
    py-amqp decodes to a datetime.
    """
    if isinstance(value, datetime):
        return int(value.timestamp())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return None


@contextmanager
def _taken(app: Celery, queue: str, limit: int | None = None) -> Iterator[list[DeadLetter]]:
    """Take messages off a dead-letter queue unacknowledged, then put back the rest.

    Messages the caller settles (``_settle``) stay consumed; all others go back
    to the head of the queue when the block ends, also when it raises.
    """
    name = dead_letter_queue_name(queue)
    with app.connection_for_write() as connection:
        channel = connection.channel()
        bound = routing.task_queue(name).bind(channel)
        taken: list[DeadLetter] = []
        try:
            while limit is None or len(taken) < limit:
                try:
                    message = bound.get(no_ack=False, accept=["json"])
                except connection.channel_errors:
                    # RabbitMQ: the queue does not exist, so it contains nothing.
                    logger.debug("No dead-letter queue %s on the broker", name)
                    break
                if message is None:
                    break
                taken.append(_parse(name, message))
            yield taken
        finally:
            # Oldest first: kombu's Redis transport puts a rejected message at the
            # back of its queue, and RabbitMQ puts it back where it was.
            # NOTE: on Redis, messages left in the queue (with ``limit``) move
            # ahead of the ones taken and put back.
            for letter in taken:
                kombu_message = letter._kombu_message
                if kombu_message is not None and not kombu_message.acknowledged:
                    kombu_message.reject(requeue=True)
            try:
                channel.close()
            except connection.channel_errors + connection.connection_errors:
                logger.debug("Channel already closed by the broker")


def _settle(letter: DeadLetter) -> None:
    if letter._kombu_message is not None:
        letter._kombu_message.ack()


def read(app: Celery, queue: str, *, limit: int | None = None) -> list[DeadLetter]:
    """Return the messages of a dead-letter queue, leaving them in place."""
    with _taken(app, queue, limit) as letters:
        return list(letters)


def count(app: Celery, queue: str) -> int:
    """Return the number of messages in a dead-letter queue (0 if it does not exist)."""
    return count_if_declared(app, queue) or 0


def count_if_declared(app: Celery, queue: str) -> int | None:
    """Return the number of messages in a dead-letter queue, or None when it does not exist.

    Redis deletes an empty list, so there an empty queue does not exist either.
    """
    name = dead_letter_queue_name(queue)
    with app.connection_for_write() as connection:
        channel = connection.channel()
        try:
            declared = channel.queue_declare(queue=name, passive=True)
            return int(declared.message_count)
        except connection.channel_errors:
            return None
        finally:
            try:
                channel.close()
            except connection.channel_errors + connection.connection_errors:
                logger.debug("Channel already closed by the broker")


def list_queues(app: Celery, *, management_url: str | None = None) -> dict[str, int]:
    """Return every dead-letter queue with its message count.

    Redis is scanned for the queues. RabbitMQ names them through its
    management API (see :mod:`workflows_celery.rabbitmq_api`), and each is then
    counted over AMQP, which is exact where the API's figures lag by seconds.

    Args:
        app: The app whose broker has the queues.
        management_url: Address of RabbitMQ's management API (default: port
            15672 of the broker's host).

    Raises:
        ConfigurationError: the broker cannot list its queues (RabbitMQ whose
            management API cannot be reached); name the queues instead.
    """
    url = str(app.conf.broker_url or "")
    if url.startswith(("redis://", "rediss://", "redis+socket://")):
        with app.connection_for_write() as connection:
            client = connection.default_channel.client
            names = sorted(
                key.decode() if isinstance(key, bytes) else str(key)
                for key in client.scan_iter(match=f"{DEAD_LETTER_PREFIX}*", count=500)
            )
            return {
                name: int(client.llen(name))
                for name in names
                if client.type(name) in (b"list", "list")
            }
    if url.startswith(("amqp://", "amqps://", "pyamqp://")):
        names = rabbitmq_api.queue_names(url, management_url)
        return {
            name: count(app, name)
            for name in sorted(names)
            if name.startswith(DEAD_LETTER_PREFIX)
        }
    raise ConfigurationError(
        f"Cannot list dead-letter queues on {mask_url(url)}: this broker offers no "
        "queue listing; name the queues to check, e.g. "
        "'workflows-celery dlq list per_image_analysis'"
    )


def _select(
    letters: list[DeadLetter], run_id: str | None, message_ids: set[str] | None
) -> list[DeadLetter]:
    chosen = letters
    if run_id is not None:
        chosen = [letter for letter in chosen if letter.run_id == run_id]
    if message_ids:
        chosen = [letter for letter in chosen if letter.message_id in message_ids]
    return chosen


def reinject(
    app: Celery,
    queue: str,
    *,
    run_id: str | None = None,
    message_ids: set[str] | None = None,
    to_queue: str | None = None,
) -> list[DeadLetter]:
    """Send dead-lettered messages back to their queue (or ``to_queue``) and remove them.

    Only messages of run ``run_id`` or with the given ids are taken when those
    are given. Each goes back with its delivery count reset and a
    ``workflows-reinjected`` header saying where it came from.
    """
    from workflows_celery.transport import publish_messages

    with _taken(app, queue) as letters:
        chosen = _select(letters, run_id, message_ids)
        for letter in chosen:
            if letter.raw:
                _republish_raw(app, letter, to_queue)
            else:
                _record_reinjection(app, letter)
                publish_messages(app, [_reinjection(letter, to_queue)])
            _settle(letter)
            logger.info(
                "Re-injected message %s from %s into %s",
                letter.message_id,
                letter.dead_letter_queue,
                to_queue or (letter.destination.name if letter.destination else "?"),
            )
        return chosen


def _republish_raw(app: Celery, letter: DeadLetter, to_queue: str | None) -> None:
    """Send a message that is not a step task message back exactly as it was received."""
    message = letter._kombu_message
    queue = to_queue or (letter.destination.name if letter.destination else None)
    if message is None or queue is None:
        raise ConfigurationError(
            f"Message {letter.message_id or '(no id)'} in {letter.dead_letter_queue} names "
            "no queue; give one with --to QUEUE"
        )
    headers = {
        key: value
        for key, value in (message.headers or {}).items()
        if key not in (HEADER_DEATH, HEADER_DEAD_LETTER_ERROR)
    }
    headers[HEADER_REINJECTED] = {"from": letter.dead_letter_queue, "time": int(time.time())}
    publish_copy(app, message, queue, headers)


def _record_reinjection(app: Celery, letter: DeadLetter) -> None:
    """Count a re-injected recipe message as in flight again in its run's ledger."""
    from workflows_celery.ledger import ledger_for

    recorder = ledger_for(app)
    if recorder is not None and letter.run_id is not None and letter.message_id:
        recorder.record_reinjected(letter.run_id, letter.message_id)


def _reinjection(letter: DeadLetter, to_queue: str | None) -> OutgoingMessage:
    if to_queue is not None:
        destination = Destination(to_queue)
    elif letter.destination is not None:
        destination = letter.destination
    else:
        raise ConfigurationError(
            f"Message {letter.message_id} in {letter.dead_letter_queue} names no queue; "
            "give one with --to QUEUE"
        )
    headers = {k: v for k, v in letter.headers.items() if k != HEADER_DELIVERY_COUNT}
    headers[HEADER_REINJECTED] = {
        "from": letter.dead_letter_queue,
        "reason": letter.reason,
        "time": int(time.time()),
        # Carried so that a new death counts on from the earlier ones.
        HEADER_DEATH: letter.deaths,
    }
    return OutgoingMessage(
        destination=destination, message=letter.message, headers=headers, task_id=letter.message_id
    )


def purge(
    app: Celery,
    queue: str,
    *,
    run_id: str | None = None,
    message_ids: set[str] | None = None,
) -> list[DeadLetter]:
    """Remove dead-lettered messages (all, or those of a run or with given ids)."""
    with _taken(app, queue) as letters:
        chosen = _select(letters, run_id, message_ids)
        for letter in chosen:
            _settle(letter)
        return chosen


def encode_record(letter: DeadLetter, indent: int | None = None) -> str:
    """Encode a dead letter as JSON, with kombu's encoder as senders use it.

    Values that plain JSON lacks (bytes, datetime, Decimal, UUID) keep kombu's
    type markers, so a message re-injected from the file is the one sent.
    """
    return str(kombu.utils.json.dumps(letter.to_json(), indent=indent))


def export(app: Celery, queue: str, directory: Path) -> list[Path]:
    """Write each message of a dead-letter queue to a JSON file, leaving it in place."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for letter in read(app, queue):
        path = directory / f"{letter.dead_letter_queue}-{letter.message_id or len(written)}.json"
        path.write_text(encode_record(letter, indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


def reinject_files(
    app: Celery, paths: list[Path], *, to_queue: str | None = None
) -> list[DeadLetter]:
    """Send messages exported by :func:`export` back to their queues.

    Raises:
        ConfigurationError: a file is not an exported dead letter.
    """
    from workflows_celery.transport import publish_messages

    letters = [_load(path) for path in paths]
    for letter, path in zip(letters, paths):
        if letter.raw:
            raise ConfigurationError(
                f"Cannot re-inject {str(path)!r}: it contains a message that is not a "
                "workflows message, whose bytes a JSON file cannot keep; re-inject it "
                "from its dead-letter queue with --id instead"
            )
    for letter in letters:
        _record_reinjection(app, letter)
        publish_messages(app, [_reinjection(letter, to_queue)])
    return letters


def _load(path: Path) -> DeadLetter:
    try:
        record = kombu.utils.json.loads(path.read_text(encoding="utf-8"))
        queue = record.get("queue")
        return DeadLetter(
            message_id=str(record.get("message-id") or ""),
            dead_letter_queue=str(record.get("dead-letter-queue") or ""),
            destination=Destination(str(queue), bool(record.get("is-topic"))) if queue else None,
            headers=dict(record.get("headers") or {}),
            message=record.get("message"),
            reason=record.get("reason"),
            dead_lettered_at=record.get("dead-lettered-at"),
            error=record.get("error"),
            deaths=list(record.get("x-death") or []),
            raw=bool(record.get("raw")),
        )
    except OSError as error:
        raise ConfigurationError(f"Cannot read {str(path)!r}: {error.strerror}") from None
    except (ValueError, AttributeError) as error:
        raise ConfigurationError(
            f"Cannot re-inject {str(path)!r}: it is not a dead letter written by "
            f"'workflows-celery dlq export' ({error})"
        ) from None


def describe(letter: DeadLetter) -> str:
    """Return one line about a dead letter for a terminal."""
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(letter.dead_lettered_at))
        if letter.dead_lettered_at
        else "unknown time"
    )
    run = f" run {letter.run_id}" if letter.run_id else ""
    error = f": {letter.error}" if letter.error else ""
    original = letter.destination.name if letter.destination else "?"
    return f"{letter.message_id} from {original}{run}, {letter.reason or 'unknown reason'} at {when}{error}"

