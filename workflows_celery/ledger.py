"""The run ledger: what each recipe run did, and whether it has finished, kept in Redis.

Neither workflows nor Celery records when a message-driven run has ended: any
step may send any number of messages, now or after a delay. The ledger
counts them. For each run (its ``environment["ID"]``) it keeps the set S of
messages sent to queues and the set D of messages whose step has ended. The
run is in flight while S has a message that D lacks, and it has finished
once its start was recorded and every message of S is in D.

A step's messages are added to S in the same atomic update that adds the
step's own message to D, when the step ends. A message sent by a step is
published before that update, so its own step may end first: its message is
then in D before it is in S, which the count allows for. Messages sent
outside a step (a run's first messages, a service's timer) are added to S
before they are published. The counts are therefore right with fan-out known
only at run time, with delays (a delayed message stays in S until its step
ends), and with checkpoints (a checkpoint is a message like any other).

A run whose message was dead-lettered is ``failed`` once nothing is left in
flight. A ``cancelled`` run's messages are dropped by the worker that takes
them, before any service receives them, and steps that were already running
finish.

Each run has a few keys named ``workflows.run...:<run ID>``, which expire a
week (``workflows_ledger_ttl``) after the run's last update, and the sorted
set ``workflows.runs`` lists runs by start time. The ledger is on by default
on Redis: the result backend if it is Redis, else the broker if it is Redis.
``workflows_ledger_url`` names another Redis, and ``workflows_ledger = False``
turns it off.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from workflows_celery.constants import (
    SETTING_LEDGER,
    SETTING_LEDGER_TTL,
    SETTING_LEDGER_URL,
    SETTING_NAMESPACE,
)
from workflows_celery.errors import ConfigurationError, WorkflowsCeleryError
from workflows_celery.messages import OutgoingMessage
from workflows_celery.redaction import mask_url

logger = logging.getLogger(__name__)

#: Seconds a run's records are kept after its last update.
DEFAULT_LEDGER_TTL_S = 7 * 24 * 3600

#: Steps kept per run; a larger run keeps its latest steps and counts all.
MAX_STEPS_KEPT = 10_000

#: Seconds between two reads of a run by :meth:`Ledger.wait`.
WAIT_POLL_S = 0.1

#: Seconds a ledger command may wait for Redis before the step goes on without it.
LEDGER_SOCKET_TIMEOUT_S = 5.0

#: Seconds between two warnings that the ledger cannot be reached.
WARNING_INTERVAL_S = 60.0

#: Seconds after a failed write during which the ledger is not tried again.
RETRY_AFTER_FAILURE_S = 5.0

#: Seconds between two reads of the cancelled runs by a worker process. The
#: cancel broadcast reaches running workers at once; the read catches workers
#: that started later or missed the broadcast while the broker was away.
CANCELLED_REFRESH_S = 5.0

#: States of a run.
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
CANCELLED = "cancelled"

#: Outcomes of a step, as the ledger records them.
STEP_DONE = "done"
STEP_DEAD_LETTERED = "dead-lettered"
STEP_RETRIED = "retried"
STEP_CANCELLED = "cancelled"
STEP_BROADCAST = "broadcast"

#: Outcomes after which the step's message is no longer in flight.
_ENDING_OUTCOMES = frozenset({STEP_DONE, STEP_DEAD_LETTERED, STEP_CANCELLED})

# The functions every script shares. KEYS: run hash, sent set, done set, edge
# hash, step list, run index. The run hash counts in_flight = |S - D|.
_COMMON = """
local run, sent, done, edges = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function add_sent(id)
  if redis.call('SADD', sent, id) == 1 then
    redis.call('HINCRBY', run, 'sent', 1)
    if redis.call('SISMEMBER', done, id) == 0 then
      redis.call('HINCRBY', run, 'in_flight', 1)
    end
  end
end
local function add_done(id)
  if redis.call('SADD', done, id) == 1 then
    if redis.call('SISMEMBER', sent, id) == 1 then
      redis.call('HINCRBY', run, 'in_flight', -1)
    end
  end
end
local function add_children(first, count)
  for i = 0, count - 1 do
    add_sent(ARGV[first + 2 * i])
    redis.call('HINCRBY', edges, ARGV[first + 2 * i + 1], 1)
  end
