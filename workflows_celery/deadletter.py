"""Redelivery with a delivery limit, and dead-letter queues.

Some messages must be processed again: those nacked with requeue, returned
without ack or nack, read by no service, or delivered again by the broker after
a worker or a connection was lost. Each is published again as a copy, and the
original is acked. The copy keeps the message id and carries the number of earlier
deliveries in its ``x-delivery-count`` header. Once that count reaches the
delivery limit (setting ``workflows_delivery_limit``, default 5), the message
goes to its dead-letter queue ``dlq.<queue>`` instead. A message that a service
rejects without requeue, or whose step raises, goes there at once.

Doing this in the adapter rather than in the broker works the same on Redis,
RabbitMQ and the in-memory broker, and counts the deliveries lost to crashes,
which RabbitMQ counts only on quorum queues. A dead-lettered message keeps its
step task body, so it can be re-injected as it is, and gains an ``x-death``
header laid out as RabbitMQ's own dead-lettering writes it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery
from kombu.message import Message

from workflows_celery import routing
from workflows_celery.constants import (
    DEAD_LETTER_PREFIX,
    DEFAULT_DELIVERY_LIMIT,
    HEADER_DEAD_LETTER_ERROR,
    HEADER_DEATH,
    HEADER_DELIVERY_COUNT,
    HEADER_REINJECTED,
    SETTING_DELIVERY_LIMIT,
)
from workflows_celery.messages import Destination, OutgoingMessage

logger = logging.getLogger(__name__)

#: ``x-death`` reasons, as RabbitMQ names them where it has an equivalent.
REASON_REJECTED = "rejected"
REASON_DELIVERY_LIMIT = "delivery_limit"
REASON_FAILED = "failed"


def dead_letter_queue(queue: str) -> str:
    """Return the name of the dead-letter queue of ``queue``."""
    return f"{DEAD_LETTER_PREFIX}{queue}"


def delivery_count(headers: Mapping[str, Any]) -> int:
    """Return how often a message was delivered before, from its headers."""
    try:
        return max(int(headers.get(HEADER_DELIVERY_COUNT) or 0), 0)
    except (TypeError, ValueError):
        return 0


def delivery_limit(app: Celery) -> int:
    """Return the delivery limit configured for ``app`` (at least 1)."""
    value = app.conf.get(SETTING_DELIVERY_LIMIT)
    if value is None:
        return DEFAULT_DELIVERY_LIMIT
    return max(int(value), 1)


def redeliver(
    app: Celery,
    destination: Destination,
    headers: Mapping[str, Any],
    message: Any,
    *,
    message_id: str,
    why: str,
    eta: str | None = None,
    expires_at: str | None = None,
) -> bool:
    """Publish a message again with its delivery count raised, or dead-letter it.

    The caller acks the original afterwards. Returns True when the message was
    published again, False when it reached the delivery limit and went to its
    dead-letter queue.
    """
    count = delivery_count(headers) + 1
    limit = delivery_limit(app)
    if count >= limit:
        dead_letter(
            app,
            destination,
            headers,
            message,
            message_id=message_id,
            reason=REASON_DELIVERY_LIMIT,
            error=f"delivered {count} times, the limit is {limit}; last time: {why}",
            expires_at=expires_at,
        )
        return False

    copy = OutgoingMessage(
        destination=destination,
        message=message,
        headers={**headers, HEADER_DELIVERY_COUNT: count},
        task_id=message_id,
        eta=eta,
        expires_at=expires_at,
    )
    _publish(app, copy)
    logger.info(
        "Message %s on %s goes back to the queue (%s); delivery %d of at most %d",
        message_id,
        destination,
        why,
        count + 1,
        limit,
    )
    return True


def deaths_with(earlier: Any, queue: str, reason: str) -> list[dict[str, Any]]:
    """Return an ``x-death`` list with one more death from ``queue`` for ``reason``.

    As RabbitMQ does, one record is kept per queue and reason, with a count,
    and the latest death comes first. ``earlier`` is the list the message had
    when it was re-injected, if any.
    """
    deaths = [dict(death) for death in earlier or () if isinstance(death, dict)]
    same = next(
        (d for d in deaths if d.get("queue") == queue and d.get("reason") == reason), None
    )
    if same is not None:
        deaths.remove(same)
    count = int(same.get("count") or 0) + 1 if same else 1
    latest = {
        "count": count,
        "reason": reason,
        "queue": queue,
        "time": int(time.time()),
        "exchange": "",
        "routing-keys": [queue],
    }
    return [latest, *deaths]


def dead_letter(
    app: Celery,
    destination: Destination,
    headers: Mapping[str, Any],
    message: Any,
    *,
    message_id: str,
    reason: str,
    error: str | None = None,
    expires_at: str | None = None,
) -> None:
    """Move a message to the dead-letter queue of its destination.

    The message keeps its body, headers and id; ``x-death`` records the reason,
    the original queue and the time, and ``x-workflows-error`` the error.
    """
    queue = dead_letter_queue(destination.name)
    reinjected = headers.get(HEADER_REINJECTED)
    earlier = reinjected.get(HEADER_DEATH) if isinstance(reinjected, dict) else None
    record = OutgoingMessage(
        # The dead-lettered message keeps naming its original queue in the body,
        # so re-injecting it is publishing it there again.
        destination=destination,
        message=message,
        headers=dict(headers),
        task_id=message_id,
        broker_headers={
            HEADER_DEATH: deaths_with(earlier, destination.name, reason),
            HEADER_DEAD_LETTER_ERROR: {
                "error": error,
                "host": socket.gethostname(),
                "delivery-count": delivery_count(headers) + 1,
            },
        },
    )
    _publish(app, record, queue=queue)
    logger.error(
        "Message %s on %s moved to dead-letter queue %r (%s)%s",
        message_id,
        destination,
        queue,
        reason,
        f": {error}" if error else "",
    )


def dead_letter_raw(app: Celery, message: Message, reason: str, error: str) -> None:
    """Copy a message the worker cannot even decode to its dead-letter queue, byte for byte.

    Used for undecodable bodies, content types the worker does not accept
    (pickle), messages without headers and unknown task names. The dead-letter
    queue is named after the routing key (the queue, or the topic of a
    broadcast). The caller rejects the original.
    """
    info = message.delivery_info or {}
    queue = dead_letter_queue(str(info.get("routing_key") or "unknown"))
    headers = dict(message.headers or {})
    headers[HEADER_DEATH] = deaths_with(
        headers.get(HEADER_DEATH), str(info.get("routing_key")), REASON_REJECTED
    )
    headers[HEADER_DEAD_LETTER_ERROR] = {
        "error": f"{reason}: {error}",
        "host": socket.gethostname(),
        "delivery-count": 1,
    }
    publish_copy(app, message, queue, headers)
    logger.error(
        "Message %s on queue %r moved to dead-letter queue %r (%s: %s)",
        headers.get("id") or message.properties.get("message_id") or "without id",
        info.get("routing_key"),
        queue,
        reason,
        error,
    )


def publish_copy(app: Celery, message: Message, queue: str, headers: dict[str, Any]) -> None:
    """Publish the body of a received message, byte for byte, to ``queue`` with ``headers``."""
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            exchange="",
            routing_key=queue,
            declare=[routing.task_queue(queue)],
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=headers,
            delivery_mode=2,
            retry=True,
        )


def _publish(app: Celery, outgoing: OutgoingMessage, queue: str | None = None) -> None:
    from workflows_celery.transport import publish_messages

    publish_messages(app, [outgoing], queue=queue)
