"""Recipes as Celery canvases: one routed signature per ``start`` entry.

``RecipeWrapper.start()`` itself computes the first messages of a run, so
``transport-delay``, ``exchange``, queues and topics are honoured exactly as
python-workflows honours them. Each message becomes a signature of the step task.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task, group
from celery import current_app as celery_current_app
from celery.canvas import Signature
from workflows.recipe.wrapper import RecipeWrapper

from workflows_celery.constants import STEP_TASK_NAME
from workflows_celery.errors import InvalidRunIdError
from workflows_celery.ledger import ledger_for
from workflows_celery.messages import OutgoingMessage
from workflows_celery.recipes import RecipeSource, prepare_recipe
from workflows_celery.transport import CeleryTransport, route_options

logger = logging.getLogger(__name__)


#: Run IDs that callers may choose: they name Redis keys and spool files.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def check_run_id(run_id: Any) -> None:
    """Check a run ID given by a caller (``environment["ID"]``, or the ``uuid`` parameter).

    Raises:
        InvalidRunIdError: it is not 1 to 128 letters, digits, ``_``, ``.``, ``:``
            or ``-``, starting with a letter or digit.
    """
    if isinstance(run_id, int) and not isinstance(run_id, bool):
        run_id = str(run_id)
    if not isinstance(run_id, str) or _RUN_ID.fullmatch(run_id) is None:
        raise InvalidRunIdError(
            f"Invalid run ID {run_id!r}: use 1 to 128 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or digit, or leave it out for a new UUID"
        )


def current_workflows_app() -> Celery:
    """Return Celery's current app when ``setup_app`` prepared it, else the ready-made app.

    A Django or Flask project's app is current once its module is imported,
    so ``start_recipe`` without ``app=`` sends with that app's settings.
    """
    current = celery_current_app._get_current_object()
    if STEP_TASK_NAME in current.tasks:
        return current
    from workflows_celery.application import default_app

    return default_app()


def first_messages(
    recipe: RecipeSource,
    parameters: Mapping[str, Any] | None = None,
    *,
    environment: Mapping[str, Any] | None = None,
    app: Celery | None = None,
    allow_unresolved: bool = False,
    origin: str | None = None,
) -> tuple[str, list[OutgoingMessage]]:
    """Return the run ID and the messages that start a run of ``recipe``.

    Nothing is sent. ``environment["ID"]`` is the run ID; a new one is made
    when it is absent. ``allow_unresolved`` keeps destinations that still hold
    a placeholder, as simulations do. ``origin`` names the recipe in error
    messages (by default its path, or "recipe").
    """
    prepared = prepare_recipe(recipe, parameters, origin=origin, allow_unresolved=allow_unresolved)
    run_environment = dict(environment or {})
    run_environment.setdefault("ID", str(uuid.uuid4()))
    check_run_id(run_environment["ID"])

    transport = CeleryTransport(app, dry_run=True)
    transport.capture = []
    wrapper = RecipeWrapper(recipe=prepared, transport=transport, environment=run_environment)
    wrapper.start()
    return str(run_environment["ID"]), transport.capture


def recipe_canvas(
    recipe: RecipeSource,
    parameters: Mapping[str, Any] | None = None,
    *,
    environment: Mapping[str, Any] | None = None,
    app: Celery | None = None,
) -> group:
    """Turn a recipe and its parameters into a Celery canvas that starts a run.

    ``apply_async()`` on the result sends the first messages from any process
    and returns a ``GroupResult`` whose ``id`` is the run ID
    (``environment["ID"]``). Steps report no results to the result backend.

    Raises:
        InvalidRecipeError: the recipe is invalid or a destination is unresolved.
    """
    app = app or current_workflows_app()
    run_id, messages = first_messages(recipe, parameters, environment=environment, app=app)
    recorder = ledger_for(app)
    if recorder is not None:
        # NOTE: recorded when the canvas is built, so a canvas that is never
        # applied leaves a run that stays "running" in the ledger.
        recorder.record_start(run_id, messages, _describe_source(recipe))
    signatures = [_signature(app, outgoing) for outgoing in messages]
    return group(signatures, app=app, task_id=run_id)


def start_recipe(
    recipe: RecipeSource,
    parameters: Mapping[str, Any] | None = None,
    *,
    environment: Mapping[str, Any] | None = None,
    app: Celery | None = None,
    allow_unresolved: bool = False,
    origin: str | None = None,
) -> str:
    """Start a run of ``recipe`` and return its run ID, without waiting for any step.

    ``origin`` names the recipe in error messages, e.g. a recipe name that a web
    client gave instead of the server's path to the file. Without ``app`` the
    run goes through :func:`current_workflows_app`.

    Raises:
        InvalidRecipeError: the recipe is invalid or a destination is unresolved
            (unless ``allow_unresolved``).
        MessageEncodeError: a start payload is not JSON serialisable.
    """
    app = app or current_workflows_app()
    run_id, messages = first_messages(
        recipe,
        parameters,
        environment=environment,
        app=app,
        allow_unresolved=allow_unresolved,
        origin=origin,
    )
    CeleryTransport(app).publish(messages, origin=origin or _describe_source(recipe))
    return run_id


def start_recipe_task(
    task: Task,
    recipe: Mapping[str, Any] | str,
    parameters: Mapping[str, Any] | None = None,
    environment: Mapping[str, Any] | None = None,
) -> str:
    """Start a run from a worker; the body of the ``workflows_celery.start_recipe`` task.

    ``celery beat`` schedules this task to start recipes periodically, and any
    Celery client can send it. ``recipe`` is a recipe object, JSON text, or the
    path of a recipe file on the worker's file system (relative paths start at the
    worker's working folder). Returns the run ID.

    Raises:
        InvalidRecipeError: the recipe is invalid, cannot be read, or a
            destination is unresolved. The task fails with this error, which
            Celery logs and reports to the result backend; the message is not
            retried, because the same input would fail again.
    """
    run_id = start_recipe(recipe, parameters, environment=environment, app=task.app)
    origin = recipe if isinstance(recipe, str) and not recipe.lstrip().startswith("{") else "a recipe"
    logger.info("Started run %s of %s", run_id, origin)
    return run_id


def _describe_source(recipe: RecipeSource) -> str:
    """Name a recipe in the run ledger: its path, or "recipe"."""
    if isinstance(recipe, (str, os.PathLike)) and not str(recipe).lstrip().startswith("{"):
        return str(recipe)
    return "recipe"


def _signature(app: Celery, outgoing: OutgoingMessage) -> Signature:
    options: dict[str, Any] = {
        "task_id": outgoing.task_id,
        "shadow": outgoing.display_name(),
        "ignore_result": True,
        **route_options(outgoing),
    }
    if outgoing.delay_s:
        options["countdown"] = outgoing.delay_s
    if outgoing.expiration_s is not None:
        options["expires"] = outgoing.expiration_s
    return app.signature(STEP_TASK_NAME, kwargs=outgoing.task_kwargs(), **options)
