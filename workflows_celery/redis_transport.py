"""kombu's Redis transport, made safe for at-least-once delivery.

Taking messages
    kombu takes a message off its Redis list with BRPOP and only then records
    it as unacknowledged, in a second command. A consumer killed between the
    two, or a connection lost between them (a Redis restart does exactly that),
    loses the message: Redis has already removed it, and it is recorded
    nowhere. Here a consumer moves the message, in one Lua script, to an
    in-flight list of its own, and records it as unacknowledged in a second
    script that also removes it from that list. An in-flight list whose owner
    stopped renewing its liveness key is pushed back to its queue by any other
    consumer. A message is therefore always in its queue, in an in-flight list
    or among the unacknowledged messages, and the last of these come back
    after the visibility timeout as in kombu.

    Every poll first takes the first waiting message of any queue, in priority
    order, without blocking. When there is none, the consumer blocks on signal
    lists, one per queue, to which senders push a token with each message (in
    the same transaction when publishing together), then looks again. A
    message without a signal, from a sender that does not use this transport,
    is found within :data:`WAIT_S`.

Publishing together
    Messages published inside :func:`publishing_together` are sent in one
    MULTI/EXEC transaction: Redis stores all of them or none.

Apps set up by :func:`workflows_celery.setup_app` on a ``redis://`` broker use
this transport unless ``broker_transport`` names another one. With a global
key prefix, consumers take messages as kombu does, with a warning.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from queue import Empty

import kombu.transport
from kombu.transport import redis, virtual
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

#: Name of this transport for kombu, as ``broker_transport`` gives it; kombu
#: shows it as the scheme of the broker URL in the worker's logs.
TRANSPORT_NAME = "workflows-redis"

kombu.transport.TRANSPORT_ALIASES.setdefault(
    TRANSPORT_NAME, "workflows_celery.redis_transport:Transport"
)

#: Maximum wait for a signal while the consumer is idle, in seconds. A message
#: whose sender gave no signal (a plain kombu sender, or a message given back
#: after a lost consumer) waits up to this long.
WAIT_S = 1.0

#: Prefix of the signal lists: a sender pushes a token to ``<prefix><queue>``
#: with each message, which wakes a consumer blocked on that list.
SIGNAL_PREFIX = "workflows.signal."

#: Tokens kept per signal list; more add nothing, because a woken consumer
#: looks at every queue it reads.
SIGNALS_KEPT = 10

#: Milliseconds after which an unread signal list is deleted. A token older
#: than :data:`WAIT_S` wakes no consumer, and reply queues come and go.
SIGNAL_TTL_MS = 60_000

#: Prefix of in-flight lists (``<prefix><consumer>:<queue key>``) and of
#: liveness keys (``<prefix><consumer>``).
IN_FLIGHT_PREFIX = "workflows.inflight."

# Takes the first waiting message of KEYS (queue keys in priority order) and
# moves it to the in-flight list ARGV[1] .. ':' .. key; returns {key, message}.
_TAKE = """
for i, key in ipairs(KEYS) do
    local message = redis.call('RPOP', key)
    if message then
        redis.call('LPUSH', ARGV[1] .. ':' .. key, message)
        return {key, message}
    end
end
return false
"""

# Records a taken message as unacknowledged, unless a recovery already gave it
# back to its queue. KEYS: in-flight list, unacked index, unacked hash.
# ARGV: message, delivery tag, time, unacked record.
_RECORD = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
    redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
    return 1
end
return 0
"""

# Gives the messages of an in-flight list back to its queue when the list's
# owner is gone. KEYS: in-flight list, liveness key, queue key.
_RECOVER = """
if redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
end
local moved = 0
while true do
    local message = redis.call('RPOP', KEYS[1])
    if not message then
        return moved
    end
    redis.call('RPUSH', KEYS[3], message)
    moved = moved + 1
end
"""


def signal_key(queue: str) -> str:
    """Return the key of the signal list of ``queue``."""
    return f"{SIGNAL_PREFIX}{queue}"


