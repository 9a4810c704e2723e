"""Helpers shared by the commands: recipe parameters and the broker's app."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from celery import Celery

from workflows_celery.errors import ConfigurationError


def parse_parameter(text: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE``; a VALUE that is a JSON object or array is decoded."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(
            f"invalid parameter {text!r}: expected KEY=VALUE, e.g. --param ispyb_dcid=1234"
        )
    if value.lstrip().startswith(("{", "[")):
        try:
            return key, json.loads(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"invalid parameter {key!r}: value looks like JSON but is not valid ({error})"
            ) from None
    return key, value


def add_recipe_options(parser: argparse.ArgumentParser, recipes_help: str, param_help: str) -> None:
    """Add the recipes (files or names), ``-p/--param`` and ``--recipe-dir`` of ``run`` and ``graph``."""
    parser.add_argument("recipes", nargs="+", metavar="RECIPE", help=recipes_help)
    parser.add_argument(
        "-p",
        "--param",
        dest="parameters",
        action="append",
        type=parse_parameter,
        default=[],
        metavar="KEY=VALUE",
        help=param_help,
    )
    parser.add_argument(
        "--recipe-dir",
        metavar="DIR",
        help="folder of named recipes (default: WORKFLOWS_CELERY_RECIPE_DIR)",
    )


def add_broker_option(parser: argparse.ArgumentParser, help_text: str = "Celery broker URL") -> None:
    """Add the ``-b/--broker`` option that most commands take."""
    parser.add_argument("-b", "--broker", metavar="URL", help=help_text)


def broker_app(args: argparse.Namespace) -> Celery:
    """Return an app for ``--broker``, or for ``CELERY_BROKER_URL`` when the option is absent.

    Raises:
        ConfigurationError: neither names a broker.
    """
    from workflows_celery.application import create_app

    if not args.broker and not os.environ.get("CELERY_BROKER_URL"):
        raise ConfigurationError(
            "No broker given: use --broker URL (e.g. redis://127.0.0.1:6379/0) "
            "or set CELERY_BROKER_URL"
        )
    return create_app(args.broker)
