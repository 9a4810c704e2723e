"""Listing queues through RabbitMQ's management HTTP API.

AMQP has no way to list queues, so ``workflows-celery dlq list`` sends a request
to the management plugin (``rabbitmq_management``). Its address defaults to
port 15672 of the broker's host, with the broker's user and password.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from kombu.utils.url import url_to_parts

from workflows_celery.errors import ConfigurationError
from workflows_celery.redaction import mask_url

logger = logging.getLogger(__name__)

#: Port of the management plugin's HTTP API unless configured otherwise.
DEFAULT_MANAGEMENT_PORT = 15672

#: Seconds to wait for the management API.
TIMEOUT_S = 10.0


def management_url_for(broker_url: str) -> str:
    """Return the usual management API address for an AMQP broker URL."""
    parts = url_to_parts(broker_url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{DEFAULT_MANAGEMENT_PORT}"


def queue_names(broker_url: str, management_url: str | None = None) -> list[str]:
    """Return the names of the queues of the broker's virtual host.

    Args:
        broker_url: The AMQP broker URL; its user, password and virtual host are used.
        management_url: The management API's address (default: port 15672 of
            the broker's host).

    Raises:
        ConfigurationError: the API cannot be reached or refuses the request.
    """
    parts = url_to_parts(broker_url)
    base = (management_url or management_url_for(broker_url)).rstrip("/")
    virtual_host = parts.path or "/"
    address = f"{base}/api/queues/{urllib.parse.quote(virtual_host, safe='')}?columns=name"
    credentials = f"{parts.username or 'guest'}:{parts.password or 'guest'}".encode()
    request = urllib.request.Request(
        address,
        headers={"Authorization": "Basic " + base64.b64encode(credentials).decode()},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            queues: Any = json.load(response)
    except urllib.error.HTTPError as error:
        raise ConfigurationError(
            f"The RabbitMQ management API at {base} rejected the request to list the queues of "
            f"{mask_url(broker_url)} (HTTP {error.code} {error.reason}); check that the "
            "broker URL's user may use the management API, or name the queues to check"
        ) from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ConfigurationError(
            f"Cannot list the queues of {mask_url(broker_url)}: the RabbitMQ management "
            f"API at {base} is unreachable ({error}); enable the rabbitmq_management "
            "plugin, give its address with --management-url, or name the queues to check, "
            "e.g. 'workflows-celery dlq list per_image_analysis'"
        ) from error
    names = [str(queue["name"]) for queue in queues if isinstance(queue, dict) and "name" in queue]
    logger.debug("Management API at %s listed %d queues", base, len(names))
    return names
