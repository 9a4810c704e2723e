"""The run API: ``POST /runs`` starts a recipe of the recipe folder, and
``GET /runs/<run_id>`` shows a run's state from the run ledger.

Starting a run only publishes its first messages and returns the run ID, so it
waits for no worker. Neither view imports service code: the destination queue
of each message decides which worker runs it, and the workers record each step
in the run ledger, a few Redis keys per run that the state view reads.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest, HTTPException, MethodNotAllowed, NotFound

import workflows_celery
from workflows_celery.errors import (
    ConfigurationError,
    InvalidRecipeError,
    MessageEncodeError,
    MessageTooLargeError,
    TransportNotConnectedError,
)
from workflows_celery.ledger import (
    Ledger,
    LedgerError,
    LedgerUnavailableError,
    RunRecord,
    require_ledger,
)

logger = logging.getLogger(__name__)

bp = Blueprint("runs", __name__)

#: A recipe name is the name of a file in the recipe folder, without ``.json``.
#: Allowing no path separator and no leading dot keeps requests inside the folder.
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

#: Fields of the request body.
BODY_FIELDS = frozenset({"recipe", "parameters"})

#: A run ID: the UUID that ``POST /runs`` returns, or an ID of the caller's own
#: made of letters, digits, "-" and "_", so that no other text reaches Redis.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

#: Maximum ``?wait=`` in seconds, because each waiting request keeps a server thread busy.
MAX_WAIT_S = 30.0

#: The routes of the API, for the message of a 404.
ROUTES = "POST /runs and GET /runs/<run_id>"


@bp.post("/runs")
def start_run() -> ResponseReturnValue:
    """Start the recipe named in the JSON body and respond 202 with the run ID.

    The body is ``{"recipe": NAME, "parameters": {...}}``, and ``parameters``
    may be left out. Errors are JSON objects with an ``error`` message:

    - 400: a malformed body, an invalid recipe name, invalid parameters, or a
      recipe that is invalid with these parameters.
    - 404: no recipe of that name in the recipe folder.
    - 413: the run's first message is too large.
    - 415: the body is not sent as JSON.
    - 503: the broker cannot be reached.
    """
    if not request.is_json:
        return _error(415, "send the body as JSON, with Content-Type: application/json")
    try:
        body = request.get_json()
    except BadRequest as error:
        # Outside debug mode Flask replaces the parser's message with a generic
        # one, but keeps the parser's exception as the cause.
        detail = error.__cause__ or error.description
        return _error(400, f"the request body is not valid JSON: {detail}")
    if not isinstance(body, dict):
        return _error(
            400,
            f"the request body is a JSON {_json_type(body)}; expected an object "
            'such as {"recipe": "pipethrough", "parameters": {"sample": "lysozyme"}}',
        )
    unexpected = sorted(set(body) - BODY_FIELDS)
    if unexpected:
        return _error(
            400,
            f"unexpected field(s) {', '.join(map(repr, unexpected))} in the request body; "
            'the fields are "recipe" and "parameters"',
        )

    name = body.get("recipe")
    if name is None:
        return _error(400, 'the request body has no "recipe"; give the name of a recipe')
    if not isinstance(name, str) or not RECIPE_NAME.fullmatch(name):
        return _error(
            400,
            f"invalid recipe name {name!r}; give the name of a file in the recipe folder "
            "without .json, made of letters, digits, '.', '_' and '-'",
        )
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        return _error(
            400,
            f'"parameters" is a JSON {_json_type(parameters)}; expected an object '
            'of names and values, such as {"sample": "lysozyme"}',
        )

    recipe_folder = Path(current_app.config["RECIPE_FOLDER"])
    recipe_path = recipe_folder / f"{name}.json"
    if not recipe_path.is_file():
        known = ", ".join(recipe_names(recipe_folder)) or "none"
        return _error(404, f"no recipe named {name!r}; the known recipes are: {known}")
    return _start(name, recipe_path, parameters)


def _start(name: str, recipe_path: Path, parameters: dict[str, Any]) -> ResponseReturnValue:
    celery_app = current_app.extensions["celery"]
    try:
        # origin= names the recipe in errors, which the client receives, instead
        # of the server's path to the file.
        run_id = workflows_celery.start_recipe(recipe_path, parameters, app=celery_app, origin=name)
    except InvalidRecipeError as error:
        # Logged, because the recipe file itself may be what is wrong.
        logger.info("Run of recipe %s rejected: %s", name, error)
        return _error(400, f"recipe {name!r} with these parameters is invalid: {error}")
    except MessageTooLargeError as error:
        logger.info("Run of recipe %s rejected: %s", name, error)
        return _error(413, str(error))
    except MessageEncodeError as error:
        logger.info("Run of recipe %s rejected: %s", name, error)
        return _error(400, str(error))
    except TransportNotConnectedError as error:
        logger.warning("Run of recipe %s not started: %s", name, error)
        return _error(
            503, "the message broker cannot be reached, so no run was started; retry later"
        )

    logger.info("Started run %s of recipe %s", run_id, name)
    return jsonify(run_id=run_id), 202


@bp.get("/runs/<run_id>")
def show_run(run_id: str) -> ResponseReturnValue:
    """Respond with the run's record from the run ledger, as JSON.

    ``?wait=SECONDS`` (at most :data:`MAX_WAIT_S`) first waits until the run
    has ended or the time is up. A run that has not ended by then is shown as
    it is, still ``running``, with status 200. Errors are JSON objects with an
    ``error`` message:

    - 400: an invalid run ID or ``wait``.
    - 404: no run of that ID in the ledger.
    - 501: the app has no run ledger, because ``workflows_ledger`` is off or
      no Redis is configured for it.
    - 503: the ledger's Redis cannot be reached.
    """
    if not RUN_ID.fullmatch(run_id):
        return _error(
            400,
            f"invalid run ID {run_id!r}; give the run_id that POST /runs returned, "
            "such as 461b2ee3-06cc-4182-bdac-ef7c6f7fd19c",
        )
    wait = request.args.get("wait")
    wait_s = parse_wait(wait)
    if wait_s is None:
        return _error(
            400,
            f"invalid wait {wait!r}; give the seconds to wait for the run to end, "
            f"a number from 0 to {MAX_WAIT_S:g}",
        )

    try:
        ledger = require_ledger(current_app.extensions["celery"])
    except ConfigurationError as error:
        logger.error("Cannot show run %s: %s", run_id, error)
        return _error(
            501,
            "this server has no run ledger, so it cannot show runs; its administrator "
            "can set workflows_ledger_url to a Redis URL",
        )
    try:
        record = read_run(ledger, run_id, wait_s)
    except LedgerUnavailableError as error:
        logger.warning("%s; responded with 503", error)
        return _error(503, "the run ledger cannot be reached; retry later")
    except LedgerError:
        return _error(
            404,
            f"no run {run_id!r} in the run ledger; check the ID: the ledger keeps a run "
            f"for {_duration(ledger.ttl_s)} after its last update, and has no record of "
            "runs started while it was off",
        )
    return jsonify(record.as_dict())


def parse_wait(value: str | None) -> float | None:
    """Return the seconds of a ``wait`` query parameter: 0 when absent, None when invalid."""
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        return None
    # False for NaN as well.
    if not 0 <= seconds <= MAX_WAIT_S:
        return None
    return seconds


def read_run(ledger: Ledger, run_id: str, wait_s: float) -> RunRecord:
    """Read a run from the ledger, after waiting up to ``wait_s`` for its end.

    Raises:
        LedgerError: the run is not in the ledger, or the ledger cannot be read.
    """
    # NOTE: a Redis that accepts connections but does not respond blocks each
    # read for the ledger's socket timeout (5 s), which can exceed wait_s.
    if wait_s > 0:
        try:
            return ledger.wait(run_id, wait_s)
        except TimeoutError:
            # Not an error for the client: the record shows the run still going.
            pass
    return ledger.get(run_id)


@bp.app_errorhandler(HTTPException)
def http_error(error: HTTPException) -> ResponseReturnValue:
    """Return the app's HTTP errors as JSON, from an unknown URL to an unhandled exception.

    Registered for the whole app, because the app is the API. The response
    keeps the error's headers, such as the ``Allow`` header of a 405.
    """
    response = error.get_response()
    if isinstance(error, MethodNotAllowed):
        # Flask adds HEAD and OPTIONS to every route, so the message leaves them out.
        allowed = [
            method for method in error.valid_methods or [] if method not in ("HEAD", "OPTIONS")
        ]
        message = (
            f"method {request.method} is not allowed on {request.path}; "
            f"use {' or '.join(allowed)}"
        )
    elif isinstance(error, NotFound):
        message = f"no route {request.path}; the routes are {ROUTES}"
    else:
        message = f"{error.name}: {error.description}"
    response.set_data(current_app.json.dumps({"error": message}))
    response.content_type = "application/json"
    return response


def recipe_names(folder: Path) -> list[str]:
    """List the recipe names that a request may give: the folder's ``*.json`` files."""
    if not folder.is_dir():
        return []
    return sorted(path.stem for path in folder.glob("*.json") if RECIPE_NAME.fullmatch(path.stem))


def _json_type(value: Any) -> str:
    """Name the JSON type of a decoded value, as a client who sent it would."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _duration(seconds: int) -> str:
    """Write a number of seconds in days or hours when it is a whole number of them."""
    for unit, size in (("day", 86400), ("hour", 3600)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} s"


def _error(status: int, message: str) -> ResponseReturnValue:
    return jsonify(error=message), status
