"""Recipe steps written as plain functions instead of ``CommonService`` subclasses."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import workflows.recipe
from celery import Celery
from workflows.recipe.wrapper import RecipeWrapper
from workflows.services.common_service import CommonService

from workflows_celery.services import transport_of

logger = logging.getLogger(__name__)


class StepFunction(Protocol):
    """A recipe step: receives the recipe wrapper, the headers and the payload."""

    __name__: str

    def __call__(self, rw: RecipeWrapper, header: dict[str, Any], payload: Any) -> None: ...


F = TypeVar("F", bound=StepFunction)


class FunctionStepService(CommonService):
    """A service that runs one step function for every recipe message on its queue.

    The message is acknowledged when the function returns. When it raises, the
    step task fails and Celery records the error.
    """

    step_queue: str = ""
    step_function: Callable[..., None]

    def initializing(self) -> None:
        self._subscription = workflows.recipe.wrap_subscribe(
            transport_of(self),
            self.step_queue,
            self._process,
            acknowledgement=True,
            allow_non_recipe_messages=True,
            log_extender=self.extend_log,
        )

    def _process(self, rw: RecipeWrapper | None, header: dict[str, Any], payload: Any) -> None:
        if rw is None:
            # The rejected message goes to the queue's dead-letter queue.
            self.log.error(
                "Rejected message %s on queue %r: it is not a recipe message "
                "(header 'workflows-recipe' missing); send it with a recipe",
                header.get("message-id"),
                self.step_queue,
            )
            transport_of(self).nack(
                header, requeue=False, reason="not a recipe message (header 'workflows-recipe' missing)"
            )
            return
        type(self).step_function(rw, header, payload)
        transport_of(self).ack(header)


def recipe_step(
    app: Celery, queue: str, *, name: str | None = None
) -> Callable[[F], F]:
    """Register a function as the recipe step that processes ``queue``.

    Every worker of ``app`` then consumes ``queue`` and calls the function with
    ``(recipe_wrapper, header, payload)``, as a ``wrap_subscribe`` callback is
    called::

        @recipe_step(app, "per_image_analysis")
        def find_spots(rw, header, payload):
            rw.send_to("success", {"spots": 12})

    Args:
        app: The Celery app whose workers run the step.
        queue: The queue the step reads.
        name: Human-readable service name (default: the function's name).
    """
    from workflows_celery.hosting import state_for

    def register(function: F) -> F:
        service_class = type(
            f"{function.__name__}_step",
            (FunctionStepService,),
            {
                "_service_name": name or function.__name__,
                "_logger_name": f"workflows.service.{function.__name__}",
                "step_queue": queue,
                "step_function": staticmethod(function),
                "__module__": function.__module__,
            },
        )
        state_for(app).function_steps.append(service_class)
        return function

    return register
