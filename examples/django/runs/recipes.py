"""Starting a recipe by name: a file of the recipe folder, and nothing outside it."""

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from django.conf import settings
from proj.celery import app

import workflows_celery

#: A recipe name is a file name in ``settings.RECIPE_DIR`` without ``.json``:
#: up to 100 letters, digits, "_", "-" and ".", starting with a letter or a digit. So a
#: name contains no "/" and does not start with "..", and cannot leave the folder.
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class InvalidRecipeNameError(ValueError):
    """Raised when a recipe name is not of the form that names a file of the recipe folder."""


class UnknownRecipeError(LookupError):
    """Raised when the recipe folder has no recipe of the requested name."""


def available_recipes() -> list[str]:
    """List the names of the recipes in the recipe folder, sorted."""
    folder = Path(settings.RECIPE_DIR)
    return sorted(path.stem for path in folder.glob("*.json") if RECIPE_NAME.fullmatch(path.stem))


def recipe_path(name: object) -> Path:
    """Return the file of the recipe ``name`` in the recipe folder.

    Raises:
        InvalidRecipeNameError: ``name`` is not a string of the form of
            :data:`RECIPE_NAME`.
        UnknownRecipeError: the folder has no file ``<name>.json``.
    """
    if not isinstance(name, str) or not RECIPE_NAME.fullmatch(name):
        raise InvalidRecipeNameError(
            f"invalid recipe name {name!r}: give the name of a recipe file in the "
            "recipe folder without '.json', e.g. 'pipethrough'; names contain up to "
            "100 letters, digits, '_', '-' and '.'"
        )
    path = Path(settings.RECIPE_DIR) / f"{name}.json"
    if not path.is_file():
        known = ", ".join(available_recipes()) or "none"
        raise UnknownRecipeError(f"unknown recipe {name!r}; available recipes: {known}")
    return path


def start_named_recipe(name: object, parameters: Mapping[str, Any]) -> str:
    """Start a run of the recipe ``name`` with ``parameters`` and return its run ID.

    This only publishes the run's first messages on the broker, so it returns
    without waiting for a worker and imports no service code.

    Raises:
        InvalidRecipeNameError: see :func:`recipe_path`.
        UnknownRecipeError: see :func:`recipe_path`.
        workflows_celery.errors.InvalidRecipeError: the recipe is invalid, or a
            queue name still contains a placeholder that no parameter filled.
        workflows_celery.errors.TransportNotConnectedError: the broker cannot be
            reached.
    """
    # Without app=, start_recipe would use workflows-celery's own ready-made
    # app, which does not read Django's settings.
    # origin= names the recipe in errors, which the client receives, instead of
    # the server's path to the file.
    return workflows_celery.start_recipe(recipe_path(name), parameters, app=app, origin=name)
