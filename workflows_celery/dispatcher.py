"""The dispatcher service: starts the runs that Zocalo-format start requests describe.

Zocalo's clients (``zocalo.go`` and others) send a start request to the
``processing_recipe`` queue instead of starting the run themselves. Hosting
:class:`RecipeDispatcher` in a worker (``--services RecipeDispatcher``) keeps
those clients working: it reads each request, merges the named recipes of the
recipe folder and the custom recipe, applies the parameters, and sends the
run's first messages. The acknowledgement of the request and the first messages
go in one transaction, so a request either starts its run once or stays queued.

A request that cannot be started (malformed, an unknown recipe, an invalid
recipe) is rejected and goes to the queue's dead-letter queue,
``dlq.processing_recipe``, where ``workflows-celery dlq`` shows it with the
error.
"""

from __future__ import annotations

from typing import Any

import workflows.recipe
from workflows.recipe.wrapper import RecipeWrapper
from workflows.services.common_service import CommonService

from workflows_celery import ledger
from workflows_celery.catalog import StartRequest, build_recipe, recipe_folder
from workflows_celery.constants import DISPATCHER_QUEUE
from workflows_celery.errors import WorkflowsCeleryError
from workflows_celery.services import transport_of


class RecipeDispatcher(CommonService):
    """Starts a run for every start request on the ``processing_recipe`` queue."""

    _service_name = "Recipe dispatcher"
    _logger_name = "workflows_celery.dispatcher"

    def initializing(self) -> None:
        transport = transport_of(self)
        self.recipe_folder = recipe_folder(getattr(transport, "app", None))
        if self.recipe_folder is None:
            self.log.warning(
                "No recipe folder is set, so only requests with a custom recipe can be "
                "started; set WORKFLOWS_CELERY_RECIPE_DIR or the workflows_recipe_dir setting"
            )
        else:
            self.log.info("Starting runs from %s with recipes of %s", DISPATCHER_QUEUE, self.recipe_folder)
        workflows.recipe.wrap_subscribe(
            transport,
            DISPATCHER_QUEUE,
            self.process,
            acknowledgement=True,
            allow_non_recipe_messages=True,
            log_extender=self.extend_log,
        )

    def process(self, rw: RecipeWrapper | None, header: dict[str, Any], message: Any) -> None:
        """Start the run that a start request describes, or reject the request."""
        transport = transport_of(self)
        try:
            request = StartRequest.from_message(message)
            run_id, recipe = build_recipe(request, self.recipe_folder)
        except WorkflowsCeleryError as error:
            self.log.error(
                "Rejected start request %s: %s", header.get("message-id"), error
            )
            transport.nack(header, requeue=False, reason=str(error))
            return

        with self.extend_log("recipe_ID", run_id), ledger.start_origin(request.describe()):
            transaction = transport.transaction_begin()
            transport.ack(header, transaction=transaction)
            started = RecipeWrapper(recipe=recipe, transport=transport, environment={"ID": run_id})
            started.start(transaction=transaction)
            transport.transaction_commit(transaction)
            self.log.info("Started run %s of %s", run_id, request.describe())
