"""The workflows services of the benchmark pipeline, written as Zocalo services are.

The same classes run on workflows-celery (hosted by ``celery worker``) and on
python-workflows (started by its ``Frontend`` with ``PikaTransport``). A step
forwards its payload to every output of its recipe node, ``fanout`` times
when the node has that parameter. A node with the parameter ``last`` ends
the run and reports it to the sink.
"""

from __future__ import annotations

from typing import Any

import workflows.recipe
from workflows.services.common_service import CommonService

from benchmarks import probe


class _BenchmarkService(CommonService):
    """Reads the benchmark queue, with acknowledgements, as Zocalo services do."""

    def initializing(self) -> None:
        workflows.recipe.wrap_subscribe(
            self._transport, probe.step_queue(), self.process, acknowledgement=True
        )

    def process(self, rw: Any, header: dict[str, Any], message: Any) -> None:
        raise NotImplementedError


class BenchStep(_BenchmarkService):
    """Forward each message in one transaction with its acknowledgement."""

    _service_name = "Benchmark step"
    _logger_name = "workflows.service.benchmark_step"

    def process(self, rw: Any, header: dict[str, Any], message: Any) -> None:
        payload = probe.arrived(message)
        parameters = rw.recipe_step.get("parameters") or {}
        if parameters.get("last"):
            probe.finish(payload)
            self._transport.ack(header)
            return
        transaction = self._transport.transaction_begin(subscription_id=header["subscription"])
        self._transport.ack(header, transaction=transaction)
        for part in range(int(parameters.get("fanout", 1))):
            rw.send({**probe.stamp_send(payload), "part": part}, transaction=transaction)
        self._transport.transaction_commit(transaction)


class BenchStepWithoutTransaction(_BenchmarkService):
    """Forward each message, then acknowledge it: no transaction."""

    _service_name = "Benchmark step without transaction"
    _logger_name = "workflows.service.benchmark_step_without_transaction"

    def process(self, rw: Any, header: dict[str, Any], message: Any) -> None:
        payload = probe.arrived(message)
        parameters = rw.recipe_step.get("parameters") or {}
        if parameters.get("last"):
            probe.finish(payload)
        else:
            for part in range(int(parameters.get("fanout", 1))):
                rw.send({**probe.stamp_send(payload), "part": part})
        self._transport.ack(header)
