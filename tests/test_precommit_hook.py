"""The pre-commit hook that other repositories use to validate their recipes.

pre-commit reads ``.pre-commit-hooks.yaml``, installs this repository into a
virtual environment (``language: python``) and runs ``entry`` with the names
of the matching files appended. These tests read the manifest as pre-commit
does and run the entry the same way, on files that the hook's filters pass.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml

from workflows_celery.cli import build_parser

REPOSITORY = Path(__file__).resolve().parents[1]
MANIFEST = REPOSITORY / ".pre-commit-hooks.yaml"

#: Keys a hook must have in a manifest, and the optional ones pre-commit accepts
#: (from pre-commit's documentation of .pre-commit-hooks.yaml).
REQUIRED_KEYS = frozenset({"id", "name", "entry", "language"})
OPTIONAL_KEYS = frozenset(
    {
        "alias",
        "always_run",
        "args",
        "description",
        "exclude",
        "exclude_types",
        "fail_fast",
        "files",
        "language_version",
        "log_file",
        "minimum_pre_commit_version",
        "pass_filenames",
        "require_serial",
        "stages",
        "types",
        "types_or",
        "verbose",
    }
)

#: Seconds one run of the hook's command may take.
HOOK_TIMEOUT_S = 60

VALID_RECIPE = {
    "1": {"service": "Message Pipethrough", "queue": "transient.destination", "output": 2},
    "2": {"service": "Message Pipethrough", "queue": "transient.destination"},
    "start": [[1, {"image": "/data/image_0001.cbf"}]],
}

#: Node 1 sends to node 3, which the recipe does not have.
DANGLING_RECIPE = {
    "1": {"service": "Message Pipethrough", "queue": "transient.destination", "output": 3},
    "start": [[1, {}]],
}


@pytest.fixture(scope="module")
def hook() -> dict[str, Any]:
    """The validate-recipes hook from the manifest."""
    hooks = yaml.safe_load(MANIFEST.read_text())
    assert isinstance(hooks, list)
    by_id = {entry["id"]: entry for entry in hooks}
    assert len(by_id) == len(hooks), "hook ids must be unique"
    return dict(by_id["validate-recipes"])


def test_hook_has_required_keys(hook: dict[str, Any]) -> None:
    assert REQUIRED_KEYS <= set(hook)
    assert set(hook) - REQUIRED_KEYS <= OPTIONAL_KEYS


def test_hook_installs_this_package(hook: dict[str, Any]) -> None:
    # language: python makes pre-commit pip-install the repository, which
    # brings the console script that entry names.
    assert hook["language"] == "python"
    assert hook.get("pass_filenames", True) is True


def test_hook_entry_is_console_script(hook: dict[str, Any]) -> None:
    program, *arguments = shlex.split(hook["entry"])
    scripts = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["scripts"]
    assert program in scripts
    installed = {script.name: script.value for script in entry_points(group="console_scripts")}
    assert installed.get(program) == scripts[program]
    # The entry's own arguments must select a command that takes file names.
    parsed = build_parser().parse_args([*arguments, "recipe.json"])
    assert parsed.command == "validate"
    assert parsed.recipes == ["recipe.json"]


def _selected(hook: dict[str, Any], path: str) -> bool:
    """Tell whether pre-commit's ``files`` and ``exclude`` filters pass a path."""
    included = re.search(hook.get("files", ""), path) is not None
    excluded = re.search(hook.get("exclude", "^$"), path) is not None
    return included and not excluded


def test_hook_selects_recipe_files(hook: dict[str, Any]) -> None:
    # "json" is the identify tag of files named *.json.
    assert hook.get("types", ["file"]) == ["json"]
    for recipe in sorted((REPOSITORY / "examples" / "recipes").glob("*.json")):
        assert _selected(hook, recipe.relative_to(REPOSITORY).as_posix()), recipe
    assert _selected(hook, "recipes/spot-finding.json")
    assert not _selected(hook, "package.json")
    assert not _selected(hook, "docs/schema.json")


def _run_hook(
    hook: dict[str, Any], files: list[str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run the hook's entry with its args and file names, as pre-commit does."""
    program, *arguments = shlex.split(hook["entry"])
    # The console script installed beside this interpreter, as in pre-commit's environment.
    script = Path(sys.executable).with_name(program)
    assert script.is_file(), f"{script} is not installed"
    return subprocess.run(
        [str(script), *arguments, *hook.get("args", []), *files],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HOOK_TIMEOUT_S,
    )


@pytest.fixture
def recipe_folder(tmp_path: Path) -> Path:
    """A repository root with a valid recipe, a dangling one and a malformed one."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "valid.json").write_text(json.dumps(VALID_RECIPE))
    (folder / "dangling.json").write_text(json.dumps(DANGLING_RECIPE))
    (folder / "malformed.json").write_text('{"1": {"service": "x", "queue": "q"},')
    return tmp_path


def test_hook_passes_valid_recipe(hook: dict[str, Any], recipe_folder: Path) -> None:
    completed = _run_hook(hook, ["recipes/valid.json"], recipe_folder)
    assert completed.returncode == 0, completed.stderr
    assert "recipes/valid.json: valid" in completed.stdout


def test_hook_fails_invalid_recipes(hook: dict[str, Any], recipe_folder: Path) -> None:
    files = ["recipes/valid.json", "recipes/dangling.json", "recipes/malformed.json"]
    assert all(_selected(hook, name) for name in files)
    completed = _run_hook(hook, files, recipe_folder)
    assert completed.returncode == 1
    assert "recipes/dangling.json" in completed.stderr
    assert "recipes/malformed.json" in completed.stderr
    assert "recipes/valid.json" not in completed.stderr
    assert "2 of 3 recipes invalid" in completed.stderr
