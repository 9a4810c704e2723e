"""``POST /runs``: start a run of a recipe from the recipe folder.

The view only publishes the run's first messages and returns the run ID. It
waits for no worker. It imports no service code either: the destination queue
of each message decides which worker runs it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest

import workflows_celery
from workflows_celery.errors import (
    InvalidRecipeError,
    MessageEncodeError,
    MessageTooLargeError,
    TransportNotConnectedError,
)

logger = logging.getLogger(__name__)

bp = Blueprint("runs", __name__)

#: A recipe name is the name of a file in the recipe folder, without ``.json``.
#: Allowing no path separator and no leading dot keeps requests inside the folder.
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

#: Fields of the request body.
BODY_FIELDS = frozenset({"recipe", "parameters"})


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
        # origin= names the recipe in errors, which the client sees, instead
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


def _error(status: int, message: str) -> ResponseReturnValue:
    return jsonify(error=message), status
