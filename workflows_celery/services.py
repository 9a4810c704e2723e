"""Finding workflows services by name and learning which queues they read."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Any

from celery import Celery
from workflows.services.common_service import CommonService
from workflows.transport.common_transport import CommonTransport

from workflows_celery.errors import ConfigurationError, ServiceNotFoundError
from workflows_celery.messages import Destination

logger = logging.getLogger(__name__)

SERVICE_ENTRY_POINT_GROUP = "workflows.services"


def known_services() -> dict[str, Any]:
    """Return the entry points of the ``workflows.services`` group by name."""
    return {entry.name: entry for entry in entry_points(group=SERVICE_ENTRY_POINT_GROUP)}


def load_service(name: str | type[CommonService]) -> type[CommonService]:
    """Load a service class from an entry-point name or an import path.

    Import paths may be written ``package.module:Class`` or
    ``package.module.Class``.

    Raises:
        ServiceNotFoundError: nothing of that name can be loaded.
    """
    if isinstance(name, type):
        return _check_service_class(name, name.__qualname__)
    name = name.strip()
    known = known_services()
    if name in known:
        return _check_service_class(known[name].load(), name)
    if ":" in name or "." in name:
        module_name, _, attribute = name.replace(":", ".").rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ServiceNotFoundError(
                f"Service {name!r} not found: cannot import module {module_name!r} ({error})"
            ) from error
        try:
            return _check_service_class(getattr(module, attribute), name)
        except AttributeError:
            raise ServiceNotFoundError(
                f"Service {name!r} not found: module {module_name!r} has no {attribute!r}"
            ) from None
    raise ServiceNotFoundError(
        f"Service {name!r} not found: it is neither a 'workflows.services' entry point "
        f"nor an import path such as 'package.module:ServiceClass'. "
        f"Installed services: {', '.join(sorted(known)) or 'none'}"
    )


def _check_service_class(candidate: Any, name: str) -> type[CommonService]:
    if not (isinstance(candidate, type) and issubclass(candidate, CommonService)):
        raise ServiceNotFoundError(
            f"Service {name!r} is {candidate!r}, not a subclass of "
            "workflows.services.common_service.CommonService"
        )
    return candidate


def transport_of(service: CommonService) -> CommonTransport:
    """Return the transport a started service uses.

    Raises:
        ConfigurationError: the service was started without a transport.
    """
    transport = service._transport
    if transport is None:
        raise ConfigurationError(
            f"Service {type(service).__name__} has no transport; start it through a "
            "worker or set service.transport first"
        )
    return transport


def parse_service_names(value: Any) -> list[str | type[CommonService]]:
    """Split a ``--services`` option or setting into names (comma or space separated).

    Classes in a list are kept as they are.
    """
    if not value:
        return []
    if isinstance(value, (str, type)):
        value = [value]
    names: list[str | type[CommonService]] = []
    for item in value:
        if isinstance(item, type):
            names.append(item)
            continue
        names.extend(part for part in str(item).replace(",", " ").split() if part)
    return names


def discover_subscriptions(app: Celery, service_class: type[CommonService]) -> list[Destination]:
    """Run ``initializing()`` on a throwaway instance to learn what it subscribes to.

    The instance gets a dry-run transport: subscriptions are recorded, sends are
    dropped (the real instances, started later in each worker process, make
    them), and nothing is consumed.

    Raises:
        ConfigurationError: ``initializing()`` failed.
    """
    from workflows_celery.transport import CeleryTransport

    service = service_class(environment={})
    transport = CeleryTransport(app, dry_run=True)
    service.transport = transport
    transport.connect()
    try:
        service.initializing()
    except Exception as error:
        raise ConfigurationError(
            f"Service {service_class.__name__} failed in initializing(): {error!r}"
        ) from error
    return [destination for destination, _ in transport.recorded_subscriptions]
