"""A TCP relay that counts the bytes between clients and a broker.

The bytes-on-the-wire phase points workers and sender at the relay instead of
the broker. Every byte of every connection, including connections that have
closed, is counted in both directions, and nothing is changed on the way.
It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import logging
import socket
import threading

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 65536


class CountingRelay:
    """Forward connections from ``127.0.0.1:<port>`` to ``target_port`` and count bytes.

    Args:
        target_port: Port of the broker on 127.0.0.1.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._bytes = 0
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="relay", daemon=True)

    def start(self) -> CountingRelay:
        """Start accepting connections; return the relay."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every relayed connection."""
        self._closing.set()
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    @property
    def bytes_relayed(self) -> int:
        """Bytes relayed so far, both directions together."""
        with self._lock:
            return self._bytes

    def reset(self) -> None:
        """Start counting from zero."""
        with self._lock:
            self._bytes = 0

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError as error:
                logger.error("Relay cannot reach port %d: %s", self.target_port, error)
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, target), name="relay pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                chunk = source.recv(_CHUNK_BYTES)
                if not chunk:
                    break
                target.sendall(chunk)
                with self._lock:
                    self._bytes += len(chunk)
        except OSError:
            pass
        finally:
            # Closing one direction closes the other, as the peers expect.
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
