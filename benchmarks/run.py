"""Run the benchmark: every system on every broker, one after the other.

For each broker and system this starts the workers, warms them up, and then
measures in phases:

1. throughput: ``messages`` runs are started as fast as the sender can. The
   time from the first start to the last finished run gives messages per
   second end to end. Peak worker memory and worker CPU time are measured too;
2. latency: runs are started one at a time, each after the previous one
   finished, and the step-to-step hops give the median and 99th percentile;
3. scaling (systems that run recipes): fan-out, recipe size and payload size;
4. bytes on the wire: new workers connect through a counting relay, and the
   bytes of a batch of runs, both directions, are divided by the runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from kombu import Connection

from benchmarks import probe
from benchmarks.measure import (
    BenchmarkError,
    MemorySampler,
    collect_runs,
    cpu_seconds,
    percentile,
)
from benchmarks.relay import CountingRelay
from benchmarks.report import format_report
from benchmarks.systems import (
    LEDGER_URL_VARIABLE,
    LINEAR,
    SYSTEMS,
    Sender,
    Shape,
    System,
    Workers,
    delete_queue,
)
from workflows_celery.redaction import mask_url

logger = logging.getLogger(__name__)

#: Padding of the payload of the main comparison, in characters (about 1 kB).
SMALL_PAYLOAD = 1000
#: Padding of the large payload, in characters (about 1 MB).
LARGE_PAYLOAD = 1_000_000
#: Runs that warm workers up before a phase, and show that they are ready.
WARMUP_RUNS = 10
#: Seconds the workers may take to finish the warm-up runs (start-up included).
WARMUP_TIMEOUT_S = 120.0


@dataclass
class Settings:
    """Settings of a benchmark run: systems, brokers and sizes."""

    messages: int = 5000
    latency_runs: int = 500
    bytes_runs: int = 500
    concurrency: int = 2
    #: Celery pool: "prefork" (one worker, ``concurrency`` children) or "solo"
    #: (``concurrency`` workers of one process each).
    pool: str = "prefork"
    brokers: tuple[str, ...] = ("redis", "rabbitmq")
    systems: tuple[str, ...] = (
        "wc", "wc-noconfirm", "wc-noledger", "wc-plain", "celery", "celery-confirm", "pw", "pw-plain",
    )  # fmt: skip
    #: Systems measured for fan-out and recipe size (they must run recipes).
    scaling_systems: tuple[str, ...] = ("wc", "pw")
    fanouts: tuple[int, ...] = (1, 10, 100, 1000)
    recipe_sizes: tuple[int, ...] = (3, 30, 200)
    #: Step executions per scaling measurement (fan-out and recipe size).
    scaling_messages: int = 3000
    #: Runs with the large payload.
    large_payload_runs: int = 50
    #: Times every system is measured, one after the other; figures are medians.
    rounds: int = 1
    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    sink_url: str = probe.DEFAULT_SINK_URL
    folder: Path | None = None

    def broker_url(self, broker: str) -> str:
        """Return the URL of ``broker`` ("redis" or "rabbitmq")."""
        return self.redis_url if broker == "redis" else self.amqp_url


@dataclass
class Measurement:
    """Figures of one system on one broker."""

    broker: str
    system: str
    label: str
    messages: int = 0
    seconds: float = 0.0
    messages_per_s: float = 0.0
    hop_median_ms: float = 0.0
    hop_p99_ms: float = 0.0
    bytes_per_message: float = 0.0
    peak_memory_mb: float = 0.0
    #: CPU time of all worker processes per message, in the throughput phase.
    worker_cpu_ms: float = 0.0
    #: Microseconds per step execution in each scaling case, e.g. {"fanout 10": 812.0}.
    scaling_us: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    """Every measurement of one benchmark run, with where it ran.

    ``measurements`` contains the median of each figure over the rounds, and
    ``rounds`` every measurement of every round.
    """

    settings: dict[str, Any]
    machine: dict[str, str]
    measurements: list[Measurement] = field(default_factory=list)
    rounds: list[list[Measurement]] = field(default_factory=list)
    command: str = ""


class Session:
    """Workers of one system on one broker, and a sender, for a sequence of phases."""

    def __init__(
        self, settings: Settings, system: System, broker: str, folder: Path, broker_url: str
    ) -> None:
        self.settings = settings
        self.system = system
        self.broker = broker
        self.broker_url = broker_url
        self.queue = f"benchmark.{system.key}.{uuid.uuid4().hex[:8]}"
        self.sink = redis.Redis.from_url(settings.sink_url)
        name = f"bench-{system.key}-{uuid.uuid4().hex[:6]}"
        self.workers = Workers(
            system.worker_commands(broker_url, settings.concurrency, name, settings.pool),
            {
                "CELERY_BROKER_URL": broker_url,
                probe.QUEUE_VARIABLE: self.queue,
                probe.SINK_URL_VARIABLE: settings.sink_url,
                LEDGER_URL_VARIABLE: settings.redis_url,
                **system.environment,
            },
            folder / f"{broker}-{system.key}-{uuid.uuid4().hex[:6]}.log",
        )
        self.sender: Sender | None = None

    def __enter__(self) -> Session:
        # Declared first: python-workflows reads only queues that exist.
        self.sender = self.system.sender(self.broker_url, self.queue, self.settings.redis_url)
        self.workers.start()
        try:
            self.run_batch(WARMUP_RUNS, LINEAR, SMALL_PAYLOAD, timeout_s=WARMUP_TIMEOUT_S)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.workers.stop()
        if self.sender is not None:
            self.sender.close()
        try:
            delete_queue(self.broker_url, self.queue)
        except Exception as error:  # a cleanup error must not hide the phase's own
            logger.warning("Could not delete queue %s: %s", self.queue, error)

    def run_batch(
        self, runs: int, shape: Shape, padding: int, *, timeout_s: float | None = None
    ) -> tuple[float, list[dict[str, Any]]]:
        """Start ``runs`` runs at once; return seconds until the last finished, and the records."""
        assert self.sender is not None
        key = f"workflows-celery-benchmark:{uuid.uuid4().hex}"
        finishing = runs * max(shape.fanout, 1)
        if timeout_s is None:
            timeout_s = 60.0 + 0.05 * finishing * shape.messages_per_run
        started = time.time()
        for run in range(runs):
            self.sender.start(probe.new_payload(key, run, padding), shape)
        self.workers.check_running()
        records = collect_runs(self.sink, key, finishing, timeout_s, self.workers.log_path)
        hops = 2 if shape.fanout else shape.nodes
        for record in records:
            if len(record["hops"]) != hops:
                raise BenchmarkError(
                    f"run {record['run']} of {self.system.label} took {len(record['hops'])} "
                    f"hops instead of {hops}; see the worker logs in {self.workers.log_path}"
                )
        seconds = max(record["finished"] for record in records) - started
        return seconds, records

    def hop_latencies(self, runs: int) -> list[float]:
        """Start ``runs`` runs one after the other; return their step-to-step hops, in seconds."""
        hops: list[float] = []
        for _ in range(runs):
            _, records = self.run_batch(1, LINEAR, SMALL_PAYLOAD, timeout_s=30.0)
            # The first hop, from the sender, is left out: it includes the
            # sender's own start-up work, which differs between systems.
            hops.extend(records[0]["hops"][1:])
        return hops


def measure(settings: Settings, system: System, broker: str, folder: Path) -> Measurement:
    """Measure ``system`` on ``broker``: every phase, each with fresh workers where needed."""
    result = Measurement(broker=broker, system=system.key, label=system.label)
    broker_url = settings.broker_url(broker)
    with Session(settings, system, broker, folder, broker_url) as session:
        cpu_before = cpu_seconds(session.workers.pids)
        with MemorySampler(session.workers.pids) as memory:
            seconds, _ = session.run_batch(settings.messages, LINEAR, SMALL_PAYLOAD)
        result.worker_cpu_ms = (cpu_seconds(session.workers.pids) - cpu_before) / settings.messages * 1e3
        result.messages = settings.messages
        result.seconds = seconds
        result.messages_per_s = settings.messages / seconds
        result.peak_memory_mb = memory.peak_bytes / 1e6
        result.scaling_us["payload 1 kB"] = seconds / (settings.messages * 3) * 1e6

        hops = session.hop_latencies(settings.latency_runs)
        result.hop_median_ms = percentile(hops, 0.5) * 1e3
        result.hop_p99_ms = percentile(hops, 0.99) * 1e3

        runs = settings.large_payload_runs
        seconds, _ = session.run_batch(runs, LINEAR, LARGE_PAYLOAD)
        result.scaling_us["payload 1 MB"] = seconds / (runs * 3) * 1e6
        if system.key in settings.scaling_systems:
            measure_scaling(settings, session, result)

    result.bytes_per_message = measure_bytes(settings, system, broker, folder)
    return result


def measure_scaling(settings: Settings, session: Session, result: Measurement) -> None:
    """Measure the time per step execution as fan-out and recipe size grow."""
    for fanout in settings.fanouts:
        runs = max(settings.scaling_messages // (fanout + 1), 1)
        shape = Shape(fanout=fanout)
        seconds, _ = session.run_batch(runs, shape, SMALL_PAYLOAD)
        result.scaling_us[f"fan-out {fanout}"] = seconds / (runs * shape.messages_per_run) * 1e6
    for size in settings.recipe_sizes:
        runs = max(settings.scaling_messages // 3, 1)
        seconds, _ = session.run_batch(runs, Shape(total_nodes=size), SMALL_PAYLOAD)
        result.scaling_us[f"recipe {size} nodes"] = seconds / (runs * 3) * 1e6


def measure_bytes(settings: Settings, system: System, broker: str, folder: Path) -> float:
    """Return the bytes between broker and clients per run, through a counting relay."""
    broker_url = settings.broker_url(broker)
    parts = urlsplit(broker_url)
    relay = CountingRelay(parts.port or (6379 if broker == "redis" else 5672)).start()
    host = parts.netloc.rsplit("@", 1)
    credentials = f"{host[0]}@" if len(host) == 2 else ""
    relayed_url = urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{relay.port}"))
    try:
        with Session(settings, system, broker, folder, relayed_url) as session:
            relay.reset()
            session.run_batch(settings.bytes_runs, LINEAR, SMALL_PAYLOAD)
            return relay.bytes_relayed / settings.bytes_runs
    finally:
        relay.stop()


def machine() -> dict[str, str]:
    """Describe the machine and the versions of what is measured."""
    from importlib.metadata import version

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        **{name: version(name) for name in ("workflows-celery", "celery", "kombu", "workflows", "pika", "redis")},
    }


def run_benchmark(settings: Settings) -> Report:
    """Measure every requested system on every requested broker, ``settings.rounds`` times."""
    folder = settings.folder or Path(tempfile.mkdtemp(prefix="workflows-celery-benchmark-"))
    folder.mkdir(parents=True, exist_ok=True)
    report = Report(settings=asdict(settings), machine=machine())
    for number in range(1, settings.rounds + 1):
        measured: list[Measurement] = []
        for broker in settings.brokers:
            for key in settings.systems:
                system = SYSTEMS[key]
                if not system.supports(broker):
                    continue
                logger.info("Round %d: measuring %s on %s", number, system.label, broker)
                measured.append(measure(settings, system, broker, folder))
        report.rounds.append(measured)
    report.measurements = [median_measurement(list(same)) for same in zip(*report.rounds)]
    return report


def median_measurement(rounds: list[Measurement]) -> Measurement:
    """Return a measurement whose every figure is the median of ``rounds``."""
    first = rounds[0]
    figures = {
        name: statistics.median(getattr(m, name) for m in rounds)
        for name, value in asdict(first).items()
        if isinstance(value, (int, float))
    }
    scaling = {
        case: statistics.median(m.scaling_us[case] for m in rounds) for case in first.scaling_us
    }
    return Measurement(
        broker=first.broker, system=first.system, label=first.label, scaling_us=scaling, **figures
    )


def positive_int(text: str) -> int:
    """Parse a count that must be at least 1 (an ``argparse`` type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {value}: use 1 or more")
    return value


def check_broker(url: str, option: str) -> None:
    """Raise ``SystemExit`` with a clear message when the broker at ``url`` cannot be reached."""
    try:
        with Connection(url, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as error:
        raise SystemExit(
            f"error: cannot reach the broker {mask_url(url)} ({error}); start it, "
            f"or give its URL with {option}"
        ) from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Compare workflows-celery with plain Celery chains and python-workflows. "
            "Systems: " + "; ".join(f"{key} = {system.label}" for key, system in sorted(SYSTEMS.items()))
            + ". python-workflows and the confirm variants run on RabbitMQ only."
        ),
    )
    parser.add_argument("--messages", type=positive_int, default=Settings.messages, help="messages (runs of the three-step pipeline) in the throughput phase (default %(default)s)")
    parser.add_argument("--latency-runs", type=positive_int, default=Settings.latency_runs, help="runs, one at a time, in the latency phase (default %(default)s)")
    parser.add_argument("--bytes-runs", type=positive_int, default=Settings.bytes_runs, help="runs in the bytes-on-the-wire phase (default %(default)s)")
    parser.add_argument("--scaling-messages", type=positive_int, default=Settings.scaling_messages, help="step executions per fan-out and recipe-size case (default %(default)s)")
    parser.add_argument("--large-payload-runs", type=positive_int, default=Settings.large_payload_runs, help="runs with the 1 MB payload (default %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=Settings.rounds, help="measure every system this many times, one after the other, and report medians (default %(default)s)")
    parser.add_argument("--concurrency", type=positive_int, default=Settings.concurrency, help="worker processes of each system (default %(default)s)")
    parser.add_argument("--pool", choices=("prefork", "solo"), default=Settings.pool, help="Celery pool: one prefork worker with --concurrency children, or --concurrency solo workers (default %(default)s)")
    parser.add_argument("--broker", action="append", choices=("redis", "rabbitmq"), help="broker to measure on; repeat for both (default both)")
    parser.add_argument("--system", action="append", choices=sorted(SYSTEMS), help="system to measure, by the short name listed above; repeat for several (default all)")
    parser.add_argument("--redis-url", default=Settings.redis_url, help="Redis broker (default %(default)s)")
    parser.add_argument("--amqp-url", default=Settings.amqp_url, help="RabbitMQ broker (default %(default)s)")
    parser.add_argument("--sink-url", default=Settings.sink_url, help="Redis that receives finished runs (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--folder", type=Path, help="folder for worker logs (default: a new temporary folder)")
    arguments = parser.parse_args(argv)
    brokers = tuple(arguments.broker or Settings.brokers)
    systems = tuple(arguments.system or Settings.systems)
    for key in systems:
        if not any(SYSTEMS[key].supports(broker) for broker in brokers):
            parser.error(f"{SYSTEMS[key].label} ({key}) runs on RabbitMQ only: add --broker rabbitmq")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # pika and PikaTransport log every connection they open and close at INFO.
    logging.getLogger("pika").setLevel(logging.WARNING)
    logging.getLogger("workflows.transport.pika_transport").setLevel(logging.WARNING)
    # SIGTERM (from timeout, say) unwinds like Ctrl-C, so that workers are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    settings = Settings(
        messages=arguments.messages,
        latency_runs=arguments.latency_runs,
        bytes_runs=arguments.bytes_runs,
        scaling_messages=arguments.scaling_messages,
        large_payload_runs=arguments.large_payload_runs,
        rounds=arguments.rounds,
        concurrency=arguments.concurrency,
        pool=arguments.pool,
        brokers=brokers,
        systems=systems,
        redis_url=arguments.redis_url,
        amqp_url=arguments.amqp_url,
        sink_url=arguments.sink_url,
        folder=arguments.folder or Path(tempfile.mkdtemp(prefix="workflows-celery-benchmark-")),
    )
    check_broker(settings.sink_url, "--sink-url")
    for broker in brokers:
        check_broker(settings.broker_url(broker), "--redis-url" if broker == "redis" else "--amqp-url")
    logger.info("Worker logs go to %s", settings.folder)

    report = run_benchmark(settings)
    report.command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_report(report))
    if arguments.json:
        arguments.json.write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0
