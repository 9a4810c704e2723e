"""The wire format: workflows messages carried as Celery task messages.

A workflows message to a queue or topic is a message of the step task
(``workflows_celery.step``) whose keyword arguments hold the destination, the
workflows headers and the message itself. Celery's own headers (task id, ETA,
expiry) carry the transport details, so workers, ``celery inspect``, task events
and flower see every message.
"""

from __future__ import annotations

import math
import reprlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


from workflows_celery.constants import (
    HEADER_DELIVERY_COUNT,
    HEADER_RECIPE,
    KWARG_HEADERS,
    KWARG_MESSAGE,
    KWARG_QUEUE,
    KWARG_TOPIC,
)
from workflows_celery.errors import InvalidSendOptionError

#: Characters of the summary of a message that Celery shows as the step's
#: arguments (task events, flower). Celery's own ``saferepr`` of the whole
#: message cost about a tenth of a step's CPU time in the benchmarks.
ARGUMENTS_SUMMARY_CHARS = 256

_summary_repr = reprlib.Repr()
_summary_repr.maxstring = 80
_summary_repr.maxother = 80
_summary_repr.maxlevel = 3


@dataclass(frozen=True)
class Destination:
    """A queue or a topic, the two kinds of workflows destination."""

    name: str
    is_topic: bool = False

    @property
    def kind(self) -> str:
        """The word for this kind of destination: "queue" or "topic"."""
        return KWARG_TOPIC if self.is_topic else KWARG_QUEUE

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r}"


@dataclass(frozen=True)
class PreparedMessage:
    """A step task message as Celery builds it, with its body already encoded to JSON."""

    task_message: Any
    body: str


@dataclass
class OutgoingMessage:
    """A message ready to publish, with the options workflows gives to ``send``."""

    destination: Destination
    message: Any
    headers: dict[str, Any] = field(default_factory=dict)
    delay_s: float | None = None
    expiration_s: float | None = None
    exchange: str | None = None
    task_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: Absolute ETA and expiry (ISO 8601) of a message published again, which
    #: keep their original values instead of restarting from now.
    eta: str | None = None
    expires_at: str | None = None
    #: Extra broker message headers, e.g. the dead-letter record ``x-death``.
    broker_headers: dict[str, Any] = field(default_factory=dict)
    #: The Celery task message and its JSON body, once built for publishing.
    prepared: PreparedMessage | None = field(default=None, repr=False, compare=False)

    def task_kwargs(self) -> dict[str, Any]:
        """Return the step task's keyword arguments for this message."""
        return {
            self.destination.kind: self.destination.name,
            KWARG_HEADERS: self.headers,
            KWARG_MESSAGE: self.message,
        }

    def run_id(self) -> str | None:
        """Return the recipe run ID (``environment.ID``) of a recipe message, if any."""
        if not self.headers.get(HEADER_RECIPE) or not isinstance(self.message, Mapping):
            return None
        environment = self.message.get("environment")
        if isinstance(environment, Mapping) and environment.get("ID") is not None:
            return str(environment["ID"])
        return None

    def arguments_summary(self) -> str:
        """Return the short form of the step's arguments that Celery shows.

        It names the destination and, for a recipe message, the run ID, the
        recipe step and the payload instead of the whole recipe, so that
        flower's search finds a run's steps by run ID. Long values are cut short.
        """
        parts = [f"{self.destination.kind!r}: {self.destination.name!r}"]
        if self.headers.get(HEADER_RECIPE) and isinstance(self.message, Mapping):
            parts.append(f"'run': {self.run_id()!r}")
            parts.append(f"'recipe-pointer': {self.message.get('recipe-pointer')!r}")
            parts.append(f"'payload': {_summary_repr.repr(self.message.get('payload'))}")
        else:
            parts.append(f"'message': {_summary_repr.repr(self.message)}")
        return ("{" + ", ".join(parts) + "}")[:ARGUMENTS_SUMMARY_CHARS]

    def display_name(self) -> str:
        """Return the name Celery shows for this message (logs, events, flower).

        A recipe step is shown by the service its node names, other messages by
        their destination.
        """
        if self.headers.get(HEADER_RECIPE) and isinstance(self.message, Mapping):
            recipe = self.message.get("recipe")
            pointer = self.message.get("recipe-pointer")
            if isinstance(recipe, Mapping):
                node = recipe.get(pointer, recipe.get(str(pointer)))
                if isinstance(node, Mapping) and node.get("service"):
                    return f"{node['service']} ({self.destination.name})"
        return self.destination.name


def check_seconds(option: str, value: Any) -> float | None:
    """Validate a delay or expiration given in seconds and return it as a float.

    Raises:
        InvalidSendOptionError: the value is not a finite, non-negative number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSendOptionError(
            f"Invalid {option} {value!r}: expected a number of seconds, "
            f"for example {option}=1.5"
        )
    if not math.isfinite(value) or value < 0:
        raise InvalidSendOptionError(
            f"Invalid {option} {value!r}: seconds must be zero or positive"
        )
    return float(value)


def destination_from_kwargs(kwargs: Mapping[str, Any]) -> Destination | None:
    """Read the destination from the step task's keyword arguments, if present."""
    if isinstance(kwargs.get(KWARG_QUEUE), str):
        return Destination(kwargs[KWARG_QUEUE])
    if isinstance(kwargs.get(KWARG_TOPIC), str):
        return Destination(kwargs[KWARG_TOPIC], is_topic=True)
    return None


def callback_header(
    headers: Mapping[str, Any] | None,
    *,
    message_id: str,
    subscription_id: int,
    destination: Destination,
    delivery_info: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Build the header dictionary a workflows callback receives.

    The fields added to the sender's headers are those ``PikaTransport`` adds,
    so services that read them keep working. ``message-id`` is the Celery task
    id: it stays the same when the broker delivers a message again.
    """
    info = delivery_info or {}
    header = dict(headers or {})
    header.update(
        {
            "message-id": message_id,
            "subscription": subscription_id,
            "redelivered": bool(info.get("redelivered")) or bool(header.get(HEADER_DELIVERY_COUNT)),
            "exchange": info.get("exchange") or "",
            "routing_key": info.get("routing_key") or destination.name,
            "destination": destination.name,
            "delivery_mode": 2,
        }
    )
    return header


def run_id_of(kwargs: dict[str, Any]) -> str | None:
    """Return the run ID of a step task's recipe message, or None for other messages."""
    headers = kwargs.get(KWARG_HEADERS)
    message = kwargs.get(KWARG_MESSAGE)
    if not isinstance(headers, dict) or not headers.get(HEADER_RECIPE):
        return None
    if not isinstance(message, dict) or not isinstance(message.get("environment"), dict):
        return None
    run_id = message["environment"].get("ID")
    return None if run_id is None else str(run_id)
