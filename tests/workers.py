"""Real ``celery worker`` subprocesses for the tests, and the lock on the sample queues.

The sample services of workflows read the fixed queues ``transient.destination``
and ``transient.transaction``. Tests that host them hold a file lock, so two
runs of the suite on one machine take turns instead of sharing those queues.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from workflows_celery import routing

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Queues that the sample services read and write. Their names are fixed.
DESTINATION_QUEUE = "transient.destination"
TRANSACTION_QUEUE = "transient.transaction"

#: Seconds a worker may take to log that it is ready.
WORKER_READY_TIMEOUT_S = 60.0
#: Seconds a worker may take to exit after SIGTERM before it gets SIGKILL.
WORKER_STOP_TIMEOUT_S = 30.0
#: Child processes of a prefork worker (``-c``). Each child hosts its own services.
PREFORK_CONCURRENCY = 2

#: Seconds to wait for another run of these tests to release the sample queues.
QUEUE_LOCK_TIMEOUT_S = 150.0
#: File locked while a run of these tests uses the sample services' queues.
QUEUE_LOCK_PATH = Path(tempfile.gettempdir()) / "workflows-celery-test-sample-queues.lock"


#: Delivery limit of the test workers, far above what random aborts reach.
WORKER_DELIVERY_LIMIT = 100


class WorkerProcess:
    """A ``celery worker`` subprocess whose output goes to a file.

    Args:
        broker_url: Broker the worker connects to (``-b``), or ``None`` to leave
            the option out so that the app's own settings give the broker.
        services: Value of ``--services``, or ``None`` to leave the option out.
        pool: Celery pool (``-P``).
        app_module: Value of ``-A``.
        log_dir: Folder for the output file.
        env: Extra environment variables for the worker.
        cwd: Folder the worker starts in; the repository root by default.
            It comes first on the worker's ``PYTHONPATH``.
        options: Further worker options, after the standard ones.
    """

    def __init__(
        self,
        broker_url: str | None,
        services: list[str] | None,
        pool: str,
        app_module: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path = REPO_ROOT,
        options: list[str] | None = None,
    ) -> None:
        self.node_name = f"test-{uuid.uuid4().hex[:12]}"
        self.pool = pool
        self.services = services
        self.command = [sys.executable, "-m", "celery", "-A", app_module]
        if broker_url is not None:
            self.command += ["-b", broker_url]
        self.command += ["worker"]
        if services is not None:
            self.command += ["--services", ",".join(services)]
        self.command += [
            # SampleTxn aborts a quarter of its transactions at random, so one
            # message may well come back five times in a row. These tests check
            # that it is processed, not that it is dead-lettered.
            "--delivery-limit", str(WORKER_DELIVERY_LIMIT),
            "-P", pool,
            "-c", str(PREFORK_CONCURRENCY if pool == "prefork" else 1),
            "-l", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"{self.node_name}@%h",
            *(options or []),
        ]  # fmt: skip
        self.cwd = cwd
        self.log_path = log_dir / f"{self.node_name}.log"
        self.env = {
            **os.environ,
            # The worker imports test helpers as ``tests.<module>``.
            "PYTHONPATH": os.pathsep.join(
                part
                for part in (str(cwd), str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                if part
            ),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The PID of the worker's main process."""
        assert self.process is not None, "worker not started"
        return self.process.pid

    def start(self) -> None:
        """Start the subprocess without waiting for it to be ready."""
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        """Return everything the worker wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        """Return the command, the exit code if any, and the output, for failure messages."""
        returncode = None if self.process is None else self.process.poll()
        return (
            f"worker command: {' '.join(self.command)}\n"
            f"exit code: {returncode}\n"
            f"--- worker output ({self.log_path}) ---\n{self.output()}"
        )

    def is_running(self) -> bool:
        """Tell whether the subprocess has been started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def wait_for_output(self, pattern: str, count: int = 1, timeout_s: float = 30.0) -> None:
        """Wait until ``pattern`` (a regular expression) matches ``count`` times in the output.

        Raises:
            AssertionError: the worker exited or the wait timed out.
        """
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(regex.findall(self.output())) >= count:
                return
            if not self.is_running():
                break
            time.sleep(0.1)
        if len(regex.findall(self.output())) >= count:
            return
        state = "exited" if not self.is_running() else f"timed out after {timeout_s:.0f} s"
        raise AssertionError(
            f"worker {state} before {pattern!r} appeared {count} time(s) in its output\n"
            + self.describe()
        )

    def wait_until_ready(self) -> None:
        """Wait until the worker is ready and every hosted service has started."""
        self.wait_for_output(
            rf"{re.escape(self.node_name)}@\S+ ready\.", timeout_s=WORKER_READY_TIMEOUT_S
        )
        if self.services is not None:
            processes = PREFORK_CONCURRENCY if self.pool == "prefork" else 1
            self.wait_for_output(
                r"Started service ",
                count=processes * len(self.services),
                timeout_s=WORKER_READY_TIMEOUT_S,
            )

    def stop(self) -> int | None:
        """Stop the worker with SIGTERM, or SIGKILL after a timeout, and return its exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
        return process.returncode


@contextmanager
def exclusive_sample_queues() -> Iterator[None]:
    """Hold a file lock so that two runs of these tests on one machine take turns.

    Both runs would otherwise consume and purge the same fixed queues. The
    operating system releases the lock if the holding process dies.

    Raises:
        pytest.fail.Exception: the lock is still held after ``QUEUE_LOCK_TIMEOUT_S``.
    """
    with QUEUE_LOCK_PATH.open("a") as lock_file:
        deadline = time.monotonic() + QUEUE_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"Timed out after {QUEUE_LOCK_TIMEOUT_S:.0f} s waiting for another run "
                        f"of these tests to release {QUEUE_LOCK_PATH}; stop that run and retry"
                    )
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def purge_queues(broker_url: str, *names: str) -> None:
    """Empty durable workflows queues, declaring them first if they are missing."""
    with Connection(broker_url) as connection:
        channel = connection.default_channel
        for name in names:
            queue = routing.task_queue(name).bind(channel)
            queue.declare()
            queue.purge()


def check_one_step_run(record: dict[str, Any], run_id: str, worker: WorkerProcess) -> None:
    """Check a web example's record of a finished one-step run of the sample pass-through service."""
    assert record["run_id"] == run_id
    assert record["state"] == "finished", f"{record}\n{worker.describe()}"
    assert record["origin"] == "one-step"
    assert record["in_flight"] == 0
    assert record["finished_at"] >= record["started_at"]
    (step,) = record["steps"]
    assert step["node"] == 1
    assert step["service"] == "Message Pipethrough"
    assert DESTINATION_QUEUE in step["destination"]
    assert step["worker"].startswith(f"{worker.node_name}@")
    assert step["outcome"] == "done"
    assert record["edges"] == [{"from": None, "to": 1, "messages": 1}]
