"""Plain Celery tasks for the comparison: ``chain(hop.s(p), hop.s(), last.s())``.

The tasks do what a benchmark step does (see :mod:`benchmarks.probe`) and
nothing else. They acknowledge late, like the workflows-celery step task, and
use JSON. Publisher confirms are off, as in Celery's defaults, unless the
benchmark turns them on. The broker comes from ``CELERY_BROKER_URL`` and the queue from the
benchmark's queue variable. Workers: ``celery -A benchmarks.celery_chain worker``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, chain

from benchmarks import probe


#: Environment variable that turns on publisher confirms ("1") for the workers.
CONFIRM_VARIABLE = "WORKFLOWS_CELERY_BENCH_CONFIRM"


def create_app(broker_url: str | None = None, *, confirm: bool | None = None) -> Celery:
    """Return a Celery app with the benchmark's settings, on ``broker_url``.

    ``confirm`` turns on RabbitMQ publisher confirms, which workflows-celery
    uses; by default it is read from :data:`CONFIRM_VARIABLE`.
    """
    if confirm is None:
        confirm = os.environ.get(CONFIRM_VARIABLE) == "1"
    created = Celery("benchmarks.celery_chain", broker=broker_url, set_as_current=False)
    if confirm:
        created.conf.broker_transport_options = {"confirm_publish": True}
    created.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_ignore_result=True,
        task_default_queue=os.environ.get(probe.QUEUE_VARIABLE, "celery"),
    )
    return created


app = create_app()


@app.task(name="benchmarks.hop")
def hop(payload: dict[str, Any]) -> dict[str, Any]:
    """Record the hop and hand the payload to the next task of the chain."""
    return probe.stamp_send(probe.arrived(payload))


@app.task(name="benchmarks.last")
def last(payload: dict[str, Any]) -> None:
    """Record the last hop and report the finished run to the sink."""
    probe.finish(probe.arrived(payload))


def start_chain(sender: Celery, payload: dict[str, Any], queue: str) -> None:
    """Send, through the app ``sender``, the first task of a three-task chain carrying ``payload``."""
    signatures = [
        sender.signature(hop.name, args=(payload,)),
        sender.signature(hop.name),
        sender.signature(last.name),
    ]
    chain(*signatures, app=sender).apply_async(queue=queue)
