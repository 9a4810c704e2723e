"""The run API: POST /runs/ starts a recipe of the recipe folder."""

import json
import logging
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from runs.recipes import InvalidRecipeNameError, UnknownRecipeError, start_named_recipe
from workflows_celery.errors import (
    InvalidRecipeError,
    MessageEncodeError,
    TransportNotConnectedError,
)

logger = logging.getLogger(__name__)

#: Fields of the request body of POST /runs/.
REQUEST_FIELDS = ("recipe", "parameters")

#: A request body to show in error messages.
EXAMPLE_BODY = '{"recipe": "pipethrough", "parameters": {"sample": "lysozyme"}}'

#: JSON names of the types that ``json.loads`` returns, for error messages.
JSON_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


# CSRF protection stops another site from using a browser's cookies to act in
# its user's name. This API reads no cookies and has no login, and it accepts
# only Content-Type: application/json, which a page on another site can send
# only after a CORS preflight that this project does not grant. When the API
# authenticates with session cookies, remove the exemption and send the token.
@csrf_exempt
@require_POST
def start_run(request: HttpRequest) -> JsonResponse:
    """Start the named recipe with the given parameters and return its run ID.

    The request body is ``{"recipe": NAME, "parameters": {...}}``, where NAME is
    a file of the recipe folder without ``.json``. The view only publishes the
    run's first messages, so it returns 202 without waiting for a worker.
    Errors are JSON objects ``{"error": MESSAGE}``: 400 for a malformed body, an
    invalid recipe or invalid parameters, 404 for an unknown recipe, 415 for a
    body that is not JSON, 503 when the broker cannot be reached.
    """
    if request.content_type != "application/json":
        return error_response(
            415,
            f"expected Content-Type: application/json, not {request.content_type or 'none'!r}; "
            f"send a JSON body such as {EXAMPLE_BODY}",
        )
    try:
        body = json.loads(request.body)
    except (ValueError, RecursionError) as error:
        return error_response(400, f"the request body is not valid JSON ({error})")

    problem = check_body(body)
    if problem:
        return error_response(400, problem)
    name = body["recipe"]
    parameters = body.get("parameters", {})

    try:
        run_id = start_named_recipe(name, parameters)
    except InvalidRecipeNameError as error:
        return error_response(400, str(error))
    except UnknownRecipeError as error:
        return error_response(404, str(error))
    except (InvalidRecipeError, MessageEncodeError) as error:
        return error_response(400, str(error))
    except TransportNotConnectedError as error:
        # The message names the broker; the client needs only to retry later.
        logger.error("Cannot start a run of recipe %r: %s", name, error)
        return error_response(503, "the message broker is unreachable; try again later")

    logger.info("Started run %s of recipe %r", run_id, name)
    return JsonResponse({"run_id": run_id}, status=202)


def check_body(body: Any) -> str | None:
    """Return what is wrong with the decoded request body, or None when nothing is."""
    if not isinstance(body, dict):
        return f"expected a JSON object such as {EXAMPLE_BODY}, not a JSON {json_type(body)}"
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        return f"unknown field {names}: the fields are 'recipe' and 'parameters'"
    if "recipe" not in body:
        return f"missing field 'recipe': name the recipe to start, as in {EXAMPLE_BODY}"
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        return (
            f"'parameters' must be a JSON object of recipe parameters, such as "
            f'{{"sample": "lysozyme"}}, not a JSON {json_type(parameters)}'
        )
    return None


def json_type(value: Any) -> str:
    """Return the JSON name of the type of a value that ``json.loads`` returned."""
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def error_response(status: int, message: str) -> JsonResponse:
    """Return the JSON error ``{"error": message}`` with HTTP status ``status``."""
    return JsonResponse({"error": message}, status=status)
