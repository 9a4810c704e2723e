"""Context fields on the log records written while a recipe step runs.

Celery hands every record to its own handlers, so ``CommonService.extend_log``
(which workflows applies only when forwarding records to its frontend) would
otherwise have no effect. A record factory adds the fields of the step that is
running in the current thread to every record created there.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping
from typing import Any

_fields: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "workflows_celery_log_fields", default={}
)
_service: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "workflows_celery_log_service", default=None
)
_installed = False

#: Fields every record gets once the factory is installed ("-" outside a step).
DEFAULT_FIELDS = ("recipe_ID", "recipe_pointer")

#: Field with the step's service, run ID and recipe step as text, e.g. " [Find
#: spots run 3f2c... step 2]", and empty outside a step; worker log formats include it.
STEP_TEXT_FIELD = "workflows_step"

#: Celery's default ``worker_log_format``, which :func:`log_format_with_step` extends.
CELERY_WORKER_LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"

#: ``worker_log_format`` of apps set up by workflows-celery.
WORKER_LOG_FORMAT = (
    "[%(asctime)s: %(levelname)s/%(processName)s]%(" + STEP_TEXT_FIELD + ")s %(message)s"
)


def install() -> None:
    """Install the record factory once per process, keeping any earlier factory."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        for name, value in _fields.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        # Defaults, so that a log format naming these fields works on every record.
        for name in DEFAULT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, "-")
        if not hasattr(record, STEP_TEXT_FIELD):
            setattr(record, STEP_TEXT_FIELD, step_text(_fields.get()))
        service = _service.get()
        if service is not None:
            # The fields a service adds with ``extend_log`` (a private list of
            # CommonService; its name is stable across workflows 3.x).
            for name, value in getattr(service, "_CommonService__log_extensions", ()):
                setattr(record, name, value)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


@contextlib.contextmanager
def step_fields(service: Any = None, **fields: Any) -> Iterator[None]:
    """Add ``fields`` (and the service's ``extend_log`` fields) to records made inside."""
    merged = {**_fields.get(), **{k: v for k, v in fields.items() if v is not None}}
    fields_token = _fields.set(merged)
    service_token = _service.set(service)
    try:
        yield
    finally:
        _service.reset(service_token)
        _fields.reset(fields_token)


def step_text(fields: Mapping[str, Any]) -> str:
    """Return the service, run ID and recipe step as log text, or "" outside a step."""
    parts = []
    if fields.get("workflows_service"):
        parts.append(str(fields["workflows_service"]))
    if fields.get("recipe_ID") is not None:
        parts.append(f"run {fields['recipe_ID']}")
    if fields.get("recipe_pointer") is not None:
        parts.append(f"step {fields['recipe_pointer']}")
    return f" [{' '.join(parts)}]" if parts else ""


def recipe_fields(headers: Mapping[str, Any], message: Any) -> dict[str, Any]:
    """Return the run ID and node of a recipe message, for log records."""
    if not headers.get("workflows-recipe") or not isinstance(message, Mapping):
        return {}
    environment = message.get("environment")
    run_id = environment.get("ID") if isinstance(environment, Mapping) else None
    return {"recipe_ID": run_id, "recipe_pointer": message.get("recipe-pointer")}
