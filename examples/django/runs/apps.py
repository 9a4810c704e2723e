from django.apps import AppConfig


class RunsConfig(AppConfig):
    """Starting recipe runs: the POST /runs/ view and ``manage.py start_recipe``."""

    name = "runs"
