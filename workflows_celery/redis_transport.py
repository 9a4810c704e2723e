"""kombu's Redis transport, made safe for at-least-once delivery.

Taking messages
    kombu takes a message off its Redis list with BRPOP and only then records
    it as unacknowledged, in a second command. A consumer killed between the
    two, or a connection lost between them (a Redis restart does exactly that),
    loses the message: Redis has already removed it, and it is recorded
    nowhere. Here one Lua script takes the message and records it as
    unacknowledged, so a message is always either in its queue or among the
    unacknowledged messages, which come back after the visibility timeout as
    in kombu. It also saves kombu's second round trip.

    Every poll first takes the first waiting message of any queue, in priority
    order, without blocking. When there is none, the consumer blocks on signal
    lists, one per queue, to which senders push a token with each message (in
    the same round trip, and in the same transaction when publishing
    together), then looks again. A message without a signal, from a sender
    that does not use this transport, is found within :data:`WAIT_S`.

Publishing together
    Messages published inside :func:`publishing_together` are sent in one
    MULTI/EXEC transaction: Redis stores all of them or none.

Apps set up by :func:`workflows_celery.setup_app` on a ``redis://`` broker use
this transport unless ``broker_transport`` names another one. With a global
key prefix, consumers take messages as kombu does, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from queue import Empty

import kombu.transport
from redis.exceptions import NoScriptError
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

#: Prefix of the lists that keep messages a consumer took but could not read
#: (not kombu's JSON envelope): ``<prefix><queue key>``.
UNREADABLE_PREFIX = "workflows.unreadable."

# Takes the first waiting message of the queue keys KEYS[3..], in priority
# order. ARGV[i] is '1' when the queue of KEYS[i] is consumed with
# acknowledgements. Then the script records the message as unacknowledged, as
# kombu's QoS.append does: in the index KEYS[1] with the score ARGV[1] (the
# time), and in the hash KEYS[2] as [message, exchange, routing key], the
# message text unchanged. Returns {key, message}. A message that is not
# kombu's JSON envelope goes to the list ARGV[2] .. key instead of being lost,
# and {key, false} is returned.
_TAKE = """
for i = 3, #KEYS do
    local message = redis.call('RPOP', KEYS[i])
    if message then
        local ok, tag, record = pcall(function()
            local properties = cjson.decode(message)['properties']
            local delivery = properties['delivery_info']
            return properties['delivery_tag'], '[' .. message .. ',' ..
                cjson.encode(delivery['exchange']) .. ',' ..
                cjson.encode(delivery['routing_key']) .. ']'
        end)
        if not ok or type(tag) ~= 'string' then
            redis.call('LPUSH', ARGV[2] .. KEYS[i], message)
            return {KEYS[i], false}
        end
        if ARGV[i] == '1' then
            redis.call('ZADD', KEYS[1], ARGV[1], tag)
            redis.call('HSET', KEYS[2], tag, record)
        end
        return {KEYS[i], message}
    end
end
return false
"""
_TAKE_SHA = hashlib.sha1(_TAKE.encode()).hexdigest()


def signal_key(queue: str) -> str:
    """Return the key of the signal list of ``queue``."""
    return f"{SIGNAL_PREFIX}{queue}"


class QoS(redis.QoS):
    """Skips kombu's second write for messages that :data:`_TAKE` recorded already."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        if self.channel.recorded_tag == delivery_tag:
            self.channel.recorded_tag = None
            # Recorded in Redis already: only this process's bookkeeping is left.
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)


