"""The Celery app for ``celery -A flask_runs.make_celery worker``.

Celery needs a module that contains the app, but the app only exists once the
Flask application factory has run, so this module runs it. Celery finds
``celery_app`` because it is the module's only Celery instance.
"""

from __future__ import annotations

from flask_runs import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
