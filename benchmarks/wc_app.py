"""The workflows-celery app of the benchmark workers: ``celery -A benchmarks.wc_app worker``.

It is the app any user gets from :func:`workflows_celery.create_app`, with its
broker from ``CELERY_BROKER_URL``. The benchmark's confirm variable set to "0"
turns RabbitMQ publisher confirms off, as a user may with
``broker_transport_options``, to show what they cost. The ledger variable set
to "0" turns the run ledger off; otherwise the ledger is the Redis that the
ledger URL variable names, also when the broker is RabbitMQ.
"""

from __future__ import annotations

import os

from benchmarks.celery_chain import CONFIRM_VARIABLE
from benchmarks.systems import LEDGER_TTL_S, LEDGER_URL_VARIABLE, LEDGER_VARIABLE
from workflows_celery import create_app

app = create_app(main="benchmarks.wc_app")
if os.environ.get(CONFIRM_VARIABLE) == "0":
    app.conf.broker_transport_options = {
        **(app.conf.broker_transport_options or {}),
        "confirm_publish": False,
    }
if os.environ.get(LEDGER_VARIABLE) == "0":
    app.conf.workflows_ledger = False
else:
    app.conf.workflows_ledger_ttl = LEDGER_TTL_S
    if os.environ.get(LEDGER_URL_VARIABLE):
        app.conf.workflows_ledger_url = os.environ[LEDGER_URL_VARIABLE]
