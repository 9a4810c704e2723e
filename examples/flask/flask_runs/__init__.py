"""A Flask app that starts workflows recipes on Celery workers.

``create_app`` is the application factory that ``flask --app flask_runs run``
finds. It sets up Celery the way Flask's "Background Tasks with Celery" guide
does: the Celery settings live in ``app.config["CELERY"]``, and the Celery app
is stored in ``app.extensions["celery"]``. ``flask_runs.make_celery`` calls the
same factory, so the web process and ``celery worker`` read the same settings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import Celery, Task
from flask import Flask

import workflows_celery

logger = logging.getLogger(__name__)

#: The repository's example recipes, used when ``RECIPE_FOLDER`` is not set.
DEFAULT_RECIPE_FOLDER = Path(__file__).resolve().parents[2] / "recipes"

#: Broker used when ``FLASK_CELERY__broker_url`` is not set.
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"

#: Services a worker hosts when ``FLASK_CELERY__workflows_services`` is not set.
DEFAULT_SERVICES = ("SamplePipethrough",)


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Create the Flask app and its Celery app.

    Settings come from the defaults above, then from ``FLASK_*`` environment
    variables (``FLASK_CELERY__broker_url`` sets ``CELERY["broker_url"]``,
    ``FLASK_RECIPE_FOLDER`` sets ``RECIPE_FOLDER``). A ``test_config`` replaces
    the environment, so tests do not depend on the shell they run in.

    Args:
        test_config: Settings that take the place of the environment's.
    """
    app = Flask(__name__)
    # Fresh objects on every call, because from_prefixed_env() writes nested
    # keys such as CELERY__broker_url into the CELERY dict itself.
    app.config.from_mapping(
        CELERY={
            "broker_url": DEFAULT_BROKER_URL,
            "workflows_services": list(DEFAULT_SERVICES),
        },
        RECIPE_FOLDER=str(DEFAULT_RECIPE_FOLDER),
    )
    if test_config is None:
        app.config.from_prefixed_env()
    else:
        app.config.from_mapping(test_config)

    # app.logger is the "flask_runs" logger, the parent of the loggers of this
    # package's modules. Flask gives it a handler that writes to stderr unless a
    # handler of the logging configuration already takes its records. Python's
    # default level, WARNING, would hide the lines about started runs, so the
    # level is INFO unless the configuration (or debug mode) sets one.
    if app.logger.level == logging.NOTSET:
        app.logger.setLevel(logging.INFO)

    recipe_folder = Path(app.config["RECIPE_FOLDER"])
    if not recipe_folder.is_dir():
        logger.warning(
            "Recipe folder %s does not exist, so POST /runs will find no recipe; "
            "set FLASK_RECIPE_FOLDER to the folder of your recipe files",
            recipe_folder,
        )

    celery_init_app(app)

    from flask_runs import runs

    app.register_blueprint(runs.bp)
    return app


def celery_init_app(app: Flask) -> Celery:
    """Create the Celery app from ``app.config["CELERY"]`` and set it up for workflows.

    Tasks of this app, the step task of the hosted services included, run
    inside a Flask app context, so a service can use the app's extensions.

    Returns:
        The Celery app, also stored as ``app.extensions["celery"]``.
    """

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    workflows_celery.setup_app(celery_app)
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app
