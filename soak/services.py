"""The two services of the soak recipe, written as any Zocalo service is.

``SoakSplit`` reads ``soak.split`` and forwards each run's message to every
output of its step in one transaction with the ack, as services that must not
publish half their results do. ``SoakFinish`` reads ``soak.finish`` and writes
one line per delivery to a record file before it acks, so the soak test can
count what arrived, what arrived twice and what never arrived.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import workflows.recipe
from workflows.services.common_service import CommonService

#: Queue of the first step of every soak run.
SPLIT_QUEUE = "soak.split"
#: Queue of the last steps of every soak run.
FINISH_QUEUE = "soak.finish"
#: Environment variable naming the folder of the record files.
RECORDS_VARIABLE = "WORKFLOWS_CELERY_SOAK_RECORDS"
#: Maximum pause of a step, in seconds, so that kills land in the middle of steps.
MAX_WORK_S = 0.02


def soak_recipe(run: int) -> dict[str, Any]:
    """Return the recipe of soak run ``run``: one split step and two finish steps."""
    return {
        "1": {"service": "Soak split", "queue": SPLIT_QUEUE, "output": [2, 3]},
        "2": {"service": "Soak finish", "queue": FINISH_QUEUE, "parameters": {"leaf": "a"}},
        "3": {"service": "Soak finish", "queue": FINISH_QUEUE, "parameters": {"leaf": "b"}},
        "start": [[1, {"run": run}]],
    }


def write_record(kind: str, **fields: Any) -> None:
    """Append one JSON line to this process's record file.

    One ``write`` of a line opened for appending, so a process killed with
    SIGKILL leaves either the whole line or none of it.
    """
    folder = Path(os.environ[RECORDS_VARIABLE])
    line = json.dumps({"kind": kind, "pid": os.getpid(), **fields}) + "\n"
    descriptor = os.open(folder / f"{os.getpid()}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


class SoakSplit(CommonService):
    """Forward each run's message to both finish steps, in one transaction with the ack."""

    _service_name = "Soak split"
    _logger_name = "workflows.service.soak_split"

    def initializing(self) -> None:
        workflows.recipe.wrap_subscribe(
            self._transport, SPLIT_QUEUE, self.split, acknowledgement=True
        )

    def split(self, rw: Any, header: dict[str, Any], message: Any) -> None:
        time.sleep(random.uniform(0, MAX_WORK_S))
        # Both outputs of one execution carry its token: one arriving without
        # the other would show a transaction published by half.
        token = uuid.uuid4().hex
        transaction = self._transport.transaction_begin(subscription_id=header["subscription"])
        self._transport.ack(header, transaction=transaction)
        rw.send({**message, "split": token}, transaction=transaction)
        self._transport.transaction_commit(transaction)
        write_record("split", run=message["run"], message_id=header["message-id"], split=token)


class SoakFinish(CommonService):
    """Record each arrival of a run at one of its finish steps, then ack it."""

    _service_name = "Soak finish"
    _logger_name = "workflows.service.soak_finish"

    def initializing(self) -> None:
        workflows.recipe.wrap_subscribe(
            self._transport, FINISH_QUEUE, self.finish, acknowledgement=True
        )

    def finish(self, rw: Any, header: dict[str, Any], message: Any) -> None:
        time.sleep(random.uniform(0, MAX_WORK_S))
        write_record(
            "finish",
            run=message["run"],
            leaf=rw.recipe_step["parameters"]["leaf"],
            split=message.get("split"),
            message_id=header["message-id"],
            redelivered=bool(header.get("redelivered")),
        )
        self._transport.ack(header)