end
local function settle(now, ttl)
  local state = redis.call('HGET', run, 'state')
  if state ~= 'cancelled' then
    local in_flight = tonumber(redis.call('HGET', run, 'in_flight') or '0')
    if redis.call('HGET', run, 'started') == '1' and in_flight <= 0 then
      local ended = 'finished'
      if tonumber(redis.call('HGET', run, 'failed') or '0') > 0 then ended = 'failed' end
      if state ~= ended then redis.call('HSET', run, 'state', ended, 'finished_at', now) end
    elseif state ~= 'running' then
      redis.call('HSET', run, 'state', 'running')
      redis.call('HDEL', run, 'finished_at')
    end
  end
  redis.call('HSET', run, 'updated_at', now)
  for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
end
"""

# ARGV: now, ttl, run ID, origin, index cutoff, child count, then (ID, edge) pairs.
_START = _COMMON + """
redis.call('HSET', run, 'started', '1')
redis.call('HSETNX', run, 'started_at', ARGV[1])
redis.call('HSETNX', run, 'origin', ARGV[4])
redis.call('HSETNX', run, 'state', 'running')
add_children(7, tonumber(ARGV[6]))
redis.call('ZADD', KEYS[6], ARGV[1], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[5])
settle(ARGV[1], ARGV[2])
"""

# ARGV: now, ttl, child count, then (ID, edge) pairs.
_SENT = _COMMON + """
add_children(4, tonumber(ARGV[3]))
settle(ARGV[1], ARGV[2])
"""

# ARGV: now, ttl, message ID, outcome, step JSON or '', max steps, ends (0/1),
# failed (0/1), child count, then (ID, edge) pairs.
_STEP = _COMMON + """
add_children(10, tonumber(ARGV[9]))
if ARGV[7] == '1' then add_done(ARGV[3]) end
if ARGV[8] == '1' then redis.call('HINCRBY', run, 'failed', 1) end
if ARGV[5] ~= '' then
  redis.call('RPUSH', KEYS[5], ARGV[5])
  redis.call('LTRIM', KEYS[5], -tonumber(ARGV[6]), -1)
  redis.call('HINCRBY', run, 'steps', 1)
end
settle(ARGV[1], ARGV[2])
"""

# ARGV: now, ttl, message ID.
_REINJECTED = _COMMON + """
if redis.call('SREM', done, ARGV[3]) == 1 and redis.call('SISMEMBER', sent, ARGV[3]) == 1 then
  redis.call('HINCRBY', run, 'in_flight', 1)
  local failed = tonumber(redis.call('HGET', run, 'failed') or '0')
  if failed > 0 then redis.call('HINCRBY', run, 'failed', -1) end
end
settle(ARGV[1], ARGV[2])
"""


class LedgerError(WorkflowsCeleryError):
    """Raised when a run is not in the ledger, or cannot be cancelled."""


class LedgerUnavailableError(LedgerError):
    """Raised when the ledger's Redis cannot be reached."""


@dataclass(frozen=True)
class LedgerStep:
    """One step of a run as the ledger recorded it."""

    node: int | None
    service: str
    destination: str
    worker: str
    started_at: float
    ended_at: float
    outcome: str
    #: The node whose step sent the message; ``None`` for a first message.
    sender: int | None
    message_id: str
    error: str | None = None


@dataclass
class RunRecord:
    """A run as the ledger recorded it."""

    run_id: str
    state: str
    started_at: float | None
    updated_at: float | None
    finished_at: float | None
    origin: str
    in_flight: int
    sent: int
    failed: int
    step_count: int
    steps: list[LedgerStep] = field(default_factory=list)
    #: Messages that crossed each edge: (sending node or None for start, receiving node).
    edges: dict[tuple[int | None, int | None], int] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        """Tell whether the run will do nothing more: finished, failed, or cancelled with nothing in flight."""
        return self.state in (FINISHED, FAILED) or (self.state == CANCELLED and self.in_flight <= 0)

    def as_dict(self) -> dict[str, Any]:
        """Return the run as JSON-ready data, e.g. for a web view."""
        return {
            "run_id": self.run_id,
            "state": self.state,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "origin": self.origin,
            "in_flight": self.in_flight,
            "sent": self.sent,
            "failed": self.failed,
            "step_count": self.step_count,
            "steps": [step.__dict__ for step in self.steps],
            "edges": [
                {"from": sender, "to": node, "messages": count}
                for (sender, node), count in sorted(self.edges.items(), key=_edge_order)
            ],
        }


