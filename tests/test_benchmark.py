"""The benchmark at a tiny size, so that it keeps working: every system on every broker.

The figures are not checked against targets here (a shared machine makes
timings noisy); ``python -m benchmarks`` at full size measures those. The test
checks that every phase ran and that each figure is a measurement.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.report import format_report
from benchmarks.run import SMALL_PAYLOAD, Settings, run_benchmark
from benchmarks.systems import LEDGER_VARIABLE
from benchmarks.systems import SYSTEMS as SYSTEMS_BY_KEY

#: Systems of the tiny run: one of each kind.
SYSTEMS = ("wc", "celery", "pw")


@pytest.mark.redis
@pytest.mark.rabbitmq
@pytest.mark.timeout(300)
def test_tiny_benchmark_measures_every_system(tmp_path: Path) -> None:
    settings = Settings(
        messages=20,
        latency_runs=5,
        bytes_runs=10,
        systems=SYSTEMS,
        fanouts=(1, 10),
        recipe_sizes=(3, 30),
        scaling_messages=20,
        large_payload_runs=2,
        folder=tmp_path,
    )

    report = run_benchmark(settings)

    measured = {(m.broker, m.system) for m in report.measurements}
    assert measured == {
        ("redis", "wc"),
        ("redis", "celery"),
        ("rabbitmq", "wc"),
        ("rabbitmq", "celery"),
        ("rabbitmq", "pw"),
    }
    for m in report.measurements:
        where = f"{m.label} on {m.broker}"
        assert m.messages_per_s > 0, where
        assert 0 < m.hop_median_ms <= m.hop_p99_ms, where
        # The two hops after the first step carry the payload to the broker and back.
        assert m.bytes_per_message > 2 * 2 * SMALL_PAYLOAD, where
        assert m.peak_memory_mb > 10, where
        assert m.worker_cpu_ms > 0, where
        assert "payload 1 MB" in m.scaling_us, where
    for m in report.measurements:
        if m.system in ("wc", "pw"):
            assert set(m.scaling_us) >= {"fan-out 1", "fan-out 10", "recipe 3 nodes", "recipe 30 nodes"}
    text = format_report(report)
    assert "| rabbitmq | workflows-celery / python-workflows |" in text
    assert "| redis | workflows-celery / Celery chain |" in text
    assert len(report.rounds) == 1


def test_ledger_off_system_turns_ledger_off() -> None:
    on, off = SYSTEMS_BY_KEY["wc"], SYSTEMS_BY_KEY["wc-noledger"]

    assert LEDGER_VARIABLE not in on.environment
    assert off.environment[LEDGER_VARIABLE] == "0"
    ledger_on = on.sender("memory://localhost/", "benchmark.test", "redis://127.0.0.1:6379/0")
    ledger_off = off.sender("memory://localhost/", "benchmark.test", "redis://127.0.0.1:6379/0")
    try:
        assert ledger_on.app.conf.workflows_ledger_url == "redis://127.0.0.1:6379/0"
        assert ledger_off.app.conf.workflows_ledger is False
    finally:
        ledger_on.close()
        ledger_off.close()

