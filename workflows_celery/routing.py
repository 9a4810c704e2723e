"""kombu queues and exchanges for workflows queue names and topic names.

Senders and workers build their kombu entities here, so both declare a queue
with the same attributes (RabbitMQ rejects a second declaration that differs).
"""

from __future__ import annotations

import uuid

from kombu import Exchange, Queue

from workflows_celery.constants import TEMPORARY_QUEUE_PREFIX


def task_queue(name: str) -> Queue:
    """Build the durable queue that carries workflows messages for ``name``.

    Messages go through the default exchange with the queue name as routing key,
    which both RabbitMQ and kombu's Redis and in-memory transports support, so a
    queue exists as soon as a sender declares it.
    """
    return Queue(name, routing_key=name, durable=True, auto_delete=False)


def is_temporary_queue(name: str) -> bool:
    """Tell whether ``name`` is a queue made by ``subscribe_temporary``."""
    return name.startswith(TEMPORARY_QUEUE_PREFIX)


def temporary_queue_name(hint: str | None) -> str:
    """Make a unique name for a private queue, keeping the caller's hint readable."""
    suffix = uuid.uuid4().hex
    if hint:
        return f"{TEMPORARY_QUEUE_PREFIX}{hint}.{suffix}"
    return f"{TEMPORARY_QUEUE_PREFIX}{suffix}"


def temporary_queue(name: str) -> Queue:
    """Build a private queue that the broker deletes when its consumer goes away."""
    return Queue(name, routing_key=name, durable=False, auto_delete=True)


def topic_exchange(topic: str) -> Exchange:
    """Build the fanout exchange of a workflows topic.

    Broadcasts are transient by design, so the exchange is not durable.
    """
    return Exchange(topic, type="fanout", durable=False, auto_delete=False)


def topic_queue(topic: str, subscriber: str | None = None) -> Queue:
    """Build one subscriber's queue on a topic.

    Each subscriber has its own queue bound to the topic's fanout exchange, so
    every subscriber receives every broadcast once. The routing key is the topic
    name on both sides, because kombu's Redis transport publishes and subscribes
    fanout messages on a channel named after exchange and routing key.
    """
    name = f"{topic}.bcast.{subscriber or uuid.uuid4().hex}"
    return Queue(
        name,
        exchange=topic_exchange(topic),
        routing_key=topic,
        durable=False,
        auto_delete=True,
    )
