"""Shared fixtures: the real brokers the suite runs against, and unique names."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from helpers import Harness

from workflows_celery import create_app

# The project's own fixtures, as users enable them; pytester runs user projects.
pytest_plugins = ["pytester", "workflows_celery.pytest_plugin"]

REDIS_URL = os.environ.get("WORKFLOWS_CELERY_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get(
    "WORKFLOWS_CELERY_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//"
)
BROKERS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL}

#: Recipes published by Diamond's teams, kept outside the repository.
SHARED_RECIPES = Path(__file__).resolve().parents[2] / "shared" / "recipes"


@pytest.fixture(params=sorted(BROKERS))
def broker_url(request: pytest.FixtureRequest) -> str:
    """URL of each real broker in turn."""
    return BROKERS[request.param]


@pytest.fixture
def redis_url() -> str:
    """URL of the real Redis server."""
    return REDIS_URL


@pytest.fixture
def amqp_url() -> str:
    """URL of the real RabbitMQ server."""
    return AMQP_URL


@pytest.fixture
def broker_app(broker_url: str) -> Iterator[Celery]:
    """A Celery app set up for workflows on each real broker in turn."""
    app = create_app(broker_url, main=f"tests.{uuid.uuid4().hex[:8]}")
    yield app
    app.close()


@pytest.fixture
def harness(broker_app: Celery, unique: str) -> Iterator[Harness]:
    """Transports and queue names on each real broker in turn, cleaned up afterwards."""
    created = Harness(broker_app, unique)
    try:
        yield created
    finally:
        created.close()


@pytest.fixture
def unique() -> str:
    """A short random suffix for queue and topic names, so tests never share one."""
    return uuid.uuid4().hex[:12]


@pytest.fixture
def shared_recipes() -> list[Path]:
    """The shared real recipes; the test is skipped when the folder is absent."""
    if not SHARED_RECIPES.is_dir():
        pytest.skip(f"no shared recipes at {SHARED_RECIPES}")
    return sorted(SHARED_RECIPES.glob("*.json"))