class Channel(redis.Channel):
    """A Redis channel that takes messages atomically and can publish in one transaction."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._together = threading.local()
        self.recorded_tag: Any = None
        self._waiting = False
        self._script_loaded = False
        self._safe: bool | None = None
        # Queues read without acknowledgements (remote-control replies, say):
        # their messages are not recorded as unacknowledged, as in kombu.
        self._no_ack_queues: set[str] = set()
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: Any) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._no_ack_queues.discard(queue)
        return result

    # -- Taking messages ------------------------------------------------------------

    def _takes_safely(self) -> bool:
        if self._safe is None:
            # NOTE: key prefixes are not applied to the script's keys, so with a
            # global prefix messages are taken as kombu takes them.
            self._safe = not self.global_keyprefix
            if not self._safe:
                logger.warning(
                    "Redis global_keyprefix is set: messages are taken as kombu takes "
                    "them, and one can be lost if the connection drops as it is taken"
                )
        return self._safe

    def _brpop_start(self, timeout: Any = None) -> None:
        if not self._takes_safely():
            super()._brpop_start(timeout)
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if not self._script_loaded:
            # Loaded once per connection (and again after a Redis restart),
            # so that each poll sends the script's hash, not its text.
            self.client.script_load(_TAKE)
            self._script_loaded = True
        self._in_poll = self.client.connection
        # kombu's poller reads these two to watch the pending command.
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        if not self._waiting:
            # Without blocking: the first waiting message of any queue.
            pairs = [(queue, pri) for pri in self.priority_steps for queue in queues]
            keys = [self._q_for_pri(queue, pri) for queue, pri in pairs]
            record = ["0" if queue in self._no_ack_queues else "1" for queue, _ in pairs]
            self.client.connection.send_command(
                "EVALSHA",
                _TAKE_SHA,
                len(keys) + 2,
                self.unacked_index_key,
                self.unacked_key,
                *keys,
                time.time(),
                UNREADABLE_PREFIX,
                *record,
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
            command = "BRPOP" if waited else "EVALSHA"
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                self._script_loaded = False
                raise
            except NoScriptError:
                # Redis restarted without its scripts: load it again at the next poll.
                self._script_loaded = False
                raise Empty() from None
        finally:
            self._in_poll = None  # type: ignore[assignment]
        if waited:
            # Woken by a signal or by the timeout: look at every queue again.
            self._waiting = False
            raise Empty()
        if not reply:
            self._waiting = True
            raise Empty()
        key, message = _text(reply[0]), reply[1]
        if message is None:
            logger.error(
                "A message on Redis list %s is not a kombu message; it was moved to "
                "the list %s%s for inspection",
                key,
                UNREADABLE_PREFIX,
                key,
            )
            raise Empty()
        return self._deliver_recorded(key, _text(message))

    def _deliver_recorded(self, key: str, message: str) -> bool:
        payload = loads(message)
        queue = key.rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        self.recorded_tag = payload["properties"]["delivery_tag"]
        try:
            self.connection._deliver(payload, queue)
        finally:
            self.recorded_tag = None
        return True

    # -- Publishing -----------------------------------------------------------------

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        body = dumps(message)
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:
            self._queue_put(_BatchCommands(batch), queue, key, body)
            return
        with self.conn_or_acquire() as client:
            if getattr(self._together, "pipeline", None) is not None:
                # Publishing together: ``client`` is the open transaction.
                self._queue_put(client, queue, key, body)
                return
            # The message and its signal in one round trip.
            with client.pipeline(transaction=False) as pipeline:
                self._queue_put(pipeline, queue, key, body)
                pipeline.execute()

    def _queue_put(self, pipeline: Any, queue: str, key: str, body: str) -> None:
        """Queue on ``pipeline`` the commands that store one message and signal it."""
        pipeline.lpush(key, body)
        if self._expires and queue in self._expires:
            for priority in self.priority_steps:
                pipeline.pexpire(self._q_for_pri(queue, priority), self._expires[queue])
        signal = signal_key(queue)
        pipeline.lpush(signal, b"1")
        pipeline.ltrim(signal, 0, SIGNALS_KEPT - 1)
        pipeline.pexpire(signal, SIGNAL_TTL_MS)

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


class _BatchCommands:
    """kombu's publish batch, with the Redis command methods of a pipeline."""

    def __init__(self, batch: Any) -> None:
        self._batch = batch

    def __getattr__(self, command: str) -> Any:
        return lambda *args: self._batch.add(command, *args)


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
