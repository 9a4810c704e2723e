"""The benchmark's results as Markdown tables, with the ratios the targets are stated in."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.run import Measurement, Report


#: The ratios of throughput that the report shows: (system, baseline).
RATIOS = (
    ("wc", "celery"),
    ("wc", "celery-confirm"),
    ("wc-noconfirm", "celery"),
    ("wc", "wc-noledger"),
    ("wc-plain", "celery"),
    ("wc", "pw"),
    ("wc-plain", "pw-plain"),
)


def ratio(measurements: list[Measurement], broker: str, system: str, baseline: str) -> float | None:
    """Return ``system``'s throughput over ``baseline``'s on ``broker``, if both were measured."""
    found = {m.system: m for m in measurements if m.broker == broker}
    if system not in found or baseline not in found:
        return None
    return found[system].messages_per_s / found[baseline].messages_per_s


def round_ratios(report: Report, broker: str, system: str, baseline: str) -> list[float]:
    """Return the ratio of ``system`` to ``baseline`` in each round where both were measured."""
    ratios = (ratio(measured, broker, system, baseline) for measured in report.rounds)
    return [value for value in ratios if value is not None]


def format_report(report: Report) -> str:
    """Return the report as Markdown."""
    lines = [
        f"Command: `{report.command}`",
        "",
        "A message is one run of the three-step pipeline: three step executions, three hops.",
        "",
    ]
    if len(report.rounds) > 1:
        lines += [f"Every figure is the median of {len(report.rounds)} rounds.", ""]
    lines += [f"- {name}: {value}" for name, value in report.machine.items()]
    lines += ["", "| broker | system | messages/s end to end | hop median ms | hop p99 ms | bytes/message | peak worker MB | worker CPU ms/message |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for m in report.measurements:
        lines.append(
            f"| {m.broker} | {m.label} | {m.messages_per_s:.0f} | {m.hop_median_ms:.2f} "
            f"| {m.hop_p99_ms:.2f} | {m.bytes_per_message:.0f} | {m.peak_memory_mb:.0f} "
            f"| {m.worker_cpu_ms:.2f} |"
        )
    lines += ["", "| broker | ratio of messages/s | median of the rounds | each round |", "|---|---|---:|---|"]
    for broker in dict.fromkeys(m.broker for m in report.measurements):
        for system, baseline in RATIOS:
            values = round_ratios(report, broker, system, baseline)
            if values:
                per_round = ", ".join(f"{value:.2f}" for value in values)
                lines.append(
                    f"| {broker} | {_label(report, system)} / {_label(report, baseline)} "
                    f"| {statistics.median(values):.2f} | {per_round} |"
                )
    lines += ["", _scaling_table(report.measurements)]
    return "\n".join(lines)


def _label(report: Report, system: str) -> str:
    return next(m.label for m in report.measurements if m.system == system)


def _scaling_table(measurements: list[Measurement]) -> str:
    cases = sorted({case for m in measurements for case in m.scaling_us}, key=_case_order)
    lines = ["| broker | system | " + " | ".join(cases) + " |", "|---|---|" + "---:|" * len(cases)]
    for m in measurements:
        cells = [f"{m.scaling_us[case]:.0f}" if case in m.scaling_us else "" for case in cases]
        lines.append(f"| {m.broker} | {m.label} | " + " | ".join(cells) + " |")
    return "Microseconds per step execution:\n\n" + "\n".join(lines)


def _case_order(case: str) -> tuple[str, int]:
    kind, _, rest = case.rpartition(" ")
    number = "".join(ch for ch in case if ch.isdigit())
    return (case.split(" ")[0], int(number or 0) * (1000 if "MB" in case else 1))