def _edge_order(item: tuple[tuple[int | None, int | None], int]) -> tuple[int, int]:
    (sender, node), _ = item
    return (-1 if sender is None else sender, -1 if node is None else node)


def _edge_key(sender: int | None, node: Any) -> str:
    return f"{'start' if sender is None else sender}>{node}"


def _parse_edge(key: str) -> tuple[int | None, int | None]:
    sender, _, node = key.partition(">")
    return (None if sender == "start" else _int_or_none(sender), _int_or_none(node))


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def recipe_pointer(outgoing: OutgoingMessage) -> Any:
    """Return the node a recipe message is for."""
    message = outgoing.message
    return message.get("recipe-pointer") if isinstance(message, Mapping) else None


class Ledger:
    """Records runs in one Redis database and reads them back."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str | None = None,
        ttl_s: float = DEFAULT_LEDGER_TTL_S,
        connect_timeout_s: float = LEDGER_SOCKET_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.ttl_s = int(ttl_s)
        self._index = f"workflows.runs.{namespace}" if namespace else "workflows.runs"
        self._cancelled_index = f"workflows.cancelled.{namespace}" if namespace else "workflows.cancelled"
        self._cancelled: set[str] = set()
        #: Runs noted as cancelled since the last read of the cancelled runs.
        self._noted: set[str] = set()
        self._cancelled_read_at = 0.0
        self._cancelled_lock = threading.Lock()
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=LEDGER_SOCKET_TIMEOUT_S,
            socket_connect_timeout=connect_timeout_s,
        )
        self._start = self.client.register_script(_START)
        self._sent = self.client.register_script(_SENT)
        self._step = self.client.register_script(_STEP)
        self._reinjected = self.client.register_script(_REINJECTED)
        self._last_warning = 0.0
        self._skip_until = 0.0

    def __repr__(self) -> str:
        return f"<Ledger {mask_url(self.url)}>"

    def _keys(self, run_id: str) -> list[str]:
        # The run ID comes last and each kind of key has its own prefix, so no
        # run ID can name another run's keys.
        return [
            f"workflows.run:{run_id}",
            f"workflows.run.sent:{run_id}",
            f"workflows.run.done:{run_id}",
            f"workflows.run.edges:{run_id}",
            f"workflows.run.steps:{run_id}",
            self._index,
        ]

    # -- Recording -------------------------------------------------------------------

    def record_start(self, run_id: str, messages: list[OutgoingMessage], origin: str) -> None:
        """Record a run's start and its first messages, before they are published."""
        now = time.time()
        children = _children(messages, sender=None)
        self._call(
            self._start,
            run_id,
            [now, self.ttl_s, run_id, origin, now - self.ttl_s, len(children) // 2, *children],
        )

    def record_sent(self, run_id: str, messages: list[OutgoingMessage], sender: int | None) -> None:
        """Record messages sent outside a step, before they are published."""
        children = _children(messages, sender)
        if children:
            self._call(self._sent, run_id, [time.time(), self.ttl_s, len(children) // 2, *children])

    def record_step(
        self,
        run_id: str,
        step: LedgerStep,
        sends: list[OutgoingMessage],
    ) -> None:
        """Record a step that ended, with the messages it sent, in one update."""
        children = _children(sends, step.node)
        ends = step.outcome in _ENDING_OUTCOMES
        self._call(
            self._step,
            run_id,
            [
                time.time(),
                self.ttl_s,
                step.message_id,
                step.outcome,
                json.dumps(step.__dict__),
                MAX_STEPS_KEPT,
                int(ends),
                int(step.outcome == STEP_DEAD_LETTERED),
                len(children) // 2,
                *children,
            ],
        )

    def record_unsent(self, run_id: str, message_id: str) -> None:
        """Count a message recorded as sent, whose publishing then failed, as ended."""
        self._call(
            self._step,
            run_id,
            [time.time(), self.ttl_s, message_id, "unsent", "", MAX_STEPS_KEPT, 1, 0, 0],
        )

    def record_reinjected(self, run_id: str, message_id: str) -> None:
        """Count a dead-lettered message that was re-injected as in flight again."""
        self._call(self._reinjected, run_id, [time.time(), self.ttl_s, message_id])

    def _call(self, script: Any, run_id: str, args: list[Any]) -> None:
        if time.monotonic() < self._skip_until:
            # The last attempt failed moments ago: waiting out another connect
            # timeout would only delay the step or the start further.
            logger.debug("Run %s not recorded: the ledger %s failed moments ago", run_id, mask_url(self.url))
            return
        try:
            script(keys=self._keys(run_id), args=args)
        except redis.RedisError as error:
            # The ledger only observes: a step must not fail because of it.
            self._skip_until = time.monotonic() + RETRY_AFTER_FAILURE_S
            self._warn("Cannot record run %s in the ledger %s: %s", run_id, mask_url(self.url), error)

    def _warn(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARNING_INTERVAL_S:
            self._last_warning = now
            logger.warning(text + " (repeats are not logged for %.0f s)", *args, WARNING_INTERVAL_S)

    # -- Cancelling ------------------------------------------------------------------

    def is_cancelled(self, run_id: str) -> bool:
        """Tell whether the run is cancelled, as far as this process has heard.

        Like Celery's ``revoke``, a cancel reaches workers as a broadcast
        (:func:`workflows_celery.control.cancel_run`), which calls
        :meth:`note_cancelled`. The cancelled runs are also read from Redis at
        most every ``CANCELLED_REFRESH_S``, so the check costs no round trip
        per step.
        """
        now = time.monotonic()
        if now - self._cancelled_read_at >= CANCELLED_REFRESH_S:
            self._cancelled_read_at = now
            try:
                since = time.time() - self.ttl_s
                members = self.client.zrangebyscore(self._cancelled_index, since, "+inf")
            except redis.RedisError as error:
                self._warn("Cannot read the cancelled runs from the ledger %s: %s", mask_url(self.url), error)
            else:
                # Replaced rather than added to, so that runs whose records
                # expired leave memory.
                with self._cancelled_lock:
                    read = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
                    # Cancels noted while the read was on its way are kept too.
                    self._cancelled = read | self._noted
                    self._noted = set()
        return run_id in self._cancelled

    def note_cancelled(self, run_id: str) -> None:
        """Remember in this process that the run was cancelled."""
        with self._cancelled_lock:
            self._cancelled.add(run_id)
            self._noted.add(run_id)

    def cancel(self, run_id: str) -> RunRecord:
        """Mark a run cancelled in the ledger.

        Workers learn of it from the ledger within ``CANCELLED_REFRESH_S``;
        :func:`workflows_celery.control.cancel_run` also broadcasts the cancel at once.

        Raises:
            LedgerError: the run is not in the ledger, or has ended already.
        """
        record = self.get(run_id)
        if record.state in (FINISHED, FAILED):
            raise LedgerError(f"Run {run_id} has already {record.state}; there is nothing to cancel")
        now = time.time()
        with self.client.pipeline(transaction=True) as pipeline:
            pipeline.hset(self._keys(run_id)[0], mapping={"state": CANCELLED, "cancelled_at": now})
            pipeline.zadd(self._cancelled_index, {run_id: now})
            pipeline.zremrangebyscore(self._cancelled_index, "-inf", now - self.ttl_s)
            pipeline.execute()
        self.note_cancelled(run_id)
        return self.get(run_id)

    # -- Reading ---------------------------------------------------------------------

    def get(self, run_id: str, *, steps: bool = True) -> RunRecord:
        """Read one run.

        Raises:
            LedgerError: the run is not in the ledger (never started, started
                with the ledger off, or expired), or Redis cannot be reached.
        """
        keys = self._keys(run_id)
        try:
            with self.client.pipeline(transaction=True) as pipeline:
                pipeline.hgetall(keys[0])
                pipeline.hgetall(keys[3])
                pipeline.lrange(keys[4], 0, -1) if steps else pipeline.llen(keys[4])
                fields, edges, step_entries = pipeline.execute()
        except redis.RedisError as error:
            raise LedgerUnavailableError(
                f"Cannot read run {run_id} from the ledger {mask_url(self.url)}: {error}"
            ) from None
        if not fields:
            raise LedgerError(
                f"Run {run_id} is not in the ledger {mask_url(self.url)}: it was never started "
                f"there, was started with the ledger off, or expired after {self.ttl_s} s"
            )
        text = {key.decode(): value.decode() for key, value in fields.items()}
        record = RunRecord(
            run_id=run_id,
            state=text.get("state", RUNNING),
            started_at=_float_or_none(text.get("started_at")),
            updated_at=_float_or_none(text.get("updated_at")),
            finished_at=_float_or_none(text.get("finished_at")),
            origin=text.get("origin", ""),
            in_flight=int(text.get("in_flight", 0)),
            sent=int(text.get("sent", 0)),
            failed=int(text.get("failed", 0)),
            step_count=int(text.get("steps", 0)),
            edges={_parse_edge(key.decode()): int(count) for key, count in edges.items()},
        )
        if steps:
            record.steps = [LedgerStep(**json.loads(entry)) for entry in step_entries]
        return record

    def recent(self, limit: int = 20) -> list[RunRecord]:
        """Return the latest runs, newest first, without their steps."""
        try:
            members = self.client.zrevrange(self._index, 0, max(limit, 1) - 1)
            run_ids = [value.decode() if isinstance(value, bytes) else str(value) for value in members]
        except redis.RedisError as error:
            raise LedgerUnavailableError(f"Cannot list runs in the ledger {mask_url(self.url)}: {error}") from None
        found = []
        for run_id in run_ids:
            try:
                found.append(self.get(run_id, steps=False))
            except LedgerError:
                logger.debug("Run %s expired from the ledger", run_id)
        return found

    def wait(self, run_id: str, timeout_s: float) -> RunRecord:
        """Wait until the run has ended (see :attr:`RunRecord.ended`) and return it.

        Raises:
            LedgerError: the run is not in the ledger.
            TimeoutError: the run has not ended after ``timeout_s``; the
                message gives its state and how many messages are in flight.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.get(run_id, steps=False)
            if record.ended:
                return self.get(run_id)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Run {run_id} is still {record.state} after {timeout_s:g} s, with "
                    f"{record.in_flight} message(s) in flight"
                )
            time.sleep(WAIT_POLL_S)


def _children(messages: list[OutgoingMessage], sender: int | None) -> list[Any]:
    """Flatten the queue messages of a send into (message ID, edge) pairs for the scripts."""
    pairs: list[Any] = []
    for outgoing in messages:
        if outgoing.destination.is_topic:
            # NOTE: broadcasts are not counted, because the number of subscribers
            # is not known. So a run can look finished while a topic's subscriber
            # has yet to run.
            continue
        pairs += [outgoing.task_id, _edge_key(sender, recipe_pointer(outgoing))]
    return pairs


# -- Finding the ledger of an app ------------------------------------------------------

_ledgers: weakref.WeakKeyDictionary[Celery, Ledger | None] = weakref.WeakKeyDictionary()
_ledgers_lock = threading.Lock()


def ledger_url(app: Celery) -> str | None:
    """Return the Redis URL of ``app``'s ledger, or None when it has none."""
    if app.conf.get(SETTING_LEDGER) is False:
        return None
    configured = app.conf.get(SETTING_LEDGER_URL)
    if configured:
        if not str(configured).startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                f"{SETTING_LEDGER_URL}={mask_url(str(configured))} is not a Redis URL; the run "
                "ledger needs Redis, e.g. redis://127.0.0.1:6379/0"
            )
        return str(configured)
    for candidate in (app.conf.result_backend, app.conf.broker_url):
        if isinstance(candidate, str) and candidate.startswith(("redis://", "rediss://")):
            return candidate
    return None


def ledger_for(app: Celery) -> Ledger | None:
    """Return ``app``'s ledger, made on first use, or None when the app has none."""
    with _ledgers_lock:
        if app in _ledgers:
            return _ledgers[app]
        url = ledger_url(app)
        ledger = None
        if url is not None:
            ttl = app.conf.get(SETTING_LEDGER_TTL) or DEFAULT_LEDGER_TTL_S
            # The broker's connect timeout, so that a start waits no longer
            # for the ledger than for the broker.
            connect_timeout = min(float(app.conf.broker_connection_timeout or LEDGER_SOCKET_TIMEOUT_S), LEDGER_SOCKET_TIMEOUT_S)
            ledger = Ledger(
                url,
                namespace=app.conf.get(SETTING_NAMESPACE),
                ttl_s=float(ttl),
                connect_timeout_s=connect_timeout,
            )
        _ledgers[app] = ledger
        return ledger


def require_ledger(app: Celery) -> Ledger:
    """Return ``app``'s ledger.

    Raises:
        ConfigurationError: the app has no ledger.
    """
    ledger = ledger_for(app)
    if ledger is None and app.conf.get(SETTING_LEDGER) is False:
        raise ConfigurationError(f"The run ledger is off: the app sets {SETTING_LEDGER} = False")
    if ledger is None:
        raise ConfigurationError(
            f"No run ledger for broker {mask_url(str(app.conf.broker_url))}: the ledger needs "
            f"Redis; set {SETTING_LEDGER_URL} (e.g. redis://127.0.0.1:6379/0) or use a Redis "
            "broker or result backend"
        )
    return ledger


# -- The step a worker thread is running -----------------------------------------------


@dataclass
class StepSends:
    """The queue messages a running step sent, recorded when the step ends."""

    run_id: str
    messages: list[OutgoingMessage] = field(default_factory=list)
    #: Why the step's message was published again or dead-lettered, if it was.
    error: str | None = None


_current_step: contextvars.ContextVar[StepSends | None] = contextvars.ContextVar(
    "workflows_celery_current_step", default=None
)


_start_origin: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "workflows_celery_start_origin", default=None
)


@contextmanager
def start_origin(origin: str) -> Iterator[None]:
    """Name the recipe of the runs that this thread starts inside the block, for the ledger."""
    token = _start_origin.set(origin)
    try:
        yield
    finally:
        _start_origin.reset(token)


@contextmanager
def step_sends(run_id: str) -> Iterator[StepSends]:
    """Collect the messages that the step running in this thread sends for run ``run_id``."""
    collected = StepSends(run_id)
    token = _current_step.set(collected)
    try:
        yield collected
    finally:
        _current_step.reset(token)


def note_step_error(error: str) -> None:
    """Keep why the running step's message was published again or dead-lettered, for its record."""
    current = _current_step.get()
    if current is not None:
        current.error = error


def before_publish(app: Celery, messages: list[OutgoingMessage], origin: str | None = None) -> None:
    """Record recipe messages in the ledger before they are published.

    Messages of the run whose step this thread is running are kept for the
    step's own update instead. Other messages with an empty recipe path are a
    run's first messages: they record its start, named ``origin``.
    """
    ledger = ledger_for(app)
    if ledger is None:
        return
    current = _current_step.get()
    starts: dict[str, list[OutgoingMessage]] = {}
    others: dict[str, list[OutgoingMessage]] = {}
    for outgoing in messages:
        run_id = outgoing.run_id()
        if run_id is None or outgoing.destination.is_topic:
            continue
        if current is not None and current.run_id == run_id:
            current.messages.append(outgoing)
        elif _sender_of(outgoing) is None:
            starts.setdefault(run_id, []).append(outgoing)
        else:
            others.setdefault(run_id, []).append(outgoing)
    for run_id, sends in starts.items():
        ledger.record_start(run_id, sends, origin or _start_origin.get() or "recipe")
    for run_id, sends in others.items():
        ledger.record_sent(run_id, sends, _sender_of(sends[0]))


def after_failed_publish(app: Celery, messages: list[OutgoingMessage]) -> None:
    """Undo :func:`before_publish` for messages whose publishing failed."""
    ledger = ledger_for(app)
    if ledger is None:
        return
    current = _current_step.get()
    for outgoing in messages:
        run_id = outgoing.run_id()
        if run_id is None or outgoing.destination.is_topic:
            continue
        if current is not None and current.run_id == run_id:
            if outgoing in current.messages:
                current.messages.remove(outgoing)
            continue
        # Counted as ended, so the run does not wait for a message that was never sent.
        ledger.record_unsent(run_id, outgoing.task_id)


def _sender_of(outgoing: OutgoingMessage) -> int | None:
    """Return the node that sent a recipe message outside its run's steps, from its path."""
    message = outgoing.message
    path = message.get("recipe-path") if isinstance(message, Mapping) else None
    return _int_or_none(path[-1]) if path else None
