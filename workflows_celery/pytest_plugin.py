"""pytest fixtures that run workflows services and recipes in a test, without a broker.

Enable them in a ``conftest.py``::

    pytest_plugins = ["workflows_celery.pytest_plugin"]

Then name the services a test hosts, with the ``workflows_services`` marker or
by overriding the fixture of the same name, and use ``workflows_harness``::

    @pytest.mark.workflows_services("mypackage.services:FindSpots")
    def test_spots_found(workflows_harness):
        run = workflows_harness.run("recipes/spots.json", {"image": "x.cbf"})
        assert run.payloads_sent_by(1) == [{"spots": 12}]

The harness is :class:`workflows_celery.testing.WorkflowsHarness`. The
fixtures run on kombu's in-memory broker in this process, so they need no
Docker, and their names start with ``workflows_`` so that they sit beside
those of Celery's and pytest-celery's plugins.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from workflows_celery.application import create_app
from workflows_celery.constants import EMBEDDED_BROKER_URL
from workflows_celery.testing import WorkflowsHarness, embedded_harness

#: Name of the marker that lists the services a test hosts.
SERVICES_MARKER = "workflows_services"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{SERVICES_MARKER}(*services): services the workflows_harness fixture hosts "
        "(classes, entry-point names or 'module:Class' paths)",
    )


@pytest.fixture
def workflows_services(request: pytest.FixtureRequest) -> list[Any]:
    """Return the services that ``workflows_harness`` hosts.

    By default the arguments of the closest ``workflows_services`` marker, or
    none. Override this fixture to give a module's or a folder's tests the
    same services.
    """
    marker = request.node.get_closest_marker(SERVICES_MARKER)
    return list(marker.args) if marker is not None else []


@pytest.fixture
def workflows_app() -> Iterator[Celery]:
    """Make a new Celery app on the in-memory broker, set up for workflows.

    Override it to register ``recipe_step`` functions, or to change settings,
    before the worker starts::

        @pytest.fixture
        def workflows_app(workflows_app):
            recipe_step(workflows_app, "per_image_analysis")(find_spots)
            return workflows_app
    """
    app = create_app(EMBEDDED_BROKER_URL, main=f"workflows_celery.pytest.{uuid.uuid4().hex[:8]}")
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def workflows_harness(workflows_services: list[Any], workflows_app: Celery) -> Iterator[WorkflowsHarness]:
    """Run an embedded worker hosting ``workflows_services``, and stop it after the test.

    Use it to start runs (``start``, ``run``), send plain messages (``send``),
    and read what each step sent (``Run.sent_by``, ``sent_to``).
    """
    with embedded_harness(workflows_services, app=workflows_app) as harness:
        yield harness
