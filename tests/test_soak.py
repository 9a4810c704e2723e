"""A short soak test on each broker: workers killed and the broker restarted, nothing lost.

Each run uses a private broker of its own (see ``soak.brokers``), so restarting
it disturbs no other test. ``python -m soak`` runs the long version.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from soak.run import SoakSettings, soak

#: Recipe runs of the short soak on each broker.
RUNS = 250

SERVERS = {"redis": "redis-server", "rabbitmq": "rabbitmq-server"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("broker", sorted(SERVERS))
def test_short_soak_loses_nothing(broker: str, tmp_path: Path) -> None:
    if shutil.which(SERVERS[broker]) is None:
        pytest.skip(f"{SERVERS[broker]} is not installed")
    settings = SoakSettings(
        broker=broker,
        runs=RUNS,
        workers=2,
        concurrency=2,
        # Short, so that a short run sees kills of both kinds before it ends.
        kill_interval_s=0.75,
        broker_restarts=1,
        timeout_s=200.0,
        folder=tmp_path,
    )

    report = soak(settings)

    summary = report.format() + f"\n(worker logs and records in {tmp_path})"
    assert report.passed, summary
    assert report.runs_started == RUNS, summary
    assert report.broker_restarts == 1, summary
    assert report.workers_killed >= 1, summary
    assert report.children_killed >= 1, summary
