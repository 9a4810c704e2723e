"""Private Redis and RabbitMQ servers that the soak test may stop and restart.

The soak test restarts its broker in the middle of many runs, so it never uses
a shared server. Each broker here is a new server process on a free port of
127.0.0.1, keeping its data in a folder of its own. Both keep queued messages
on disk, so a restart loses nothing that the broker had accepted. Redis writes
every command to its append-only file before it replies, and RabbitMQ keeps
persistent messages of durable queues.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

#: Seconds a server may take to accept connections after it was started.
START_TIMEOUT_S = 60.0
#: Seconds a server may take to exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT_S = 30.0


class BrokerError(RuntimeError):
    """A private broker could not be started or stopped."""


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    """Tell whether something accepts connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Return the PIDs of every descendant of ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: split after it.
        fields = stat.rsplit(")", 1)[-1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


class PrivateBroker:
    """A broker server run by this process, which it may stop and start again.

    Args:
        folder: Where the server keeps its data and its log.
    """

    #: Scheme of the broker URL, set by each kind of server.
    kind = ""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        """The Celery broker URL of this server."""
        raise NotImplementedError

    def command(self) -> list[str]:
        """Return the command line that starts the server in the foreground."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Environment variables for the server."""
        return dict(os.environ)

    def server_pid(self) -> int:
        """Return the PID of the server process, which may be a descendant of the one started."""
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self.process is not None and self.process.poll() is None:
            raise BrokerError(f"{self.kind} server on port {self.port} already runs")
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "server.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.folder,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BrokerError(
                    f"{self.kind} server did not start on 127.0.0.1:{self.port}; "
                    f"see {self.folder / 'server.log'}"
                )
            time.sleep(0.1)
        logger.info("Started %s on 127.0.0.1:%d", self.kind, self.port)

    def stop(self) -> None:
        """Stop the server with SIGTERM (SIGKILL after a timeout) and wait until it is gone."""
        process = self.process
        if process is None:
            return
        pids = [self.server_pid(), *descendants(process.pid), process.pid]
        for pid in dict.fromkeys(pids):
            _signal(pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for pid in dict.fromkeys([*descendants(process.pid), process.pid]):
                _signal(pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.process = None
        logger.info("Stopped %s on 127.0.0.1:%d", self.kind, self.port)

    def remove_data(self) -> None:
        """Delete what the server stored outside ``folder`` (nothing for most servers)."""

    def restart(self, down_s: float = 1.0) -> None:
        """Stop the server, leave it down for ``down_s`` seconds, and start it again."""
        self.stop()
        time.sleep(down_s)
        self.start()
        self.restarts += 1


class PrivateRedis(PrivateBroker):
    """A Redis server that writes every command to its append-only file before it replies."""

    kind = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.folder),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip


class PrivateRabbitMQ(PrivateBroker):
    """A RabbitMQ node of its own, with its own name, ports and database folder.

    Args:
        folder: Where the node's output goes.
        management: Also run the management plugin, on a free port of 127.0.0.1.
    """

    kind = "rabbitmq"

    def __init__(self, folder: Path, *, management: bool = False) -> None:
        super().__init__(folder)
        self.node_name = f"soak-{uuid.uuid4().hex[:8]}@localhost"
        self.distribution_port = free_port()
        self.management_port = free_port() if management else None
        # rabbitmq-server started by root runs the node as the rabbitmq user,
        # which must own the node's files and reach them: a folder of its own
        # in the temporary directory, whatever ``folder`` is.
        self.node_folder = Path(tempfile.mkdtemp(prefix="workflows-celery-rabbitmq-"))
        node = self.node_folder
        config = f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        plugins = "[]."
        if self.management_port is not None:
            config += f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
            plugins = "[rabbitmq_management]."
        (node / "rabbitmq.conf").write_text(config)
        (node / "enabled_plugins").write_text(plugins + "\n")
        for sub in ("database", "log"):
            (node / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            for path in [node, *node.rglob("*")]:
                shutil.chown(path, "rabbitmq", "rabbitmq")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def management_url(self) -> str:
        """Address of the management API (only with ``management=True``)."""
        if self.management_port is None:
            raise BrokerError("this node runs without the management plugin")
        return f"http://127.0.0.1:{self.management_port}"

    def start(self) -> None:
        super().start()
        if self.management_port is None:
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open(self.management_port):
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"RabbitMQ management API did not start on 127.0.0.1:{self.management_port}"
                )
            time.sleep(0.2)

    def command(self) -> list[str]:
        return [shutil.which("rabbitmq-server") or "rabbitmq-server"]

    def environment(self) -> dict[str, str]:
        folder = self.node_folder
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_DIST_PORT": str(self.distribution_port),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
            "RABBITMQ_MNESIA_BASE": str(folder / "database"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(folder / "feature_flags"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "ERL_CRASH_DUMP": str(folder / "log" / "erl_crash.dump"),
            # Erlang's node-to-node port and port mapper stay on the loopback.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def remove_data(self) -> None:
        shutil.rmtree(self.node_folder, ignore_errors=True)

    def server_pid(self) -> int:
        # rabbitmq-server runs the Erlang VM (beam) as a descendant; SIGTERM to
        # the VM stops the node cleanly.
        assert self.process is not None
        for pid in descendants(self.process.pid):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name.startswith("beam"):
                return pid
        return self.process.pid


def private_broker(kind: str, folder: Path) -> PrivateBroker:
    """Return a private broker of ``kind`` (``redis`` or ``rabbitmq``), not started yet."""
    kinds: dict[str, type[PrivateBroker]] = {"redis": PrivateRedis, "rabbitmq": PrivateRabbitMQ}
    try:
        return kinds[kind](folder)
    except KeyError:
        raise BrokerError(f"Unknown broker kind {kind!r}; use redis or rabbitmq") from None


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
