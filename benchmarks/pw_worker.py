"""One python-workflows service process, started as Zocalo starts services.

``python -m benchmarks.pw_worker AMQP_URL MODULE:CLASS`` runs workflows'
``Frontend`` with ``PikaTransport`` on the given RabbitMQ, which starts the
service in a process of its own and relays its status, as ``zocalo.service``
does.
"""

from __future__ import annotations

import importlib
import logging
import sys
from urllib.parse import unquote, urlsplit

import workflows.frontend
from workflows.transport.pika_transport import PikaTransport


def configure_pika(amqp_url: str) -> None:
    """Point ``PikaTransport`` at the RabbitMQ of ``amqp_url``."""
    parts = urlsplit(amqp_url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    PikaTransport.defaults.update(
        {
            "--rabbit-host": parts.hostname or "127.0.0.1",
            "--rabbit-port": parts.port or 5672,
            "--rabbit-user": unquote(parts.username or "guest"),
            "--rabbit-pass": unquote(parts.password or "guest"),
            "--rabbit-vhost": vhost,
        }
    )


def main(argv: list[str]) -> int:
    amqp_url, class_path = argv
    module_name, _, class_name = class_path.partition(":")
    service = getattr(importlib.import_module(module_name), class_name)
    logging.basicConfig(level=logging.WARNING)
    configure_pika(amqp_url)
    # zocalo.service passes its configuration here; these services need none.
    workflows.frontend.Frontend(transport=PikaTransport, service=service, environment={}).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
