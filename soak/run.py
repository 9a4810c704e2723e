"""The soak test: thousands of recipe runs through workers that are killed, on a restarted broker.

It starts a private broker (see :mod:`soak.brokers`) and several prefork
``celery worker`` processes hosting :mod:`soak.services`, then starts the
runs. While they are processed it kills a whole worker or one of its children
with SIGKILL at a steady pace, starting a new worker for each one killed, and
restarts the broker at set points of progress. Afterwards every run's records
are checked: each run must reach both of its finish steps at least once.

Run it from the repository root::

    python -m soak --broker redis --runs 3000
    python -m soak --broker rabbitmq --runs 3000 --workers 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery

from soak.brokers import PrivateBroker, descendants, private_broker
from soak.services import FINISH_QUEUE, RECORDS_VARIABLE, SPLIT_QUEUE, soak_recipe
from workflows_celery import create_app, dlq, start_recipe
from workflows_celery.errors import WorkflowsCeleryError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Leaves of every soak run: each must be reached once.
LEAVES = ("a", "b")
#: Seconds a worker may take to log that it is ready.
WORKER_READY_TIMEOUT_S = 60.0
#: Seconds a worker may take to exit after SIGTERM before it gets SIGKILL.
WORKER_STOP_TIMEOUT_S = 30.0
#: Seconds between two attempts to start a run while the broker is down.
SEND_RETRY_S = 0.5
#: Runs started and not yet finished, at most.
RUNS_IN_FLIGHT = 200
#: Share of the expected arrivals after which no more faults are made, so the
#: last runs finish on a steady system.
FAULTS_UNTIL = 0.9


@dataclass
class SoakSettings:
    """Settings of one soak test.

    Attributes:
        broker: ``redis`` or ``rabbitmq``; a private server of that kind is used.
        runs: Recipe runs to start.
        workers: Worker processes running at any time.
        concurrency: Prefork children of each worker.
        kill_interval_s: Seconds between two kills (0: kill nothing).
        broker_restarts: Broker restarts, spread over the processing.
        timeout_s: Seconds after which the runs still missing count as lost.
        folder: Where the broker, the logs and the records go (a new
            temporary folder when omitted).
    """

    broker: str = "redis"
    runs: int = 3000
    workers: int = 3
    concurrency: int = 2
    kill_interval_s: float = 4.0
    broker_restarts: int = 2
    timeout_s: float = 900.0
    folder: Path | None = None


@dataclass
class SoakReport:
    """Counts of one soak test, as it prints them, and whether nothing was lost."""

    broker: str
    runs_started: int = 0
    send_retries: int = 0
    expected: int = 0
    delivered: int = 0
    duplicated: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    lost: int = 0
    lost_runs: list[int] = field(default_factory=list)
    split_twice: int = 0
    half_published: int = 0
    workers_killed: int = 0
    children_killed: int = 0
    broker_restarts: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every run reached every finish step and nothing was dead-lettered."""
        return (
            self.lost == 0
            and self.dead_lettered == 0
            and self.half_published == 0
            and self.delivered == self.expected
        )

    def format(self) -> str:
        """Format the report as aligned lines of text."""
        rows = [
            ("broker", self.broker),
            ("runs started", self.runs_started),
            ("start retries while the broker was down", self.send_retries),
            ("workers killed (SIGKILL)", self.workers_killed),
            ("worker children killed (SIGKILL)", self.children_killed),
            ("broker restarts", self.broker_restarts),
            ("messages sent to finish steps", self.expected),
            ("messages delivered", self.delivered),
            ("messages duplicated", self.duplicated),
            ("deliveries marked redelivered", self.redelivered),
            ("split steps run more than once", self.split_twice),
            ("transactions published by half", self.half_published),
            ("messages dead-lettered", self.dead_lettered),
            ("messages lost", self.lost),
            ("seconds", f"{self.seconds:.1f}"),
        ]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {value}" for label, value in rows]
        if self.lost_runs:
            shown = ", ".join(str(run) for run in self.lost_runs[:20])
            lines.append(f"runs with lost messages: {shown}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


class SoakWorker:
    """A prefork ``celery worker`` hosting the soak services, in a process group of its own."""

    def __init__(self, number: int, broker_url: str, folder: Path, concurrency: int) -> None:
        self.name = f"soak{number}"
        self.log_path = folder / f"{self.name}.log"
        self.command = [
            sys.executable, "-m", "celery", "-A", "soak.app", "worker",
            "--services", "soak.services:SoakSplit,soak.services:SoakFinish",
            "-P", "prefork", "-c", str(concurrency),
            "-l", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"{self.name}@%h",
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "CELERY_BROKER_URL": broker_url,
            RECORDS_VARIABLE: str(folder / "records"),
            "PYTHONPATH": os.pathsep.join(
                part for part in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if part
            ),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the worker without waiting for it."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_until_ready(self) -> None:
        """Wait until the worker logs that it is ready."""
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if f"{self.name}@" in self._output() and " ready." in self._output():
                return
            if self.process is None or self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.name} did not start; see {self.log_path}")

    def _output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """Kill the worker and its children with SIGKILL, as a power cut would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(WORKER_STOP_TIMEOUT_S)

    def kill_child(self) -> bool:
        """Kill one prefork child with SIGKILL; return False when it has none yet."""
        assert self.process is not None
        children = descendants(self.process.pid)
        if not children:
            return False
        try:
            os.kill(random.choice(children), signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def terminate(self) -> None:
        """Ask the worker to stop (SIGTERM), without waiting."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        """Wait until the worker has stopped, killing it with SIGKILL after a timeout."""
        process = self.process
        if process is None:
            return
        try:
            process.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(WORKER_STOP_TIMEOUT_S)


def read_records(folder: Path) -> Iterator[dict[str, object]]:
    """Yield every whole record line written by the soak services."""
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                logger.warning("Skipping a partial record in %s", path.name)


def count_finished(folder: Path) -> int:
    """Return the number of distinct (run, leaf) pairs recorded so far."""
    return len(
        {(r["run"], r["leaf"]) for r in read_records(folder) if r.get("kind") == "finish"}
    )


class Soak:
    """One soak test, from starting the broker to the report."""

    def __init__(self, settings: SoakSettings, folder: Path) -> None:
        self.settings = settings
        self.folder = folder
        self.records = folder / "records"
        self.records.mkdir(parents=True, exist_ok=True)
        self.broker: PrivateBroker = private_broker(settings.broker, folder / "broker")
        self.report = SoakReport(broker=settings.broker)
        self.workers: list[SoakWorker] = []
        self._started_workers = 0
        self._stop_faults = threading.Event()

    def run(self) -> SoakReport:
        """Run the whole soak test and return its report."""
        began = time.monotonic()
        deadline = began + self.settings.timeout_s
        self.broker.start()
        app = create_app(self.broker.url, main="soak-sender")
        try:
            for _ in range(self.settings.workers):
                self._start_worker()
            for worker in self.workers:
                worker.wait_until_ready()
            faults = threading.Thread(target=self._make_faults, name="soak faults", daemon=True)
            faults.start()
            self._send(app, deadline)
            self.report.expected = self.report.runs_started * len(LEAVES)
            while (
                count_finished(self.records) < self.report.expected
                and time.monotonic() < deadline
            ):
                time.sleep(0.5)
            self._stop_faults.set()
            faults.join(WORKER_STOP_TIMEOUT_S + 60)
            self.report.dead_lettered = sum(
                dlq.count(app, queue) for queue in (SPLIT_QUEUE, FINISH_QUEUE)
            )
        finally:
            self._stop_faults.set()
            for worker in self.workers:
                worker.terminate()
            for worker in self.workers:
                worker.wait_stopped()
            app.close()
            self.broker.stop()
            self.broker.remove_data()
        self._count()
        self.report.broker_restarts = self.broker.restarts
        self.report.seconds = time.monotonic() - began
        return self.report

    def _start_worker(self) -> SoakWorker:
        self._started_workers += 1
        worker = SoakWorker(
            self._started_workers, self.broker.url, self.folder, self.settings.concurrency
        )
        worker.start()
        self.workers.append(worker)
        return worker

    def _send(self, app: Celery, deadline: float) -> None:
        """Start every run, keeping at most ``RUNS_IN_FLIGHT`` unfinished at a time.

        So the runs are started all along the processing, faults included,
        rather than queued at once.
        """
        finished_runs = 0
        for run in range(self.settings.runs):
            while run - finished_runs >= RUNS_IN_FLIGHT and time.monotonic() < deadline:
                time.sleep(0.1)
                finished_runs = count_finished(self.records) // len(LEAVES)
            while True:
                try:
                    start_recipe(soak_recipe(run), app=app)
                    break
                except WorkflowsCeleryError as error:
                    if time.monotonic() > deadline:
                        raise
                    self.report.send_retries += 1
                    logger.info("Run %d not started yet (%s); trying again", run, error)
                    time.sleep(SEND_RETRY_S)
            self.report.runs_started += 1

    def _progress(self) -> float:
        expected = self.settings.runs * len(LEAVES)
        return count_finished(self.records) / expected if expected else 1.0

    def _make_faults(self) -> None:
        """Kill workers and children at a steady pace, and restart the broker at set points."""
        settings = self.settings
        restart_points = [
            FAULTS_UNTIL * (n + 1) / (settings.broker_restarts + 1)
            for n in range(settings.broker_restarts)
        ]
        interval = settings.kill_interval_s
        next_kill = time.monotonic() + interval if interval > 0 else float("inf")
        while not self._stop_faults.wait(0.2):
            progress = self._progress()
            if progress >= FAULTS_UNTIL:
                return
            if restart_points and progress >= restart_points[0]:
                restart_points.pop(0)
                logger.info("Restarting the broker at %.0f%% of the runs", progress * 100)
                self.broker.restart()
            if time.monotonic() >= next_kill:
                next_kill = time.monotonic() + interval
                self._kill_one()

    def _kill_one(self) -> None:
        running = [w for w in self.workers if w.process and w.process.poll() is None]
        if not running:
            return
        victim = random.choice(running)
        kills = self.report.children_killed + self.report.workers_killed
        # Children and whole workers in turn, so a short soak has both.
        if kills % 2 == 0 and victim.kill_child():
            # The worker starts a new child by itself.
            self.report.children_killed += 1
            logger.info("Killed a child of %s", victim.name)
            return
        victim.kill()
        self.workers.remove(victim)
        self.report.workers_killed += 1
        logger.info("Killed %s; starting another worker", victim.name)
        self._start_worker()

    def _count(self) -> None:
        records = list(read_records(self.records))
        finishes = [r for r in records if r.get("kind") == "finish"]
        arrivals = Counter((r["run"], r["leaf"]) for r in finishes)
        splits = Counter(r["run"] for r in records if r.get("kind") == "split")
        report = self.report
        report.delivered = len(arrivals)
        report.duplicated = sum(arrivals.values()) - len(arrivals)
        report.redelivered = sum(1 for r in finishes if r.get("redelivered"))
        report.split_twice = sum(1 for n in splits.values() if n > 1)
        leaves_by_split: dict[object, set[object]] = {}
        for record in finishes:
            leaves_by_split.setdefault(record.get("split"), set()).add(record["leaf"])
        report.half_published = sum(
            1 for token, leaves in leaves_by_split.items() if token and len(leaves) < len(LEAVES)
        )
        missing = [
            (run, leaf)
            for run in range(report.runs_started)
            for leaf in LEAVES
            if (run, leaf) not in arrivals
        ]
        report.lost = max(len(missing) - report.dead_lettered, 0)
        report.lost_runs = sorted({run for run, _ in missing})


def soak(settings: SoakSettings) -> SoakReport:
    """Run a soak test and return its report; its files stay in ``settings.folder`` if given."""
    if settings.folder is not None:
        settings.folder.mkdir(parents=True, exist_ok=True)
        return Soak(settings, settings.folder).run()
    with tempfile.TemporaryDirectory(prefix="workflows-celery-soak-") as folder:
        return Soak(settings, Path(folder)).run()


def main(argv: list[str] | None = None) -> int:
    """Command line of the soak test; exit status 0 when nothing was lost."""
    defaults = SoakSettings()
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--broker", choices=["redis", "rabbitmq"], default=defaults.broker,
        help="kind of private broker to start (default: %(default)s)",
    )
    parser.add_argument(
        "--runs", type=int, default=defaults.runs,
        help="recipe runs to start (default: %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, default=defaults.workers,
        help="worker processes running at any time (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=defaults.concurrency,
        help="prefork children of each worker (default: %(default)s)",
    )
    parser.add_argument(
        "--kill-interval", type=float, default=defaults.kill_interval_s, metavar="SECONDS",
        help="seconds between two kills of a worker or child, 0 for none (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--broker-restarts", type=int, default=defaults.broker_restarts,
        help="broker restarts, spread over the processing (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=defaults.timeout_s, metavar="SECONDS",
        help="seconds after which runs still missing count as lost (default: %(default)s)",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, metavar="FOLDER",
        help="keep the broker data, worker logs and records in FOLDER",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    settings = SoakSettings(
        broker=args.broker,
        runs=args.runs,
        workers=args.workers,
        concurrency=args.concurrency,
        kill_interval_s=args.kill_interval,
        broker_restarts=args.broker_restarts,
        timeout_s=args.timeout,
        folder=args.keep,
    )
    report = soak(settings)
    print(report.format())
    return 0 if report.passed else 1
