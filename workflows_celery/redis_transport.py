"""kombu's Redis transport, made safe for at-least-once delivery.

Taking messages
    kombu takes a message off its Redis list with BRPOP and only then records
    it as unacknowledged, in a second command. A consumer killed between the
    two, or a connection lost between them (a Redis restart does exactly that),
    loses the message: Redis has already removed it, and it is recorded
    nowhere. Here a consumer moves the message, in one atomic command, to an
    in-flight list of its own, and records it as unacknowledged in one Lua
    script that also removes it from that list. An in-flight list whose owner
    stopped renewing its liveness key is pushed back to its queue by any other
    consumer. A message is therefore always in its queue, in an in-flight list
    or among the unacknowledged messages, and the last of these come back
    after the visibility timeout as in kombu.

    Every poll first takes the first waiting message of any queue, in priority
    order, without blocking. When there is none, it blocks on one queue for at
    most :data:`WAIT_S`, taking the queues in turn. So when the consumer is
    idle, a message on another queue waits up to that long.

Publishing together
    Messages published inside :func:`publishing_together` are sent in one
    MULTI/EXEC transaction: Redis stores all of them or none.

Apps set up by :func:`workflows_celery.setup_app` on a ``redis://`` broker use
this transport unless ``broker_transport`` names another one. It needs Redis
6.2 or newer (for BLMOVE); on an older server, or with a global key prefix,
consumers take messages as kombu does, with a warning.
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

#: Maximum wait on one queue while the consumer is idle, in seconds.
WAIT_S = 0.1

#: Prefix of in-flight lists (``<prefix><consumer>:<queue key>``) and of
#: liveness keys (``<prefix><consumer>``).
IN_FLIGHT_PREFIX = "workflows.inflight."

#: Oldest Redis version with BLMOVE.
_MIN_REDIS_VERSION = (6, 2)

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
        self._waiting_on: str | None = None
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
            self._safe = True
            if self.global_keyprefix:
                self._safe = False
                logger.warning(
                    "Redis global_keyprefix is set: messages are taken as kombu takes "
                    "them, and one can be lost if the connection drops as it is taken"
                )
            else:
                with self.conn_or_acquire() as client:
                    version = str(client.info("server").get("redis_version", "0"))
                parts = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
                if parts < _MIN_REDIS_VERSION:
                    self._safe = False
                    logger.warning(
                        "Redis %s has no BLMOVE: messages are taken as kombu takes them, "
                        "and one can be lost if the connection drops as it is taken; "
                        "use Redis 6.2 or newer",
                        version,
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
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._keep_alive()
        self._in_poll = self.client.connection
        # kombu's poller reads these two to watch the pending command.
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        if self._waiting_on is None:
            # Without blocking: the first waiting message of any queue.
            self.client.connection.send_command(
                "EVAL", _TAKE, len(keys), *keys, self.liveness_key
            )
            return
        # Nothing was waiting: block on one queue, in turn.
        wait_s = min(float(timeout or self.brpop_timeout or WAIT_S), WAIT_S)
        self._waiting_on = keys[0]
        self.client.connection.send_command(
            "BLMOVE", keys[0], self.in_flight_key(keys[0]), "RIGHT", "LEFT", wait_s
        )

    def _brpop_read(self, **options: Any) -> bool:
        if not self._takes_safely():
            return bool(super()._brpop_read(**options))
        waited_on = self._waiting_on
        try:
            command = "EVAL" if waited_on is None else "BLMOVE"
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if waited_on is None:
                if not reply:
                    self._waiting_on = ""  # block on the next poll
                    raise Empty()
                key, message = (_text(part) for part in reply)
            else:
                self._waiting_on = None
                if not reply:
                    # Wait on the next queue next time.
                    self._queue_cycle.rotate(waited_on.rsplit(self.sep, 1)[0])
                    raise Empty()
                key, message = waited_on, _text(reply)
        finally:
            self._in_poll = None  # type: ignore[assignment]
        self._waiting_on = None
        return self._record_and_deliver(key, message)

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
