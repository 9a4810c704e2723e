"""The project's Celery app, shared by the web process and ``celery -A proj worker``."""

import os

from celery import Celery

import workflows_celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")

# Celery settings live in Django's settings with the prefix CELERY_, e.g.
# CELERY_BROKER_URL, and CELERY_WORKFLOWS_SERVICES for ``workflows_services``.
app.config_from_object("django.conf:settings", namespace="CELERY")

# After the settings are loaded: this registers the step task, limits messages
# to JSON and adds the worker's --services option. It imports no service code.
workflows_celery.setup_app(app)

app.autodiscover_tasks()