class QoS(redis.QoS):
    """Skips the second write for messages already recorded by :data:`_RECORD`,
    and gives back in-flight lists of consumers that are gone."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        if self.channel.recorded_tag == delivery_tag:
            self.channel.recorded_tag = None
            # Recorded in Redis already: only this process's bookkeeping is left.
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        super().restore_visible(*args, **kwargs)
        self.channel.recover_in_flight()


class Channel(redis.Channel):
    """A Redis channel that takes messages atomically and can publish in one transaction."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._together = threading.local()
        self.recorded_tag: Any = None
        self.consumer_id = uuid.uuid4().hex
        self._waiting = False
        self._alive_until = 0.0
        self._safe: bool | None = None
        super().__init__(*args, **kwargs)

    # -- Taking messages ------------------------------------------------------------

    @property
    def liveness_key(self) -> str:
        """Key that exists while this consumer may still record its in-flight messages."""
        return f"{IN_FLIGHT_PREFIX}{self.consumer_id}"

    def in_flight_key(self, queue_key: str) -> str:
        """This consumer's in-flight list for messages taken off ``queue_key``."""
        return f"{self.liveness_key}:{queue_key}"

    def _takes_safely(self) -> bool:
        if self._safe is None:
            # NOTE: key prefixes are not applied to the scripts' keys, so with a
            # global prefix messages are taken as kombu takes them.
            self._safe = not self.global_keyprefix
            if not self._safe:
                logger.warning(
                    "Redis global_keyprefix is set: messages are taken as kombu takes "
                    "them, and one can be lost if the connection drops as it is taken"
                )
        return self._safe

    def _keep_alive(self) -> None:
        now = time.monotonic()
        if now < self._alive_until:
            return
        ttl_s = max(float(self.visibility_timeout), 1.0)
        with self.conn_or_acquire() as client:
            client.set(self.liveness_key, b"1", px=int(ttl_s * 1000))
        self._alive_until = now + ttl_s / 4

    def _brpop_start(self, timeout: Any = None) -> None:
        if not self._takes_safely():
            super()._brpop_start(timeout)
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._keep_alive()
        self._in_poll = self.client.connection
        # kombu's poller reads these two to watch the pending command.
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        if not self._waiting:
            # Without blocking: the first waiting message of any queue.
            keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
            self.client.connection.send_command(
                "EVAL", _TAKE, len(keys), *keys, self.liveness_key
            )
            return
        # Nothing was waiting: sleep until a sender signals a new message.
        wait_s = float(timeout or self.brpop_timeout or WAIT_S)
        signals = [signal_key(queue) for queue in queues]
        self.client.connection.send_command("BRPOP", *signals, wait_s)

    def _brpop_read(self, **options: Any) -> bool:
        if not self._takes_safely():
            return bool(super()._brpop_read(**options))
        waited = self._waiting
        try:
            command = "BRPOP" if waited else "EVAL"
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
        finally:
            self._in_poll = None  # type: ignore[assignment]
        if waited:
            # Woken by a signal or by the timeout: look at every queue again.
            self._waiting = False
            raise Empty()
        if not reply:
            self._waiting = True
            raise Empty()
        key, message = (_text(part) for part in reply)
        return self._record_and_deliver(key, message)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        super()._put(queue, message, **kwargs)
        key = signal_key(queue)
        batch = kwargs.get("_publish_batch")
        if batch is not None:
            batch.add("lpush", key, b"1")
            batch.add("ltrim", key, 0, SIGNALS_KEPT - 1)
            batch.add("pexpire", key, SIGNAL_TTL_MS)
            return
        together = getattr(self._together, "pipeline", None)
        if together is not None:
            # Publishing together: the signal goes in the same transaction.
            _signal(together, key)
            return
        with self.conn_or_acquire() as client:
            with client.pipeline() as pipeline:
                _signal(pipeline, key)
                pipeline.execute()

    def _record_and_deliver(self, key: str, message: str) -> bool:
        payload = loads(message)
        properties = payload["properties"]
        delivery = properties["delivery_info"]
        tag = properties["delivery_tag"]
        record = dumps([payload, delivery["exchange"], delivery["routing_key"]])

        with self.conn_or_acquire() as client:
            kept = client.eval(
                _RECORD,
                3,
                self.in_flight_key(key),
                self.unacked_index_key,
                self.unacked_key,
                message,
                tag,
                time.time(),
                record,
            )
        if not kept:
            logger.warning(
                "Message %s was given back to its queue while this consumer was busy", tag
            )
            raise Empty()

        queue = key.rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        self.recorded_tag = tag
        try:
            self.connection._deliver(payload, queue)
        finally:
            self.recorded_tag = None
        return True

    def recover_in_flight(self) -> int:
        """Give the in-flight messages of consumers that are gone back to their queues."""
        if not self._takes_safely():
            return 0
        moved = 0
        with self.conn_or_acquire() as client:
            for raw_key in client.scan_iter(match=f"{IN_FLIGHT_PREFIX}*:*", count=100):
                key = _text(raw_key)
                owner, _, queue_key = key.partition(":")
                moved += int(client.eval(_RECOVER, 3, key, owner, queue_key) or 0)
        if moved:
            logger.warning(
                "Gave %d messages taken by a consumer that is gone back to their queues",
                moved,
            )
        return moved

    def close(self) -> None:
        if self._safe:
            try:
                with self.conn_or_acquire() as client:
                    client.delete(self.liveness_key)
            except self.connection_errors:
                # The key expires by itself; other consumers then recover the list.
                logger.debug("Could not delete liveness key %s", self.liveness_key)
        super().close()

    # -- Publishing together ---------------------------------------------------------

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        pipeline = getattr(self._together, "pipeline", None)
        if client is None and pipeline is not None:
            # Publishing together: every command goes into the open transaction.
            yield pipeline
            return
        with super().conn_or_acquire(client) as acquired:
            yield acquired

    @contextmanager
    def together(self) -> Iterator[None]:
        """Buffer what this thread publishes on the channel, and send it in one transaction."""
        if getattr(self._together, "pipeline", None) is not None:
            yield
            return
        with super().conn_or_acquire() as client:
            pipeline = client.pipeline(transaction=True)
            self._together.pipeline = pipeline
            try:
                yield
            except BaseException:
                pipeline.reset()
                raise
            finally:
                self._together.pipeline = None
            pipeline.execute()


def _signal(pipeline: Any, key: str) -> None:
    """Queue the commands that push one token to the signal list ``key``."""
    pipeline.lpush(key, b"1").ltrim(key, 0, SIGNALS_KEPT - 1).pexpire(key, SIGNAL_TTL_MS)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Transport(redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


@contextmanager
def publishing_together(channel: Any) -> Iterator[None]:
    """Publish everything sent on ``channel`` in this block at once, or nothing.

    On this module's Redis channels the messages go in one MULTI/EXEC
    transaction. Other channels are returned unchanged: the caller deals with
    them (AMQP transactions on RabbitMQ, nothing to do in memory).
    """
    together = getattr(channel, "together", None)
    if together is None:
        yield
        return
    with together():
        yield
