"""Reading a run's record from workflows-celery's run ledger, for GET /runs/<run_id>/.

The workers record each step of a run in the ledger, a few Redis keys per
run, so reading a run needs neither a worker nor any service code.
"""

import re

from proj.celery import app

from workflows_celery.ledger import (
    Ledger,
    LedgerError,
    LedgerUnavailableError,
    RunRecord,
    require_ledger,
)

#: A run ID: the UUID that POST /runs/ returns, or an ID of the caller's own
#: made of letters, digits, "-" and "_", so that no other text reaches Redis.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

#: Maximum wait in seconds for a run's end, because each waiting request keeps a
#: server thread busy.
MAX_WAIT_S = 30.0


class InvalidRunIdError(ValueError):
    """Raised when a run ID is not of the form of :data:`RUN_ID`."""


class InvalidWaitError(ValueError):
    """Raised when the time to wait for a run's end is not a number from 0 to :data:`MAX_WAIT_S`."""


class UnknownRunError(LookupError):
    """Raised when the run ledger has no run of the requested ID."""


def parse_wait(value: str | None) -> float:
    """Return the seconds of a ``wait`` query parameter, 0 when it is absent.

    Raises:
        InvalidWaitError: ``value`` is not a number from 0 to :data:`MAX_WAIT_S`.
    """
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    # False for NaN as well.
    if not 0 <= seconds <= MAX_WAIT_S:
        raise InvalidWaitError(
            f"invalid wait {value!r}: give the seconds to wait for the run to end, "
            f"a number from 0 to {MAX_WAIT_S:g}"
        )
    return seconds


def read_run(run_id: str, wait_s: float = 0.0) -> RunRecord:
    """Read run ``run_id`` from the ledger, after waiting up to ``wait_s`` for its end.

    A run that has not ended after ``wait_s`` is returned as it is, still
    running: the time running out is no error.

    Raises:
        InvalidRunIdError: ``run_id`` is not of the form of :data:`RUN_ID`.
        UnknownRunError: the ledger has no run ``run_id``.
        LedgerUnavailableError: the ledger's Redis cannot be reached.
        workflows_celery.errors.ConfigurationError: the project has no run
            ledger, because ``workflows_ledger`` is off or no Redis is
            configured for it.
    """
    if not RUN_ID.fullmatch(run_id):
        raise InvalidRunIdError(
            f"invalid run ID {run_id!r}: give the run_id that POST /runs/ returned, "
            "such as bfde9f9d-d27d-42f4-9139-34e19a3c0b8c"
        )
    ledger = require_ledger(app)
    try:
        return _read(ledger, run_id, wait_s)
    except LedgerUnavailableError:
        raise
    except LedgerError as error:
        raise UnknownRunError(
            f"no run {run_id!r} in the run ledger: check the ID; the ledger keeps a run "
            f"for {_duration(ledger.ttl_s)} after its last update, and has no record of "
            "runs started while it was off"
        ) from error


def _read(ledger: Ledger, run_id: str, wait_s: float) -> RunRecord:
    # NOTE: a Redis that accepts connections but does not respond blocks each
    # read for the ledger's socket timeout (5 s), which can exceed wait_s.
    if wait_s > 0:
        try:
            return ledger.wait(run_id, wait_s)
        except TimeoutError:
            pass
    return ledger.get(run_id)


def _duration(seconds: int) -> str:
    """Write a number of seconds in days or hours when it is a whole number of them."""
    for unit, size in (("day", 86400), ("hour", 3600)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} s"
