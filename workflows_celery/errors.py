"""The errors raised by workflows-celery.

Every class derives from :class:`workflows.Error`, so code that already catches
workflows errors keeps working.
"""

from __future__ import annotations

import workflows


class WorkflowsCeleryError(workflows.Error):
    """Base class of every error raised by workflows-celery."""


class ConfigurationError(WorkflowsCeleryError):
    """Raised when a setting, an option or a service name cannot be used."""


class ServiceNotFoundError(ConfigurationError):
    """Raised when a service name matches no entry point and no import path."""


class InvalidRecipeError(WorkflowsCeleryError):
    """Raised when a recipe cannot be parsed or fails validation.

    The message starts with "Invalid recipe:", as the errors of workflows do.
    """


class RecipeNotFoundError(InvalidRecipeError):
    """Raised when a recipe name matches no recipe file in the recipe folder."""


class InvalidRunIdError(WorkflowsCeleryError):
    """Raised when a run ID chosen by the caller cannot be used."""


class InvalidStartRequestError(WorkflowsCeleryError):
    """Raised when a start request (recipe names, parameters, custom recipe) is malformed."""


class MessageEncodeError(WorkflowsCeleryError):
    """Raised to the sender when a message or its headers cannot be sent as JSON."""


class MessageTooLargeError(MessageEncodeError):
    """Raised to the sender when a message is larger than the size limit."""


class NotARecipeError(WorkflowsCeleryError):
    """Raised when a message without a recipe reaches a subscription that takes recipes only."""


class InvalidSendOptionError(WorkflowsCeleryError):
    """Raised when a send option (delay, expiration, transaction) has a bad value."""


class TransportNotConnectedError(WorkflowsCeleryError, workflows.Disconnected):
    """Raised when the broker cannot be reached or the connection was lost."""


class UnknownSubscriptionError(WorkflowsCeleryError):
    """Raised when an ack, nack or unsubscribe names no live subscription or message."""
