"""Time stamps and the sink: the work of a benchmark step besides forwarding.

Every system under test runs the same step body. A step appends how long the
message took to arrive (from the previous step's send to this step's
receipt) to the payload's ``hops`` list, stamps the send time, and forwards
the payload. The last step of a run pushes the payload to a Redis list, the
sink, from which the benchmark reads every finished run. The payload names its
sink list, so one set of workers serves every phase of a benchmark. The sink is
the same Redis for every system and broker, so its cost is the same for all.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

#: Environment variable naming the Redis server of the sink.
SINK_URL_VARIABLE = "WORKFLOWS_CELERY_BENCH_SINK_URL"
#: Environment variable naming the queue the benchmark steps read.
QUEUE_VARIABLE = "WORKFLOWS_CELERY_BENCH_QUEUE"
#: Seconds a sink list is kept after its last record.
SINK_TTL_S = 3600
#: Sink used when the environment names none.
DEFAULT_SINK_URL = "redis://127.0.0.1:6379/0"

_sink: redis.Redis | None = None


def new_payload(sink_key: str, run: int, padding_bytes: int) -> dict[str, Any]:
    """Return the payload that starts a run; its first step pads it to ``padding_bytes``.

    The first step adds the padding, not the sender. A workflows recipe keeps
    its start payload in every message of the run, so a padded start payload
    would travel twice in every message on workflows-celery and
    python-workflows, but once on Celery.
    """
    return {
        "sink": sink_key,
        "run": run,
        "hops": [],
        "sent": time.time(),
        "padding_bytes": padding_bytes,
    }


def arrived(payload: dict[str, Any]) -> dict[str, Any]:
    """Record the hop that brought ``payload`` here and return it, ready to forward."""
    now = time.time()
    payload["hops"].append(now - payload["sent"])
    payload["sent"] = now
    if "padding_bytes" in payload:
        payload["padding"] = "x" * payload.pop("padding_bytes")
    return payload


def stamp_send(payload: dict[str, Any]) -> dict[str, Any]:
    """Set the send time of ``payload`` to now, just before it is sent on."""
    payload["sent"] = time.time()
    return payload


def finish(payload: dict[str, Any]) -> None:
    """Push a finished run to the sink: its hop times and when it finished."""
    record = {"hops": payload["hops"], "finished": time.time(), "run": payload["run"]}
    # One round trip; the expiry removes records of runs that finish after the
    # benchmark stopped reading them.
    sink().pipeline(transaction=False).rpush(payload["sink"], json.dumps(record)).expire(
        payload["sink"], SINK_TTL_S
    ).execute()


def sink() -> redis.Redis:
    """Return this process's connection to the sink."""
    global _sink
    if _sink is None:
        _sink = redis.Redis.from_url(os.environ.get(SINK_URL_VARIABLE, DEFAULT_SINK_URL))
    return _sink


def step_queue() -> str:
    """Return the queue that benchmark steps read, which the benchmark sets."""
    return os.environ[QUEUE_VARIABLE]
