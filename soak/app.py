"""The Celery app of the soak test's workers: ``celery -A soak.app worker``.

The broker comes from ``CELERY_BROKER_URL``. On Redis the visibility timeout
is short, so the messages of a worker killed with SIGKILL come back within
seconds. Live workers renew the leases of the messages they are working on.
"""

from __future__ import annotations

from workflows_celery import create_app
from workflows_celery.leases import uses_redis

#: Redis visibility timeout of the soak workers, in seconds.
VISIBILITY_TIMEOUT_S = 4.0
#: Seconds between two checks for messages whose holder is gone (Redis).
RESTORE_INTERVAL_S = 2.0

app = create_app(main="soak")
if uses_redis(app):
    app.conf.broker_transport_options = {
        **(app.conf.broker_transport_options or {}),
        "visibility_timeout": VISIBILITY_TIMEOUT_S,
        "unacked_restore_interval": RESTORE_INTERVAL_S,
    }
