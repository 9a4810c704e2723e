"""The ready-made app with a Redis visibility timeout of 3 s, for crash tests.

A worker killed with SIGKILL leaves its messages unacknowledged; a short
timeout lets the next worker take them back within seconds.
"""

from __future__ import annotations

from workflows_celery import create_app

#: Visibility timeout of this app, in seconds.
VISIBILITY_TIMEOUT_S = 3.0

app = create_app()
app.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
