"""The run API: POST /runs/ starts a recipe of the recipe folder, and
GET /runs/<run_id>/ shows a run's state from the run ledger. Every error,
including those of Django's own handlers, is a JSON object.
"""

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from runs.ledger import (
    InvalidRunIdError,
    InvalidWaitError,
    LedgerUnavailableError,
    UnknownRunError,
    parse_wait,
    read_run,
)
from runs.recipes import InvalidRecipeNameError, UnknownRecipeError, start_named_recipe
from workflows_celery.errors import (
    ConfigurationError,
    InvalidRecipeError,
    MessageEncodeError,
    TransportNotConnectedError,
)

logger = logging.getLogger(__name__)

#: Fields of the request body of POST /runs/.
REQUEST_FIELDS = ("recipe", "parameters")

#: A request body to show in error messages.
EXAMPLE_BODY = '{"recipe": "pipethrough", "parameters": {"sample": "lysozyme"}}'

#: A Django view: a function of the request (and URL arguments) that returns a response.
ViewFunction = Callable[..., HttpResponse]

#: The routes of the API, for the message of a 404.
ROUTES = "POST /runs/ and GET /runs/<run_id>/"

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


def allow_methods(*methods: str) -> Callable[[ViewFunction], ViewFunction]:
    """Let a view accept only ``methods``, and return a JSON 405 for any other method.

    Django's ``require_http_methods`` does the same with an empty body.
    """

    def decorator(view: ViewFunction) -> ViewFunction:
        @functools.wraps(view)
        def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                response = error_response(
                    405,
                    f"method {request.method} is not allowed on {request.path}; "
                    f"use {' or '.join(methods)}",
                )
                response["Allow"] = ", ".join(methods)
                return response
            return view(request, *args, **kwargs)

        return checked

    return decorator


# CSRF protection stops another site from using a browser's cookies to act in
# its user's name. This API reads no cookies and has no login, and it accepts
# only Content-Type: application/json, which a page on another site can send
# only after a CORS preflight that this project does not grant. When the API
# authenticates with session cookies, remove the exemption and send the token.
@csrf_exempt
@allow_methods("POST")
def start_run(request: HttpRequest) -> JsonResponse:
    """Start the named recipe with the given parameters and return its run ID.

    The request body is ``{"recipe": NAME, "parameters": {...}}``, where NAME is
    a file of the recipe folder without ``.json``. The view only publishes the
    run's first messages, so it returns 202 without waiting for a worker.
    Errors are JSON objects ``{"error": MESSAGE}``. The status is 400 for a
    malformed body, an invalid recipe or invalid parameters, and 404 for an
    unknown recipe. It is 405 for a method other than POST, 415 for a body that
    is not JSON, and 503 when the broker cannot be reached.
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


# GET and HEAD, the methods of Django's require_safe.
@allow_methods("GET", "HEAD")
def show_run(request: HttpRequest, run_id: str) -> JsonResponse:
    """Return the run's record from the run ledger.

    ``?wait=SECONDS`` (at most 30) first waits until the run has ended or the
    time is up. A run that has not ended by then is shown as it is, still
    ``running``, with status 200. Errors are JSON objects ``{"error": MESSAGE}``.
    The status is 400 for an invalid run ID or wait, and 404 for a run that the
    ledger does not have. It is 405 for a method other than GET or HEAD, 501
    when the project has no ledger, and 503 when the ledger's Redis cannot be
    reached.
    """
    try:
        wait_s = parse_wait(request.GET.get("wait"))
        record = read_run(run_id, wait_s)
    except (InvalidRunIdError, InvalidWaitError) as error:
        return error_response(400, str(error))
    except UnknownRunError as error:
        return error_response(404, str(error))
    except ConfigurationError as error:
        logger.error("Cannot show run %s: %s", run_id, error)
        return error_response(
            501,
            "this server has no run ledger, so it cannot show runs; its administrator "
            "can set CELERY_WORKFLOWS_LEDGER_URL to a Redis URL",
        )
    except LedgerUnavailableError as error:
        logger.warning("%s; responded with 503", error)
        return error_response(503, "the run ledger is unreachable; try again later")
    return JsonResponse(record.as_dict())


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


# -- Django's error handlers, in JSON (see proj/urls.py) --------------------------------


def bad_request(request: HttpRequest, exception: Exception) -> JsonResponse:
    """Return the JSON 400 for a request that Django rejected as malformed or suspicious."""
    return error_response(
        400, "bad request, for example a Host header that the server does not serve"
    )


def permission_denied(request: HttpRequest, exception: Exception) -> JsonResponse:
    """Return the JSON 403 for a request that a view rejected with PermissionDenied."""
    return error_response(403, "permission denied")


def not_found(request: HttpRequest, exception: Exception) -> JsonResponse:
    """Return the JSON 404 for a URL that no route matches."""
    return error_response(404, f"no route {request.path}; the routes are {ROUTES}")


def server_error(request: HttpRequest) -> JsonResponse:
    """Return the JSON 500 for a request whose view raised an exception."""
    return error_response(500, "internal server error")
