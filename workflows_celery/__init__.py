"""Run python-workflows services and Zocalo-style recipes on Celery."""

from __future__ import annotations

from typing import Any

from workflows_celery.application import create_app, default_app, setup_app
from workflows_celery.canvas import recipe_canvas, start_recipe
from workflows_celery.errors import WorkflowsCeleryError
from workflows_celery.steps import recipe_step
from workflows_celery.transport import CeleryTransport

__version__ = "0.1.0"

__all__ = [
    "CeleryTransport",
    "WorkflowsCeleryError",
    "create_app",
    "default_app",
    "recipe_canvas",
    "recipe_step",
    "setup_app",
    "start_recipe",
]


def __getattr__(name: str) -> Any:
    # ``celery -A workflows_celery`` looks for an attribute named ``app``; it is
    # made on first use so that importing the package connects to nothing.
    if name == "app":
        return default_app()
    raise AttributeError(f"module 'workflows_celery' has no attribute {name!r}")
