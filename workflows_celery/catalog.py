"""Named recipes in a recipe folder, and start requests that combine them, as Zocalo has them.

A start request names recipes of the folder (``spot-finding`` is the file
``spot-finding.json``), may carry a custom recipe of its own, and gives the
parameters. Its recipe is all of these merged with workflows' ``Recipe.merge``:
their nodes are renumbered and their ``start`` lists joined, so the run starts
every part at once. Each part is validated on its own first, so an error names
the part it is in.

The request is the message Zocalo's clients send to the ``processing_recipe``
queue::

    {"recipes": ["spot-finding"], "parameters": {"ispyb_dcid": 1234},
     "custom_recipe": {"1": {...}, "start": [[1, {}]]}}

As in Zocalo, the parameter ``uuid`` is the run ID: it is made when the
request has none, and recipes can use it as ``{uuid}``, e.g. in file paths.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from workflows.recipe import Recipe

from workflows_celery.canvas import check_run_id
from workflows_celery.constants import RECIPE_DIR_VARIABLE, SETTING_RECIPE_DIR
from workflows_celery.errors import InvalidStartRequestError, RecipeNotFoundError
from workflows_celery.recipes import apply_parameters, load_recipe, prepare_recipe, validate_recipe

logger = logging.getLogger(__name__)

#: Parameter that carries the run ID, as Zocalo's dispatcher sets it.
RUN_ID_PARAMETER = "uuid"

#: Names of recipes in a folder: no path separators and no leading dot, so a
#: name can never reach a file outside the folder.
_RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")

#: Names listed in the error for an unknown recipe, at most.
_LISTED_NAMES = 20

#: Fields of a start request.
_REQUEST_FIELDS = frozenset({"recipes", "parameters", "custom_recipe"})


def recipe_folder(app: Celery | None = None, folder: str | os.PathLike[str] | None = None) -> Path | None:
    """Return the recipe folder: ``folder`` if given, else the app's setting, else the environment's."""
    if folder:
        return Path(folder)
    configured = app.conf.get(SETTING_RECIPE_DIR) if app is not None else None
    configured = configured or os.environ.get(RECIPE_DIR_VARIABLE)
    return Path(configured) if configured else None


def is_recipe_name(text: str) -> bool:
    """Tell whether ``text`` can be the name of a recipe in a folder (rather than a path)."""
    return _RECIPE_NAME.fullmatch(text) is not None and not text.endswith(".json")


def named_recipe_path(folder: Path | None, name: str) -> Path:
    """Return the file of the recipe ``name`` in ``folder``.

    Raises:
        RecipeNotFoundError: no folder is configured, the name is not a plain
            name, or the folder has no such recipe. The message lists the
            recipes the folder has.
    """
    if folder is None:
        raise RecipeNotFoundError(
            f"Recipe {name!r} not found: no recipe folder is set; set "
            f"{RECIPE_DIR_VARIABLE} or the {SETTING_RECIPE_DIR} setting, or give the path of a recipe file"
        )
    if _RECIPE_NAME.fullmatch(name) is None:
        raise RecipeNotFoundError(
            f"Invalid recipe name {name!r}: a name has letters, digits, '.', '_', '+' and '-' "
            "and starts with a letter or digit; give a file path to use a file outside the recipe folder"
        )
    path = folder / f"{name}.json"
    if not path.is_file():
        known = available_recipes(folder)
        listed = ", ".join(known[:_LISTED_NAMES]) + (" ..." if len(known) > _LISTED_NAMES else "")
        raise RecipeNotFoundError(
            f"Recipe {name!r} not found in {str(folder)!r}"
            + (f"; it has: {listed}" if known else "; the folder has no recipe files")
        )
    return path


def available_recipes(folder: Path) -> list[str]:
    """List the names of the recipes in ``folder``, sorted."""
    try:
        return sorted(path.stem for path in folder.glob("*.json") if _RECIPE_NAME.fullmatch(path.stem))
    except OSError:
        return []


@dataclass
class StartRequest:
    """A request to start a run: named recipes, a custom recipe, and parameters."""

    recipes: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    custom_recipe: dict[str, Any] | None = None

    @classmethod
    def from_message(cls, message: Any) -> StartRequest:
        """Read a request in Zocalo's format.

        Raises:
            InvalidStartRequestError: a field is missing, unknown or of the wrong type.
        """
        if not isinstance(message, Mapping):
            raise InvalidStartRequestError(
                f"Invalid start request: expected a JSON object with 'recipes', 'parameters' "
                f"and 'custom_recipe', got a {type(message).__name__}"
            )
        unknown = sorted(set(message) - _REQUEST_FIELDS)
        if unknown:
            raise InvalidStartRequestError(
                f"Invalid start request: unknown field(s) {', '.join(map(repr, unknown))}; "
                "the fields are 'recipes', 'parameters' and 'custom_recipe'"
            )
        recipes = message.get("recipes") or []
        if isinstance(recipes, str):
            recipes = [recipes]
        if not isinstance(recipes, list) or not all(isinstance(name, str) for name in recipes):
            raise InvalidStartRequestError(
                f"Invalid start request: 'recipes' must be a list of recipe names, got {recipes!r}"
            )
        parameters = message.get("parameters") or {}
        if not isinstance(parameters, Mapping):
            raise InvalidStartRequestError(
                f"Invalid start request: 'parameters' must be an object, got {parameters!r}"
            )
        custom = message.get("custom_recipe")
        if custom is not None and not isinstance(custom, Mapping):
            raise InvalidStartRequestError(
                f"Invalid start request: 'custom_recipe' must be a recipe object, got {type(custom).__name__}"
            )
        if not recipes and custom is None:
            raise InvalidStartRequestError(
                "Invalid start request: it names no recipe; give 'recipes' (names in the "
                "recipe folder) or a 'custom_recipe'"
            )
        return cls(list(recipes), dict(parameters), dict(custom) if custom is not None else None)

    def to_message(self) -> dict[str, Any]:
        """Return the request in Zocalo's format."""
        message: dict[str, Any] = {"recipes": list(self.recipes), "parameters": dict(self.parameters)}
        if self.custom_recipe is not None:
            message["custom_recipe"] = self.custom_recipe
        return message

    def describe(self) -> str:
        """Name the request's recipes for messages, e.g. ``spot-finding + custom recipe``."""
        parts = list(self.recipes) + (["custom recipe"] if self.custom_recipe is not None else [])
        return " + ".join(parts)


