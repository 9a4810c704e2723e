"""``python manage.py start_recipe NAME --param KEY=VALUE ...``: start a run, print its ID."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs.recipes import InvalidRecipeNameError, UnknownRecipeError, start_named_recipe
from workflows_celery.cli import parse_parameter
from workflows_celery.errors import WorkflowsCeleryError


class Command(BaseCommand):
    help = (
        "Start a recipe of the recipe folder (the RECIPE_DIR setting) on the broker "
        "and print its run ID. It returns without waiting for the workers."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("recipe", help="recipe name: a file of the recipe folder without .json")
        parser.add_argument(
            "-p",
            "--param",
            dest="parameters",
            action="append",
            # The parsing of ``workflows-celery run --param``.
            type=parse_parameter,
            default=[],
            metavar="KEY=VALUE",
            help="recipe parameter filling {KEY} placeholders (repeatable); a JSON "
            "object or array value is decoded",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["recipe"]
        try:
            run_id = start_named_recipe(name, dict(options["parameters"]))
        except (InvalidRecipeNameError, UnknownRecipeError, WorkflowsCeleryError) as error:
            raise CommandError(str(error)) from error
        # The run ID alone, so that a script can capture it.
        self.stdout.write(run_id)
