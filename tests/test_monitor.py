"""The status board of ``workflows-celery status``: entries age, are shown as gone, then dropped."""

from __future__ import annotations

from workflows.services.common_service import CommonService

from workflows_celery.monitor import DROP_AFTER_S, GONE_AFTER_S, StatusBoard, format_table


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def status(host: str, processing_share: float) -> dict[str, object]:
    return {
        "host": host,
        "status": 2,
        "statustext": "idle",
        "service": "Find spots",
        "serviceclass": "FindSpots",
        # Keys are strings, as after a JSON round trip.
        "utilization": {
            str(CommonService.SERVICE_STATUS_IDLE): 1 - processing_share,
            str(CommonService.SERVICE_STATUS_PROCESSING): processing_share,
        },
        "workflows": "3.3",
        "celery": {"worker": "celery@vm", "processed": 12},
    }


def test_entry_gone_then_dropped() -> None:
    clock = Clock()
    board = StatusBoard(clock)
    board({}, status("vm.1.FindSpots", 0.25))

    (row,) = board.snapshot()
    assert row["gone"] is False
    assert row["last_seen_s"] == 0

    clock.now += GONE_AFTER_S + 1
    (row,) = board.snapshot()
    assert row["gone"] is True
    assert " gone " in format_table([row])

    clock.now += DROP_AFTER_S
    assert board.snapshot() == []


def test_latest_status_wins() -> None:
    clock = Clock()
    board = StatusBoard(clock)
    board({}, status("vm.1.FindSpots", 0.25))
    clock.now += 6
    board({}, status("vm.1.FindSpots", 0.5))

    (row,) = board.snapshot()
    assert row["utilization"][str(CommonService.SERVICE_STATUS_PROCESSING)] == 0.5
    assert row["last_seen_s"] == 0


def test_table_shows_busy_share_and_counts() -> None:
    board = StatusBoard(Clock())
    board({}, status("vm.1.FindSpots", 0.25))
    board({}, "not a status")

    lines = format_table(board.snapshot()).splitlines()

    assert lines[0].split() == ["HOST", "SERVICE", "STATE", "BUSY", "PROCESSED", "WORKER", "LAST", "SEEN"]
    assert lines[1].split() == ["vm.1.FindSpots", "Find", "spots", "idle", "25%", "12", "celery@vm", "0", "s", "ago"]
    assert format_table([]).endswith("(no service heard from)")
