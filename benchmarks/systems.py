"""The systems under test: how to start their workers and how to start a run.

Each system runs the same pipeline (see :mod:`benchmarks.recipes` and
:mod:`benchmarks.probe`) with the same number of worker processes:

- workflows-celery: ``celery worker`` hosting :class:`benchmarks.services.BenchStep`
  (or the variant without transactions), prefork pool;
- Celery: ``celery worker`` running ``chain(hop.s(), hop.s(), last.s())``, prefork pool;
- python-workflows: one ``Frontend`` with ``PikaTransport`` per process, on RabbitMQ only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kombu import Connection

from benchmarks import probe, recipes
from workflows_celery import routing

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Seconds a worker may take to stop after SIGTERM before it gets SIGKILL. A
#: killed worker leaves its prefetched messages to come back later.
STOP_TIMEOUT_S = 15.0

#: Environment variable that turns the run ledger of workflows-celery off ("0").
LEDGER_VARIABLE = "WORKFLOWS_CELERY_BENCH_LEDGER"
#: Environment variable naming the Redis of the run ledger, for RabbitMQ runs.
LEDGER_URL_VARIABLE = "WORKFLOWS_CELERY_BENCH_LEDGER_URL"
#: Seconds the benchmark's runs stay in the ledger: an hour, like the probe's
#: sink keys, instead of the default week, because a benchmark starts many runs.
LEDGER_TTL_S = 3600


@dataclass(frozen=True)
class Shape:
    """The recipe of a run: a line of ``nodes`` steps padded to ``total_nodes``, or a fan-out."""

    nodes: int = 3
    total_nodes: int = 0
    fanout: int = 0

    def recipe(self, queue: str, payload: Any) -> dict[str, Any]:
        """Return the recipe of this shape, started with ``payload``."""
        if self.fanout:
            return recipes.fanout_recipe(queue, payload, self.fanout)
        return recipes.linear_recipe(queue, payload, nodes=self.nodes, total_nodes=self.total_nodes)

    @property
    def messages_per_run(self) -> int:
        """Step executions in one run of this shape."""
        return 1 + self.fanout if self.fanout else self.nodes


LINEAR = Shape()


@dataclass(frozen=True)
class System:
    """One system under test.

    Attributes:
        key: Short name used on the command line and in reports.
        label: Name shown in reports.
        kind: ``workflows-celery``, ``celery`` or ``python-workflows``.
        service: The service class the workers host, as ``module:Class``.
        confirm: Whether to publish with RabbitMQ publisher confirms, when it
            differs from the system's default (Celery: off, workflows-celery: on).
        ledger: Whether workflows-celery records runs in the run ledger.
    """

    key: str
    label: str
    kind: str
    service: str = ""
    confirm: bool | None = None
    ledger: bool = True

    @property
    def environment(self) -> dict[str, str]:
        """Environment variables of the system's workers."""
        from benchmarks.celery_chain import CONFIRM_VARIABLE

        variables = {} if self.ledger else {LEDGER_VARIABLE: "0"}
        if self.confirm is not None:
            variables[CONFIRM_VARIABLE] = "1" if self.confirm else "0"
        return variables

    @property
    def runs_recipes(self) -> bool:
        """True when the system runs recipes, so any :class:`Shape` works."""
        return self.kind != "celery"

    def supports(self, broker: str) -> bool:
        """Tell whether the system runs on ``broker`` ("redis" or "rabbitmq")."""
        if self.kind == "python-workflows" or self.confirm is not None:
            return broker == "rabbitmq"
        return True

    def worker_commands(
        self, broker_url: str, concurrency: int, name: str, pool: str = "prefork"
    ) -> list[list[str]]:
        """Return the commands of the worker processes, one per process group.

        With the prefork pool one Celery worker runs ``concurrency`` child
        processes. With the solo pool ``concurrency`` Celery workers run one
        process each, as python-workflows runs one process per service instance.
        """
        python = sys.executable
        if self.kind == "python-workflows":
            return [[python, "-m", "benchmarks.pw_worker", broker_url, self.service]] * concurrency
        if self.kind == "workflows-celery":
            start = [python, "-m", "celery", "-A", "benchmarks.wc_app", "worker", "--services", self.service]
        else:
            start = [python, "-m", "celery", "-A", "benchmarks.celery_chain", "worker"]
        common = ["-l", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if pool == "prefork":
            return [[*start, *common, "-P", "prefork", "-c", str(concurrency), "-n", f"{name}@%h"]]
        return [
            [*start, *common, "-P", "solo", "-n", f"{name}-{number}@%h"]
            for number in range(concurrency)
        ]

    def sender(self, broker_url: str, queue: str, ledger_url: str | None = None) -> Sender:
        """Return a sender that starts runs of this system."""
        if self.kind == "workflows-celery":
            return WorkflowsCelerySender(
                broker_url, queue, confirm=self.confirm, ledger_url=ledger_url if self.ledger else None
            )
        if self.kind == "celery":
            return CelerySender(broker_url, queue, confirm=bool(self.confirm))
        return PythonWorkflowsSender(broker_url, queue)


SYSTEMS = {
    system.key: system
    for system in (
        System("wc", "workflows-celery", "workflows-celery", "benchmarks.services:BenchStep"),
        System(
            "wc-noconfirm",
            "workflows-celery, publisher confirms off",
            "workflows-celery",
            "benchmarks.services:BenchStep",
            confirm=False,
        ),
        System(
            "wc-noledger",
            "workflows-celery, run ledger off",
            "workflows-celery",
            "benchmarks.services:BenchStep",
            ledger=False,
        ),
        System(
            "wc-plain",
            "workflows-celery, no transactions",
            "workflows-celery",
            "benchmarks.services:BenchStepWithoutTransaction",
        ),
        System("celery", "Celery chain", "celery"),
        System("celery-confirm", "Celery chain, publisher confirms", "celery", confirm=True),
        System("pw", "python-workflows", "python-workflows", "benchmarks.services:BenchStep"),
        System(
            "pw-plain",
            "python-workflows, no transactions",
            "python-workflows",
            "benchmarks.services:BenchStepWithoutTransaction",
        ),
    )
}


class Sender:
    """Starts runs of one system from the benchmark process."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self.broker_url = broker_url
        self.queue = queue

    def start(self, payload: dict[str, Any], shape: Shape = LINEAR) -> None:
        """Start one run carrying ``payload``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the sender's connections."""


class WorkflowsCelerySender(Sender):
    """Starts recipes with :func:`workflows_celery.start_recipe`."""

    def __init__(
        self, broker_url: str, queue: str, *, confirm: bool | None = None, ledger_url: str | None = None
    ) -> None:
        from workflows_celery import create_app

        super().__init__(broker_url, queue)
        self.app = create_app(broker_url)
        if ledger_url is None:
            self.app.conf.workflows_ledger = False
        else:
            self.app.conf.workflows_ledger_url = ledger_url
            self.app.conf.workflows_ledger_ttl = LEDGER_TTL_S
        if confirm is False:
            self.app.conf.broker_transport_options = {
                **(self.app.conf.broker_transport_options or {}),
                "confirm_publish": False,
            }

    def start(self, payload: dict[str, Any], shape: Shape = LINEAR) -> None:
        from workflows_celery import start_recipe

        start_recipe(shape.recipe(self.queue, probe.stamp_send(payload)), app=self.app)

    def close(self) -> None:
        self.app.close()


class CelerySender(Sender):
    """Starts three-task chains, the only shape that Celery chains run here."""

    def __init__(self, broker_url: str, queue: str, *, confirm: bool = False) -> None:
        from benchmarks import celery_chain

        super().__init__(broker_url, queue)
        self.start_chain = celery_chain.start_chain
        self.app = celery_chain.create_app(broker_url, confirm=confirm)

    def start(self, payload: dict[str, Any], shape: Shape = LINEAR) -> None:
        if shape != LINEAR:
            raise ValueError(f"Celery chains run only the three-step line, not {shape}")
        self.start_chain(self.app, probe.stamp_send(payload), self.queue)

    def close(self) -> None:
        self.app.close()


class PythonWorkflowsSender(Sender):
    """Starts recipes with workflows' ``RecipeWrapper.start`` over ``PikaTransport``."""

    def __init__(self, broker_url: str, queue: str) -> None:
        from workflows.transport.pika_transport import PikaTransport

        from benchmarks.pw_worker import configure_pika

        super().__init__(broker_url, queue)
        # PikaTransport does not declare the queues it reads; Zocalo sites
        # declare them beforehand, as this does.
        declare_queue(broker_url, queue)
        configure_pika(broker_url)
        self.transport = PikaTransport()
        self.transport.connect()

    def start(self, payload: dict[str, Any], shape: Shape = LINEAR) -> None:
        import workflows.recipe
        from workflows.recipe.wrapper import RecipeWrapper

        recipe = workflows.recipe.Recipe(shape.recipe(self.queue, probe.stamp_send(payload)))
        RecipeWrapper(recipe=recipe, transport=self.transport).start()

    def close(self) -> None:
        self.transport.disconnect()


def declare_queue(broker_url: str, queue: str) -> None:
    """Declare ``queue`` as workflows-celery declares its queues."""
    with Connection(broker_url) as connection:
        routing.task_queue(queue).bind(connection.default_channel).declare()


def delete_queue(broker_url: str, queue: str) -> None:
    """Delete ``queue``, anything left in it, and on Redis the bindings kombu keeps for it."""
    with Connection(broker_url) as connection:
        channel = connection.default_channel
        routing.task_queue(queue).bind(channel).delete()
        client = getattr(channel, "client", None)
        if connection.transport.driver_type == "redis" and client is not None:
            # Celery declares an exchange named after its default queue.
            client.delete(f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


class Workers:
    """The worker processes of one system, each in a process group of its own."""

    def __init__(self, commands: list[list[str]], environment: dict[str, str], log_path: Path) -> None:
        self.commands = commands
        self.environment = environment
        self.log_path = log_path
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> Workers:
        """Start every process without waiting for it to be ready; return self."""
        env = {
            **os.environ,
            **self.environment,
            "PYTHONPATH": os.pathsep.join(
                part for part in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if part
            ),
        }
        with self.log_path.open("ab") as log:
            for command in self.commands:
                self.processes.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO_ROOT,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        return self

    @property
    def pids(self) -> list[int]:
        """PIDs of the processes this started."""
        return [process.pid for process in self.processes]

    def check_running(self) -> None:
        """Raise when a worker process has exited."""
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"worker process {process.pid} exited with status {process.returncode}; "
                    f"see {self.log_path}"
                )

    def stop(self) -> None:
        """Stop every worker with SIGTERM, then end whatever is left of its group with SIGKILL."""
        for process in self.processes:
            # The worker stops its own children, as on any other stop.
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes:
            # Also ends children that outlived their parent.
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT_S)
        self.processes = []


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
