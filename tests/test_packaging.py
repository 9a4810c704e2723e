"""The installed package: entry points, console script, typing."""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
import sys
from pathlib import Path

import workflows.transport

import workflows_celery
from workflows_celery.transport import CeleryTransport

ROOT = Path(__file__).resolve().parents[1]


def test_transport_found_by_name() -> None:
    assert workflows.transport.lookup("CeleryTransport") is CeleryTransport
    assert "CeleryTransport" in workflows.transport.get_known_transports()


def test_package_ships_py_typed() -> None:
    marker = importlib.resources.files("workflows_celery") / "py.typed"
    assert marker.is_file()


def test_console_script_and_module_agree() -> None:
    script = shutil.which("workflows-celery", path=str(Path(sys.executable).parent))
    assert script is not None, "the workflows-celery console script is not installed"
    from_script = subprocess.run(
        [script, "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    from_module = subprocess.run(
        [sys.executable, "-m", "workflows_celery", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert from_script.stdout == from_module.stdout
    assert workflows_celery.__version__ in from_script.stdout


def test_default_app_found_by_celery() -> None:
    """``celery -A workflows_celery`` finds the ready-made app."""
    from celery.app.utils import find_app

    app = find_app("workflows_celery")
    assert app is workflows_celery.default_app()
    assert "workflows_celery.step" in app.tasks
    assert app.conf.accept_content == ["json"]


def test_package_is_mypy_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
