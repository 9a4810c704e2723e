"""Settings of the example project, read from the environment with local defaults.

The web process and ``celery -A proj worker`` both load this module, so both
use the same broker.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# The defaults suit a local trial. In production, set DJANGO_SECRET_KEY and
# DJANGO_ALLOWED_HOSTS, and leave DJANGO_DEBUG unset.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-local-trials-only")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

INSTALLED_APPS = [
    "runs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "proj.urls"
WSGI_APPLICATION = "proj.wsgi.application"

# The project stores nothing itself: the broker carries the runs.
DATABASES = {}

USE_TZ = True
# Django sets the process's TZ variable to TIME_ZONE, which decides the times
# in log lines. CELERY_TIMEZONE below makes crontab schedules use it too.
# Django's own default is America/Chicago.
TIME_ZONE = os.environ.get("DJANGO_TIME_ZONE", "UTC")

# The run API logs each run it starts, with its run ID.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"runs": {"handlers": ["console"], "level": "INFO"}},
}

#: Folder of the recipes that POST /runs/ and ``manage.py start_recipe`` may
#: start, by file name without ``.json``.
RECIPE_DIR = Path(os.environ.get("RECIPE_DIR", BASE_DIR.parent / "recipes"))

# Celery reads the settings that start with CELERY_ (see proj/celery.py).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")

#: Services that ``celery -A proj worker`` hosts unless --services names others.
CELERY_WORKFLOWS_SERVICES = ["SamplePipethrough"]

CELERY_TIMEZONE = TIME_ZONE

#: The Redis of the run ledger, which GET /runs/<run_id>/ reads. Left unset,
#: the ledger is in the Redis of the broker or of the result backend.
CELERY_WORKFLOWS_LEDGER_URL = os.environ.get("CELERY_WORKFLOWS_LEDGER_URL")

# workflows-celery gives Redis connections a connect timeout equal to
# CELERY_BROKER_CONNECTION_TIMEOUT (4 s by default). A web request should give
# up sooner on a broker host that does not respond, so the run API uses 2 s and
# returns 503 within seconds. On RabbitMQ, CELERY_BROKER_CONNECTION_TIMEOUT applies.
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_connect_timeout": 2}
