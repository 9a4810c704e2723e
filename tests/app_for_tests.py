"""A user's own Celery app, prepared with ``setup_app``, for the worker tests.

Its workers host the services of the ``workflows_services`` setting, so no
``--services`` option is needed::

    celery -A tests.app_for_tests -b redis://127.0.0.1:6379/0 worker
"""

from __future__ import annotations

from celery import Celery

from workflows_celery import setup_app

app = setup_app(Celery("tests.app_for_tests"), services=["SamplePipethrough"])