def build_recipe(
    request: StartRequest,
    folder: Path | None,
    *,
    files: Sequence[Path] = (),
    allow_unresolved: bool = False,
) -> tuple[str, Recipe]:
    """Merge the request's recipes, apply its parameters, and return the run ID and the recipe.

    ``files`` are recipe files merged after the named recipes and before the
    custom recipe. A single recipe is used as it is, so its node numbers stay
    those of its file. The request's parameters gain ``uuid`` (the run ID) when
    they lack it. ``allow_unresolved`` keeps queue and topic names that still
    hold a placeholder, as simulations do.

    Raises:
        InvalidStartRequestError: the request names no recipe.
        RecipeNotFoundError: a named recipe is not in the folder.
        InvalidRecipeError: a part or the merged recipe is invalid, or a queue
            or topic still contains a placeholder that no parameter filled.
    """
    parameters = dict(request.parameters)
    run_id = str(parameters.get(RUN_ID_PARAMETER) or uuid.uuid4())
    check_run_id(run_id)
    parameters[RUN_ID_PARAMETER] = run_id

    parts: list[tuple[str, Any]] = [(name, named_recipe_path(folder, name)) for name in request.recipes]
    parts += [(str(path), path) for path in files]
    if request.custom_recipe is not None:
        parts.append(("custom recipe", request.custom_recipe))
    if not parts:
        raise InvalidStartRequestError(
            "Invalid start request: it names no recipe; give recipe names or a recipe file"
        )
    origin = " + ".join(part_origin for part_origin, _ in parts)
    if len(parts) == 1:
        recipe = prepare_recipe(parts[0][1], parameters, origin=parts[0][0], allow_unresolved=allow_unresolved)
        return run_id, recipe

    merged = Recipe()
    for part_origin, source in parts:
        part = load_recipe(source, part_origin)
        validate_recipe(part, part_origin)
        apply_parameters(part, parameters, part_origin)
        merged = merged.merge(part)
    return run_id, prepare_recipe(merged, parameters, origin=origin, allow_unresolved=allow_unresolved)
