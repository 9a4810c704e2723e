"""A local folder of runs that could not be started because the broker was unreachable.

``workflows-celery run`` writes the run there (its prepared recipe and run
ID) and reports the file, and ``workflows-celery pickup`` starts the spooled runs later,
oldest first. The run ID is fixed when the run is spooled, so the ID that
``run`` printed is the one the workers see.

Each run is one JSON file, written to a temporary name and renamed, so a
crash never leaves half a file, and readable by its owner only, because a
recipe's parameters may name private data. A spooled run that turns out to be
invalid when it is picked up (the recipe rules changed, say) moves to the
``rejected`` subfolder, where an operator can read it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from workflows.recipe import Recipe

from workflows_celery.canvas import start_recipe
from workflows_celery.constants import SPOOL_DIR_VARIABLE
from workflows_celery.errors import InvalidRecipeError

logger = logging.getLogger(__name__)

#: Subfolder of the spool for runs that could not be started from their file.
REJECTED_FOLDER = "rejected"

#: Version of the spool file format, stored in every file.
SPOOL_FORMAT = 1


def default_spool_folder() -> Path:
    """Return the spool folder: ``WORKFLOWS_CELERY_SPOOL_DIR``, else the user's state folder."""
    configured = os.environ.get(SPOOL_DIR_VARIABLE)
    if configured:
        return Path(configured)
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "workflows-celery" / "spool"


@dataclass(frozen=True)
class SpooledRun:
    """A run waiting in the spool."""

    path: Path
    run_id: str
    origin: str
    recipe: dict[str, Any]
    spooled_at: float

    @classmethod
    def read(cls, path: Path) -> SpooledRun:
        """Read a spool file.

        Raises:
            InvalidRecipeError: the file is not a spool file.
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                path=path,
                run_id=str(data["run_id"]),
                origin=str(data.get("origin") or path.name),
                recipe=dict(data["recipe"]),
                spooled_at=float(data.get("spooled_at") or path.stat().st_mtime),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InvalidRecipeError(
                f"Invalid recipe: {str(path)!r} is not a readable spool file ({type(error).__name__}: {error})"
            ) from None


def spool_run(folder: Path, run_id: str, recipe: Recipe, origin: str) -> Path:
    """Write a prepared run to the spool and return the file's path."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    spooled_at = time.time()
    # Names sort in spooling order, and the run ID keeps them unique.
    path = folder / f"{time.time_ns():020d}-{run_id}.json"
    temporary = path.with_suffix(".tmp")
    content = {
        "format": SPOOL_FORMAT,
        "run_id": run_id,
        "origin": origin,
        "spooled_at": spooled_at,
        "recipe": json.loads(recipe.serialize()),
    }
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(content, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    logger.info("Spooled run %s of %s to %s", run_id, origin, path)
    return path


def spooled_files(folder: Path) -> list[Path]:
    """List the spool files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.glob("*.json") if path.is_file())


def pick_up(folder: Path, app: Celery) -> Iterator[tuple[str, Any]]:
    """Start the spooled runs, oldest first, yielding what happened to each.

    Yields ``("started", SpooledRun)`` for a run started and removed from the
    spool, and ``("rejected", (path, error text))`` for a file moved to the
    ``rejected`` subfolder. A run whose send fails ends the pickup: it stays
    in the spool with every later one, and its error is raised.

    Raises:
        TransportNotConnectedError: the broker cannot be reached.
    """
    for path in spooled_files(folder):
        # NOTE: a run with several first messages whose send fails part-way has
        # some of them sent; picking it up again sends those a second time.
        try:
            spooled = SpooledRun.read(path)
            start_recipe(spooled.recipe, environment={"ID": spooled.run_id}, app=app, origin=spooled.origin)
        except InvalidRecipeError as error:
            yield "rejected", (_reject(folder, path), str(error))
            continue
        path.unlink()
        logger.info("Started spooled run %s of %s", spooled.run_id, spooled.origin)
        yield "started", spooled


def _reject(folder: Path, path: Path) -> Path:
    rejected = folder / REJECTED_FOLDER
    rejected.mkdir(exist_ok=True, mode=0o700)
    target = rejected / path.name
    os.replace(path, target)
    logger.error("Moved spool file %s to %s: it cannot be started", path, target)
    return target
