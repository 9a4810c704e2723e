"""Reading, parameterising and validating recipes, with errors that name the problem.

Parsing, parameters and validation are those of ``workflows.recipe.Recipe``.
This module adds what a command line or a web request needs around them: file
names in messages, a check for duplicate keys, and a check for destinations
whose placeholders no parameter filled.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import workflows
from workflows.recipe import Recipe

from workflows_celery.errors import InvalidRecipeError

RecipeSource = Recipe | Mapping[str, Any] | str | bytes | os.PathLike[str]

_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidRecipeError(
                f"Invalid recipe: key {key!r} appears twice in one object; "
                "JSON would keep only the last one, so remove or rename one of them"
            )
        result[key] = value
    return result


def parse_recipe_json(text: str | bytes, origin: str = "recipe") -> dict[str, Any]:
    """Parse recipe JSON text, rejecting malformed JSON and duplicate keys."""
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except InvalidRecipeError as error:
        raise InvalidRecipeError(f"{error} (in {origin})") from None
    except ValueError as error:
        raise InvalidRecipeError(
            f"Invalid recipe: {origin} is not valid JSON: {error}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRecipeError(
            f"Invalid recipe: {origin} contains a JSON {type(data).__name__}, "
            "expected an object of numbered nodes and 'start'"
        )
    return data


def load_recipe(source: RecipeSource, origin: str | None = None) -> Recipe:
    """Build a ``Recipe`` from a Recipe, a dict, JSON text or a path to a JSON file.

    Raises:
        InvalidRecipeError: the file cannot be read or contains no recipe object.
    """
    if isinstance(source, Recipe):
        return Recipe(source.recipe)
    if isinstance(source, Mapping):
        return _build(dict(source), origin or "recipe")
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and not source.lstrip().startswith("{")
    ):
        path = Path(source)
        # ``origin`` names the recipe in every message, so that a web server
        # can report errors without showing where its recipe files are.
        name = origin or str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise InvalidRecipeError(
                f"Invalid recipe: cannot read {name!r}: {error.strerror}"
            ) from None
        return _build(parse_recipe_json(text, name), name)
    return _build(parse_recipe_json(source, origin or "recipe"), origin or "recipe")


def _build(data: dict[str, Any], origin: str) -> Recipe:
    for key, value in data.items():
        if key in ("start", "error"):
            continue
        if not str(key).strip().lstrip("-").isdigit():
            raise InvalidRecipeError(
                f'Invalid recipe: Node "{key}" is not numeric (in {origin}); '
                'nodes are numbered, e.g. "1", besides "start" and "error"'
            )
        if not isinstance(value, Mapping):
            raise InvalidRecipeError(
                f'Invalid recipe: Node "{key}" is a JSON {type(value).__name__} (in {origin}); '
                'expected an object such as {"queue": "name"}'
            )
    if "start" in data and not isinstance(data["start"], (list, tuple)):
        raise InvalidRecipeError(
            f'Invalid recipe: "start" node is a JSON {type(data["start"]).__name__} '
            f"(in {origin}); expected a list of [node, payload] pairs"
        )
    try:
        return Recipe(data)
    except (TypeError, ValueError, AttributeError) as error:
        raise InvalidRecipeError(f"Invalid recipe: {origin}: {error}") from None


def validate_recipe(recipe: Recipe, origin: str = "recipe") -> None:
    """Validate a recipe with workflows' own rules.

    Raises:
        InvalidRecipeError: the recipe is not a valid graph; the message starts
            with "Invalid recipe:" and names the node.
    """
    try:
        recipe.validate()
    except workflows.Error as error:
        text = str(error)
        if not text.startswith("Invalid recipe"):
            text = f"Invalid recipe: {text}"
        raise InvalidRecipeError(f"{text} (in {origin})") from None
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise InvalidRecipeError(f"Invalid recipe: {origin}: {error!r}") from None

    # workflows accepts such a node, then silently sends nothing to it.
    for key, node in recipe.recipe.items():
        if isinstance(key, int) and isinstance(node, Mapping):
            if not node.get("queue") and not node.get("topic"):
                raise InvalidRecipeError(
                    f'Invalid recipe: Node "{key}" has neither "queue" nor "topic", so '
                    f"messages sent to it would be lost (in {origin}); give it one"
                )
            for kind in ("queue", "topic"):
                name = node.get(kind)
                if name is not None and not isinstance(name, str):
                    raise InvalidRecipeError(
                        f'Invalid recipe: Node "{key}" {kind} is a JSON {type(name).__name__} '
                        f"({name!r}) (in {origin}); a {kind} name must be a string"
                    )


def unresolved_destinations(recipe: Recipe) -> list[str]:
    """List the queue and topic names that still contain a ``{placeholder}``."""
    problems = []
    for key, node in recipe.recipe.items():
        if not isinstance(key, int) or not isinstance(node, Mapping):
            continue
        for kind in ("queue", "topic"):
            name = node.get(kind)
            if isinstance(name, str) and _PLACEHOLDER.search(name):
                problems.append(f"node {key} {kind} {name!r}")
    return problems


def prepare_recipe(
    source: RecipeSource,
    parameters: Mapping[str, Any] | None = None,
    *,
    origin: str | None = None,
    allow_unresolved: bool = False,
) -> Recipe:
    """Load a recipe, apply parameters, then validate it and its destinations.

    With ``allow_unresolved`` a queue or topic name that still holds a
    placeholder is kept literally (simulations use this).

    Raises:
        InvalidRecipeError: the recipe is invalid, or a queue or topic name
            still holds a placeholder that no parameter filled.
    """
    name = origin or _describe(source)
    recipe = load_recipe(source, name)
    if parameters:
        apply_parameters(recipe, parameters, name)
    validate_recipe(recipe, name)
    problems = unresolved_destinations(recipe)
    if problems and not allow_unresolved:
        raise InvalidRecipeError(
            f"Invalid recipe: unresolved placeholder in {', '.join(problems)} (in {name}); "
            "give a parameter of that name"
        )
    return recipe


def apply_parameters(recipe: Recipe, parameters: Mapping[str, Any], origin: str = "recipe") -> None:
    """Fill the recipe's ``{placeholders}`` with workflows' own substitution.

    Raises:
        InvalidRecipeError: a placeholder's format does not fit its parameter,
            e.g. ``{n:d}`` with a string, ``{n.x}`` or a positional ``{0}``.
    """
    try:
        recipe.apply_parameters(dict(parameters))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise InvalidRecipeError(
            f"Invalid recipe: a placeholder does not fit the parameters given "
            f"({type(error).__name__}: {error}) (in {origin}); use plain {{name}} "
            "placeholders, or give parameters of the type the format expects"
        ) from None


def _describe(source: RecipeSource) -> str:
    """Name a recipe source in messages: its path, or just "recipe"."""
    if isinstance(source, os.PathLike):
        return str(source)
    if isinstance(source, str) and not source.lstrip().startswith("{"):
        return source
    return "recipe"
