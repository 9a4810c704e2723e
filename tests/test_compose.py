"""Static checks of the Compose stack in compose/: commands, variables, ports and paths.

No container runs here. Each command is parsed by the click command tree of the
program it names (``celery`` with the ready-made app loaded, so that the
worker's ``--services`` is known, flower's tornado options, ``flask``) and
nothing is invoked. Every check returns a list of problems, and
``test_broken_copy_fails`` feeds each check a copy of the file with one
deliberate mistake to show that the check can fail.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import click
import pytest
import yaml
from celery.app.utils import find_app
from celery.bin.base import CLIContext
from celery.bin.celery import celery as celery_cli
from celery.schedules import maybe_schedule

from workflows_celery.errors import ServiceNotFoundError, WorkflowsCeleryError
from workflows_celery.recipes import prepare_recipe
from workflows_celery.services import load_service, parse_service_names

REPOSITORY = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPOSITORY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
CELERY_CONFIG_FILE = COMPOSE_DIR / "celeryconfig.py"
FLASK_EXAMPLE = REPOSITORY / "examples" / "flask"

#: Task that ``setup_app`` registers to start a recipe from a worker.
START_TASK_NAME = "workflows_celery.start_recipe"

#: Host addresses a port may be published on.
LOOPBACK_ADDRESSES = frozenset({"127.0.0.1"})

#: Ports the programs listen on when their command gives none.
FLOWER_DEFAULT_PORT = 5555
FLASK_DEFAULT_PORT = 5000

#: Programs each broker image may run as its command.
IMAGE_PROGRAMS = {"redis": {"redis-server"}, "rabbitmq": {"rabbitmq-server"}}


@dataclass(frozen=True)
class Variable:
    """An environment variable that the stack may set, and who reads it."""

    readers: frozenset[str]
    reason: str


#: Container variables the stack may set. ``readers`` are the programs of a
#: service (see ``service_programs``). A name missing here fails the checks.
KNOWN_VARIABLES = {
    "CELERY_BROKER_URL": Variable(
        frozenset({"celery"}),
        "Celery's Settings.broker_url reads it before any configured broker_url; "
        "docs/configuration.md names it the broker of the ready-made app",
    ),
    "CELERY_CONFIG_MODULE": Variable(
        frozenset({"celery"}),
        "Celery's loaders import the settings module it names, and the ready-made "
        "app loads it before setup_app",
    ),
    "WORKFLOWS_CELERY_NAMESPACE": Variable(
        frozenset({"celery", "flask"}),
        "setup_app sets workflows_namespace from it (docs/configuration.md)",
    ),
    "WORKFLOWS_CELERY_RECIPE_DIR": Variable(
        frozenset({"celery"}),
        "the RecipeDispatcher service and 'workflows-celery run NAME' read named "
        "recipes from it (docs/configuration.md)",
    ),
    "WORKFLOWS_CELERY_LEDGER_URL": Variable(
        frozenset({"celery", "flask"}),
        "setup_app sets workflows_ledger_url from it, so runs are recorded with a "
        "RabbitMQ broker too (docs/configuration.md)",
    ),
    "FLOWER_BASIC_AUTH": Variable(
        frozenset({"flower"}),
        "flower's apply_env_options maps FLOWER_<option> to its basic_auth option",
    ),
    "FLASK_CELERY__broker_url": Variable(
        frozenset({"flask"}),
        "flask_runs.create_app calls Flask's from_prefixed_env, which sets "
        "app.config['CELERY']['broker_url'] from it",
    ),
    "PYTHONPATH": Variable(
        frozenset({"python"}),
        "Python adds it to sys.path, and the image puts compose/ there for celeryconfig",
    ),
    "PYTHONUNBUFFERED": Variable(
        frozenset({"python"}),
        "Python writes stdout unbuffered, so container logs appear at once",
    ),
}

#: Variables that Compose substitutes from the shell that runs it.
KNOWN_INTERPOLATIONS = {
    "STACK_BROKER_URL": "chooses the broker of every application service",
    "FLOWER_BASIC_AUTH": "flower's user:password, which the file must not contain",
}

#: ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``, ``${NAME:?error}``,
#: ``${NAME?error}``, ``${NAME:+replacement}``, ``${NAME+replacement}`` and
#: ``$NAME``, as the Compose specification defines them.
INTERPOLATION = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)

#: A value that Compose fills from a variable the user must set, with no default.
REQUIRED_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):?\?[^}]*\}")


# -- reading the files -------------------------------------------------------


def load_compose() -> dict[str, Any]:
    """Parse docker-compose.yml (YAML anchors and merge keys resolved)."""
    with COMPOSE_FILE.open() as stream:
        document = yaml.safe_load(stream)
    assert isinstance(document, dict)
    return document


def interpolate(value: str) -> str:
    """Substitute variables as Compose would with none of them set.

    A default is used where one is given, a required variable becomes
    ``<NAME>``, and ``$$`` is a literal dollar sign.
    """

    def substitute(match: re.Match[str]) -> str:
        operator = match["operator"] or ""
        if operator.endswith("-"):
            return match["argument"]
        if operator.endswith("?"):
            return f"<{match['braced']}>"
        return ""

    parts = value.split("$$")
    return "$".join(INTERPOLATION.sub(substitute, part) for part in parts)


def interpolation_names(node: Any) -> set[str]:
    """Return the names of the variables that Compose substitutes anywhere in ``node``."""
    if isinstance(node, dict):
        return set().union(*(interpolation_names(item) for item in node.values()), set())
    if isinstance(node, list):
        return set().union(*(interpolation_names(item) for item in node), set())
    if isinstance(node, str):
        names = set()
        for part in node.split("$$"):
            for match in INTERPOLATION.finditer(part):
                names.add(match["braced"] or match["bare"])
        return names
    return set()


def command_of(service: dict[str, Any]) -> list[str]:
    """Return a service's command as a list of arguments, interpolated."""
    command = service.get("command", [])
    if isinstance(command, str):
        command = shlex.split(command)
    return [interpolate(str(argument)) for argument in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's environment in either of Compose's forms, not interpolated."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        pairs = (item.partition("=") for item in environment)
        return {name: value for name, _, value in pairs}
    return {name: "" if value is None else str(value) for name, value in environment.items()}


@dataclass
class Dockerfile:
    """What the checks need from a Dockerfile: its ENV names and its COPY instructions."""

    environment: dict[str, str] = field(default_factory=dict)
    #: (path in the image, path in the build context) of every COPY source.
    copies: list[tuple[PurePosixPath, Path]] = field(default_factory=list)
    missing_sources: list[str] = field(default_factory=list)

    def repository_path(self, image_path: str) -> Path | None:
        """Map a path in the image to the file it was copied from, or None."""
        requested = PurePosixPath(image_path)
        for target, source in reversed(self.copies):
            if requested == target:
                return source
            if source.is_dir() and requested.is_relative_to(target):
                return source / requested.relative_to(target)
        # A folder that COPY created to hold a file: the file's folder in the
        # repository, when the names below it agree. NOTE: that folder may
        # hold more files than the image's does.
        for target, source in reversed(self.copies):
            if target.is_relative_to(requested) and target != requested:
                below = target.relative_to(requested).parts
                if source.parts[-len(below) :] == below:
                    return source.parents[len(below) - 1]
        return None


def read_dockerfile(path: Path, context: Path) -> Dockerfile:
    """Read the ENV and COPY instructions of a Dockerfile (shell form, one stage)."""
    logical_lines: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical_lines.append(pending + stripped)
        pending = ""

    result = Dockerfile()
    workdir = PurePosixPath("/")
    for line in logical_lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "WORKDIR":
            workdir = workdir / rest.strip()
        elif keyword == "ENV":
            words = shlex.split(rest)
            if words and "=" not in words[0]:
                result.environment[words[0]] = " ".join(words[1:])
            else:
                result.environment.update(word.partition("=")[::2] for word in words)
        elif keyword in {"COPY", "ADD"}:
            words = [word for word in shlex.split(rest) if not word.startswith("--")]
            *sources, destination = words
            target_dir = workdir / destination
            for source in sources:
                source_path = context / source
                if not source_path.exists():
                    result.missing_sources.append(f"{keyword} {source}")
                    continue
                # A directory's contents land in the destination; files land in it
                # by name when there are several or the destination ends with "/".
                if source_path.is_dir() or (len(sources) == 1 and not destination.endswith("/")):
                    target = target_dir
                else:
                    target = target_dir / source_path.name
                result.copies.append((target, source_path))
    return result


def build_of(service: dict[str, Any]) -> tuple[Path, Path] | None:
    """Return a service's build context and Dockerfile on this machine, or None."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE_DIR / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def image_of(service: dict[str, Any]) -> Dockerfile | None:
    """Read the Dockerfile of a service that is built here, or None."""
    paths = build_of(service)
    if paths is None or not paths[1].is_file():
        return None
    return read_dockerfile(paths[1], paths[0])


# -- parsing commands with the programs' own click trees ----------------------


@dataclass
class Invocation:
    """A command line as a click command tree parsed it, without running it."""

    group_params: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    #: Arguments that the command would ignore (celery worker and beat allow them).
    extra_args: list[str] = field(default_factory=list)
    app: Any = None


def _recording_copy(command: click.Command, invocation: Invocation) -> click.Command:
    """Copy a click command so that invoking it records its parameters instead."""
    clone = copy.copy(command)
    clone.params = list(command.params)

    def record(**params: Any) -> None:
        context = click.get_current_context()
        invocation.command = context.info_name or ""
        invocation.params = params
        invocation.extra_args = list(context.args)

    clone.callback = record
    return clone


def parse_celery(argv: list[str]) -> Invocation:
    """Parse a ``celery`` command line as ``celery`` does, with its app loaded.

    Celery's group callback loads the ``-A`` app and adds the app's worker,
    beat and preload options to the subcommands. The callback below does the
    same to copies of the subcommands, so the real command tree stays unchanged.

    Raises:
        click.ClickException: the command line is invalid.
    """
    invocation = Invocation()
    group = copy.copy(celery_cli)
    group.commands = {
        name: _recording_copy(command, invocation) for name, command in celery_cli.commands.items()
    }

    def load_app(**params: Any) -> None:
        invocation.group_params = params
        if not params["app"]:
            raise click.UsageError("no app: give -A workflows_celery")
        try:
            app = find_app(params["app"])
        except (ImportError, AttributeError) as error:
            raise click.UsageError(f"cannot load app {params['app']!r}: {error}") from error
        invocation.app = app
        click.get_current_context().obj = CLIContext(
            app=app, no_color=True, workdir=None, quiet=True
        )
        for name in ("worker", "beat", "events"):
            group.commands[name].params.extend(app.user_options.get(name, ()))
        for command in group.commands.values():
            command.params.extend(app.user_options.get("preload", ()))

    group.callback = load_app
    group.main(argv[1:], prog_name="celery", standalone_mode=False, auto_envvar_prefix="CELERY")
    return invocation


def parse_flask(argv: list[str]) -> Invocation:
    """Parse a ``flask`` command line with Flask's command tree, loading no app.

    Raises:
        click.ClickException: the command line is invalid.
    """
    from flask.cli import ScriptInfo
    from flask.cli import cli as flask_cli

    invocation = Invocation()
    group = copy.copy(flask_cli)
    group.commands = {
        name: _recording_copy(command, invocation) for name, command in flask_cli.commands.items()
    }

    def record_group(**params: Any) -> None:
        # --app is not passed to the callback: Flask stores it in its ScriptInfo.
        script_info = click.get_current_context().find_object(ScriptInfo)
        invocation.group_params = {**params, "app": getattr(script_info, "app_import_path", None)}

    group.callback = record_group
    # FlaskGroup.make_context sets FLASK_RUN_FROM_CLI, which must not leak into this process.
    with mock.patch.dict(os.environ):
        group.main(argv[1:], prog_name="flask", standalone_mode=False)
    return invocation


def flower_problems(arguments: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Check flower's own arguments against the options flower defines.

    flower passes them to tornado, which reads ``--name=value`` (or a bare
    boolean flag) and stops at the first argument without a dash. Before that
    flower silently drops every name it does not define, so a typo would go
    unnoticed at run time.

    Returns:
        The problems, and the values of the valid options by name.
    """
    import flower.options  # noqa: F401 (defines flower's options in tornado's registry)
    from tornado.options import Error as TornadoOptionError
    from tornado.options import options as tornado_options

    problems: list[str] = []
    values: dict[str, Any] = {}
    for argument in arguments:
        if not argument.startswith("--"):
            problems.append(f"flower reads only --name=value options, not {argument!r}")
            continue
        name, equals, value = argument[2:].partition("=")
        normalized = name.replace("_", "-")
        # flower looks options up in tornado's registry the same way.
        option = tornado_options._options.get(normalized)
        if option is None:
            problems.append(f"flower has no option --{name}")
            continue
        if not equals:
            if option.type is not bool:
                problems.append(f"flower option --{name} needs a value: --{name}=VALUE")
                continue
            value = "true"
        try:
            values[normalized] = copy.copy(option).parse(value)
        except (TornadoOptionError, ValueError) as error:
            problems.append(f"flower option --{name}: invalid value {value!r} ({error})")
    return problems, values


@dataclass
class ServiceCommand:
    """A service's command, parsed."""

    #: The program, with the subcommand for celery (e.g. "celery flower").
    program: str
    invocation: Invocation | None
    problems: list[str]
    #: Port the program listens on, for programs that serve HTTP.
    port: int | None = None


def parse_service_command(service: dict[str, Any]) -> ServiceCommand:
    """Parse the command of a service with the tree of the program it runs."""
    argv = command_of(service)
    if not argv:
        return ServiceCommand("", None, [])
    program = argv[0]
    problems: list[str] = []
    port: int | None = None
    parsers = {"celery": parse_celery, "flask": parse_flask}
    if program not in parsers:
        return ServiceCommand(program, None, [f"unknown program {program!r}"])
    try:
        invocation = parsers[program](argv)
    except click.ClickException as error:
        return ServiceCommand(program, None, [f"{shlex.join(argv)}: {error.format_message()}"])

    if invocation.extra_args:
        problems.append(f"{shlex.join(argv)}: ignored arguments {invocation.extra_args}")
    if program == "celery":
        program = f"celery {invocation.command}"
    if program == "celery worker":
        problems += _service_name_problems(invocation)
    elif program == "celery flower":
        flower_args = list(invocation.params.get("tornado_argv", ()))
        flower_errors, values = flower_problems(flower_args)
        problems += flower_errors
        port = int(values.get("port", FLOWER_DEFAULT_PORT))
    elif program == "flask":
        port = int(invocation.params.get("port") or FLASK_DEFAULT_PORT)
    return ServiceCommand(program, invocation, problems, port)


def _service_name_problems(invocation: Invocation) -> list[str]:
    """Load each service a worker would host, as the worker does at its start."""
    names = parse_service_names(invocation.params.get("services"))
    if not names:
        return ["celery worker: no --services, so the worker hosts no workflows service"]
    problems = []
    for name in names:
        try:
            load_service(name)
        except ServiceNotFoundError as error:
            problems.append(f"celery worker --services: {error}")
    return problems


def service_programs(service: dict[str, Any]) -> frozenset[str]:
    """Name the programs that read a service's environment (see KNOWN_VARIABLES)."""
    argv = command_of(service)
    if not argv:
        return frozenset()
    if argv[0] == "celery":
        programs = {"python", "celery"}
        if "flower" in argv:
            programs.add("flower")
        return frozenset(programs)
    if argv[0] == "flask":
        return frozenset({"python", "flask"})
    return frozenset()


def _image_name(service: dict[str, Any]) -> str:
    """Return the repository part of a service's image, e.g. "redis" of "redis:7"."""
    image = str(service.get("image", ""))
    return image.rpartition("/")[2].partition(":")[0]


# -- the checks ----------------------------------------------------------------


def check_commands(compose: dict[str, Any]) -> list[str]:
    """Every command parses with its program's options, and named services resolve."""
    problems = []
    for name, service in compose["services"].items():
        argv = command_of(service)
        if "build" not in service:
            allowed = IMAGE_PROGRAMS.get(_image_name(service))
            if argv and (allowed is None or argv[0] not in allowed):
                problems.append(
                    f"{name}: {argv[0]!r} is not a program of image {service.get('image')}"
                )
            # NOTE: the options of the broker programs themselves are not checked.
            continue
        if not argv:
            problems.append(f"{name}: no command")
            continue
        parsed = parse_service_command(service)
        problems += [f"{name}: {problem}" for problem in parsed.problems]
    return problems


def check_environment(compose: dict[str, Any]) -> list[str]:
    """Every variable set is in KNOWN_VARIABLES, on a service whose programs read it."""
    problems = []
    for name, service in compose["services"].items():
        programs = service_programs(service)
        for variable in environment_of(service):
            known = KNOWN_VARIABLES.get(variable)
            if known is None:
                problems.append(f"{name}: unknown environment variable {variable}")
            elif not known.readers & programs:
                problems.append(
                    f"{name}: {variable} is read by {', '.join(sorted(known.readers))}, "
                    f"which this service does not run"
                )
            if variable.startswith("FLOWER_") and not _flower_reads(variable):
                problems.append(f"{name}: flower defines no option for {variable}")
        dockerfile = image_of(service)
        for variable in dockerfile.environment if dockerfile else ():
            if variable not in KNOWN_VARIABLES:
                problems.append(
                    f"{name}: unknown environment variable {variable} in its Dockerfile"
                )
    for variable in sorted(interpolation_names(compose) - set(KNOWN_INTERPOLATIONS)):
        problems.append(f"unknown variable ${{{variable}}} substituted by Compose")
    return problems


def _flower_reads(variable: str) -> bool:
    from flower.command import is_flower_envvar

    return bool(is_flower_envvar(variable))


def _published(entry: Any) -> tuple[str | None, str]:
    """Return (host address or None, container port) of one ``ports`` entry."""
    if isinstance(entry, dict):
        return entry.get("host_ip"), str(entry.get("target"))
    text = str(entry).partition("/")[0]
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        return address, rest.rsplit(":", 1)[-1]
    parts = text.split(":")
    return (parts[0] if len(parts) == 3 else None), parts[-1]


def check_ports(compose: dict[str, Any]) -> list[str]:
    """Ports are published on the loopback only, and reach the port the program serves."""
    problems = []
    for name, service in compose["services"].items():
        if service.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host publishes every port on every interface")
        entries = service.get("ports", [])
        for entry in entries:
            address, _ = _published(entry)
            if address not in LOOPBACK_ADDRESSES:
                bound_to = address or "0.0.0.0"
                problems.append(
                    f"{name}: port {entry!r} is published on {bound_to}, not on 127.0.0.1"
                )
        parsed = parse_service_command(service) if "build" in service else None
        if parsed is not None and parsed.port is not None and entries:
            targets = {_published(entry)[1] for entry in entries}
            if str(parsed.port) not in targets:
                problems.append(
                    f"{name}: {parsed.program} listens on {parsed.port}, but the published "
                    f"container ports are {sorted(targets)}"
                )
    return problems


def _flower_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if command_of(service)[:1] == ["celery"] and "flower" in command_of(service)
    }


def check_flower_auth(compose: dict[str, Any]) -> list[str]:
    """flower has basic authentication from a variable without a default, on 127.0.0.1."""
    flowers = _flower_services(compose)
    if not flowers:
        return ["no service runs celery flower"]
    problems = []
    for name, service in flowers.items():
        # On the command line a password would be in the file and in the process list.
        for argument in command_of(service):
            if argument.lstrip("-").startswith(("basic_auth", "basic-auth")):
                problems.append(
                    f"{name}: the password is in the command ({argument!r}); use FLOWER_BASIC_AUTH"
                )
        value = environment_of(service).get("FLOWER_BASIC_AUTH")
        if value is None:
            problems.append(
                f"{name}: FLOWER_BASIC_AUTH is not set, so flower has no password from a variable"
            )
        elif not REQUIRED_INTERPOLATION.fullmatch(value):
            problems.append(
                f"{name}: FLOWER_BASIC_AUTH is {value!r}; it must come from a required "
                "variable with no default, e.g. ${FLOWER_BASIC_AUTH:?set user:password}"
            )
        entries = service.get("ports", [])
        if not entries:
            problems.append(f"{name}: flower is not published")
        for entry in entries:
            if _published(entry)[0] not in LOOPBACK_ADDRESSES:
                problems.append(f"{name}: flower port {entry!r} is not bound to 127.0.0.1")
    return problems


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's dependencies with their conditions, in either form."""
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):
        return {target: "service_started" for target in depends_on}
    return {
        target: (spec or {}).get("condition", "service_started")
        for target, spec in depends_on.items()
    }


def check_depends_on(compose: dict[str, Any]) -> list[str]:
    """Dependencies exist, health conditions have health checks, brokers are waited for."""
    services = compose["services"]
    problems = []
    for name, service in services.items():
        depends_on = _depends_on(service)
        for target, condition in depends_on.items():
            if target not in services:
                problems.append(f"{name}: depends on {target}, which is not a service")
                continue
            healthcheck = services[target].get("healthcheck") or {}
            if condition == "service_healthy" and (not healthcheck or healthcheck.get("disable")):
                problems.append(
                    f"{name}: waits for {target} to be healthy, which has no healthcheck"
                )
        for variable, value in environment_of(service).items():
            if variable not in {"CELERY_BROKER_URL", "FLASK_CELERY__broker_url"}:
                continue
            host = urlsplit(interpolate(value)).hostname
            if host is None or host not in services:
                problems.append(f"{name}: {variable} names host {host}, which is not a service")
            elif depends_on.get(host) != "service_healthy":
                problems.append(
                    f"{name}: its broker {host} is not in depends_on with service_healthy"
                )
    return problems


def check_paths(compose: dict[str, Any]) -> list[str]:
    """Build contexts, Dockerfiles, COPY sources, bind mounts and working folders exist."""
    declared_volumes = set(compose.get("volumes") or {})
    problems = []
    for name, service in compose["services"].items():
        paths = build_of(service)
        if paths is not None:
            context, dockerfile_path = paths
            if not context.is_dir():
                problems.append(f"{name}: build context {context} does not exist")
            elif not dockerfile_path.is_file():
                problems.append(f"{name}: Dockerfile {dockerfile_path} does not exist")
            else:
                dockerfile = read_dockerfile(dockerfile_path, context)
                problems += [
                    f"{name}: {missing} does not exist" for missing in dockerfile.missing_sources
                ]
                working_dir = service.get("working_dir")
                if working_dir is not None:
                    copied_from = dockerfile.repository_path(working_dir)
                    if copied_from is None or not copied_from.is_dir():
                        problems.append(
                            f"{name}: working_dir {working_dir} is not copied into the image"
                        )
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                kind, mounted = volume.get("type", "volume"), str(volume.get("source", ""))
            else:
                mounted = str(volume).split(":")[0]
                kind = "bind" if mounted.startswith((".", "/", "~")) else "volume"
            if kind == "bind" and not (COMPOSE_DIR / Path(mounted).expanduser()).exists():
                problems.append(f"{name}: mounted path {mounted} does not exist")
            if kind == "volume" and mounted not in declared_volumes:
                problems.append(f"{name}: volume {mounted} is not declared under volumes")
    return problems


def check_flask_app(compose: dict[str, Any]) -> list[str]:
    """The ``--app`` of each flask command is a module in its working folder with create_app."""
    problems = []
    for name, service in compose["services"].items():
        if command_of(service)[:1] != ["flask"]:
            continue
        parsed = parse_service_command(service)
        dockerfile = image_of(service)
        if parsed.invocation is None or dockerfile is None:
            continue  # check_commands and check_paths report these
        app_path = str(parsed.invocation.group_params.get("app") or "")
        module_name, _, factory = app_path.partition(":")
        if not module_name:
            problems.append(f"{name}: flask has no --app")
            continue
        working_dir = dockerfile.repository_path(service.get("working_dir", "/"))
        folder = working_dir / Path(*module_name.split(".")) if working_dir else None
        if folder is not None and folder.is_dir():
            source = folder / "__init__.py"
        elif folder is not None:
            source = folder.with_suffix(".py")
        else:
            source = None
        if source is None or not source.is_file():
            problems.append(
                f"{name}: --app {module_name} is not a module in {service.get('working_dir')}"
            )
            continue
        # Without ":name", and with no app attribute in the module, Flask calls create_app.
        factory_name = factory.partition("(")[0] or "create_app"
        defined = {
            node.name
            for node in ast.parse(source.read_text()).body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        if factory_name not in defined:
            problems.append(f"{name}: {source.relative_to(REPOSITORY)} defines no {factory_name}()")
    return problems


CHECKS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "commands": check_commands,
    "environment": check_environment,
    "ports": check_ports,
    "flower_auth": check_flower_auth,
    "depends_on": check_depends_on,
    "paths": check_paths,
    "flask_app": check_flask_app,
}


# -- the tests -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed docker-compose.yml."""
    return load_compose()


def test_compose_has_no_version_key(compose: dict[str, Any]) -> None:
    # The Compose specification has no top-level version key.
    assert "version" not in compose


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "rabbitmq", "worker", "beat", "flower", "web"}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_compose_passes_check(compose: dict[str, Any], check: str) -> None:
    if check == "flask_app" and not FLASK_EXAMPLE.is_dir():
        pytest.skip("examples/flask does not exist yet, so the web service's app cannot be checked")
    assert CHECKS[check](compose) == []


def test_worker_command_hosts_named_services(compose: dict[str, Any]) -> None:
    parsed = parse_service_command(compose["services"]["worker"])
    assert parsed.invocation is not None
    assert parsed.invocation.command == "worker"
    assert parse_service_names(parsed.invocation.params["services"]) == [
        "SamplePipethrough",
        "RecipeDispatcher",
    ]


def _break_worker_option(document: dict[str, Any]) -> None:
    document["services"]["worker"]["command"][4] = "--service"


def _break_service_name(document: dict[str, Any]) -> None:
    document["services"]["worker"]["command"][5] = "SamplePipethrough,NoSuchService"


def _break_celery_command(document: dict[str, Any]) -> None:
    document["services"]["beat"]["command"][3] = "beats"


def _break_beat_option(document: dict[str, Any]) -> None:
    document["services"]["beat"]["command"].append("--max-intreval=5")


def _break_flower_option(document: dict[str, Any]) -> None:
    document["services"]["flower"]["command"][-1] = "--prot=5555"


def _break_flask_option(document: dict[str, Any]) -> None:
    document["services"]["web"]["command"].append("--hots")


def _break_flask_app(document: dict[str, Any]) -> None:
    document["services"]["web"]["command"][2] = "no_such_module"


def _remove_flask_factory(document: dict[str, Any]) -> None:
    document["services"]["web"]["command"][2] = "flask_runs.runs"


def _add_unknown_variable(document: dict[str, Any]) -> None:
    document["services"]["worker"]["environment"]["CELERY_BORKER_URL"] = "redis://redis:6379/0"


def _misplace_variable(document: dict[str, Any]) -> None:
    document["services"]["worker"]["environment"]["FLOWER_BASIC_AUTH"] = "${FLOWER_BASIC_AUTH:?x}"


def _add_unknown_interpolation(document: dict[str, Any]) -> None:
    document["services"]["beat"]["environment"]["CELERY_BROKER_URL"] = (
        "${BROKER:-redis://redis:6379/0}"
    )


def _publish_everywhere(document: dict[str, Any]) -> None:
    document["services"]["web"]["ports"] = ["0.0.0.0:5000:5000"]


def _publish_without_address(document: dict[str, Any]) -> None:
    document["services"]["redis"]["ports"] = ["6379:6379"]


def _publish_wrong_port(document: dict[str, Any]) -> None:
    document["services"]["flower"]["ports"] = ["127.0.0.1:5555:8080"]


def _default_password(document: dict[str, Any]) -> None:
    document["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"] = (
        "${FLOWER_BASIC_AUTH:-admin:admin}"
    )


def _password_in_command(document: dict[str, Any]) -> None:
    del document["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    document["services"]["flower"]["command"].append("--basic-auth=admin:admin")


def _depend_on_missing_service(document: dict[str, Any]) -> None:
    document["services"]["beat"]["depends_on"] = {"postgres": {"condition": "service_healthy"}}


def _drop_broker_dependency(document: dict[str, Any]) -> None:
    document["services"]["worker"]["depends_on"] = {"rabbitmq": {"condition": "service_healthy"}}


def _wrong_build_context(document: dict[str, Any]) -> None:
    document["services"]["worker"]["build"] = {
        "context": "../no-such-folder",
        "dockerfile": "compose/Dockerfile",
    }


def _wrong_dockerfile(document: dict[str, Any]) -> None:
    document["services"]["beat"]["build"] = {
        "context": "..",
        "dockerfile": "compose/Dockerfile.missing",
    }


def _mount_missing_file(document: dict[str, Any]) -> None:
    document["services"]["worker"]["volumes"] = ["./no-such-recipes:/recipes:ro"]


def _wrong_working_dir(document: dict[str, Any]) -> None:
    document["services"]["web"]["working_dir"] = "/opt/workflows-celery/examples/no-such-app"


#: (id, mistake, check that must report it, text the report contains)
BROKEN_COPIES = [
    ("worker option", _break_worker_option, "commands", "--service"),
    ("service name", _break_service_name, "commands", "NoSuchService"),
    ("celery subcommand", _break_celery_command, "commands", "beats"),
    ("beat option", _break_beat_option, "commands", "--max-intreval"),
    ("flower option", _break_flower_option, "commands", "--prot"),
    ("flask option", _break_flask_option, "commands", "--hots"),
    ("flask app", _break_flask_app, "flask_app", "no_such_module"),
    ("flask factory", _remove_flask_factory, "flask_app", "defines no create_app()"),
    ("unknown variable", _add_unknown_variable, "environment", "CELERY_BORKER_URL"),
    ("variable on wrong service", _misplace_variable, "environment", "FLOWER_BASIC_AUTH"),
    ("unknown interpolation", _add_unknown_interpolation, "environment", "${BROKER}"),
    ("port on 0.0.0.0", _publish_everywhere, "ports", "0.0.0.0"),
    ("port without address", _publish_without_address, "ports", "6379:6379"),
    ("port not served", _publish_wrong_port, "ports", "celery flower listens on 5555"),
    ("default password", _default_password, "flower_auth", "admin:admin"),
    ("password in command", _password_in_command, "flower_auth", "--basic-auth"),
    ("missing dependency", _depend_on_missing_service, "depends_on", "postgres"),
    ("broker not waited for", _drop_broker_dependency, "depends_on", "redis"),
    ("build context", _wrong_build_context, "paths", "no-such-folder"),
    ("dockerfile", _wrong_dockerfile, "paths", "Dockerfile.missing"),
    ("mount", _mount_missing_file, "paths", "no-such-recipes"),
    ("working dir", _wrong_working_dir, "paths", "no-such-app"),
]


@pytest.mark.parametrize(
    ("mistake", "check", "expected"),
    [
        pytest.param(mistake, check, expected, id=name)
        for name, mistake, check, expected in BROKEN_COPIES
    ],
)
def test_broken_copy_fails(
    compose: dict[str, Any], mistake: Callable[[dict[str, Any]], None], check: str, expected: str
) -> None:
    if check == "flask_app" and not FLASK_EXAMPLE.is_dir():
        pytest.skip("examples/flask does not exist yet, so the web service's app cannot be checked")
    broken = copy.deepcopy(compose)
    mistake(broken)
    problems = CHECKS[check](broken)
    assert any(expected in problem for problem in problems), problems


# -- the settings module and the programs loaded with the stack's environment --


def _load_celeryconfig() -> Any:
    """Import compose/celeryconfig.py without adding it to sys.modules."""
    spec = spec_from_file_location("compose_celeryconfig", CELERY_CONFIG_FILE)
    assert spec is not None and spec.loader is not None
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image(compose: dict[str, Any], service: str) -> Dockerfile:
    dockerfile = image_of(compose["services"][service])
    assert dockerfile is not None
    return dockerfile


def test_beat_schedule_starts_pipethrough_every_minute(compose: dict[str, Any]) -> None:
    schedule = _load_celeryconfig().beat_schedule
    assert len(schedule) == 1
    entry = next(iter(schedule.values()))
    assert entry["task"] == START_TASK_NAME
    assert maybe_schedule(entry["schedule"]).run_every == timedelta(minutes=1)
    assert set(entry["kwargs"]) == {"recipe", "parameters"}
    recipe = _image(compose, "worker").repository_path(entry["kwargs"]["recipe"])
    assert recipe == REPOSITORY / "examples" / "recipes" / "pipethrough.json"


def test_beat_schedule_parameters_fill_recipe(compose: dict[str, Any]) -> None:
    entry = next(iter(_load_celeryconfig().beat_schedule.values()))
    recipe = _image(compose, "worker").repository_path(entry["kwargs"]["recipe"])
    assert recipe is not None
    placeholders = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", recipe.read_text()))
    assert placeholders <= set(entry["kwargs"]["parameters"])
    try:
        prepare_recipe(str(recipe), entry["kwargs"]["parameters"])
    except WorkflowsCeleryError as error:
        pytest.fail(f"the scheduled recipe is invalid: {error}")


def _container_environment(compose: dict[str, Any], service: str) -> dict[str, str]:
    """Build the environment a service's container would have, on this machine.

    It is the Dockerfile's ENV and the service's environment, interpolated,
    with image paths in PYTHONPATH mapped to the repository. This process's
    own Celery, flower and Flask variables are left out so they cannot interfere.
    """
    dockerfile = _image(compose, service)
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CELERY_", "FLOWER_", "FLASK_", "WORKFLOWS_CELERY_", "PYTHON"))
    }
    environment = dict(dockerfile.environment)
    environment.update(
        (name, interpolate(value))
        for name, value in environment_of(compose["services"][service]).items()
    )
    if "PYTHONPATH" in environment:
        mapped = [dockerfile.repository_path(part) for part in environment["PYTHONPATH"].split(":")]
        assert None not in mapped, (
            f"PYTHONPATH {environment['PYTHONPATH']} is not copied into the image"
        )
        environment["PYTHONPATH"] = os.pathsep.join(str(path) for path in mapped)
    return {**inherited, **environment}


#: Script that loads the ready-made app as ``celery -A workflows_celery`` does
#: and prints its broker, beat schedule and start task's parameters as JSON.
_READY_MADE_APP_REPORT = textwrap.dedent(
    """
    import inspect, json
    from celery.app.utils import find_app
    app = find_app("workflows_celery")
    task = app.tasks.get(%r)
    print(json.dumps({
        "broker_url": app.conf.broker_url,
        "beat_schedule": app.conf.beat_schedule,
        "start_task_parameters": list(inspect.signature(task.run).parameters) if task else None,
    }))
    """
    % START_TASK_NAME
)


@pytest.fixture(scope="module")
def worker_app_report(
    compose: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Settings and tasks of the ready-made app in the worker container's environment."""
    completed = subprocess.run(
        [sys.executable, "-c", _READY_MADE_APP_REPORT],
        env=_container_environment(compose, "worker"),
        # Not the repository: celeryconfig must come from PYTHONPATH, as in the image.
        cwd=tmp_path_factory.mktemp("worker"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    report: dict[str, Any] = json.loads(completed.stdout.splitlines()[-1])
    return report


def test_worker_app_reads_broker_variable(
    compose: dict[str, Any], worker_app_report: dict[str, Any]
) -> None:
    expected = interpolate(environment_of(compose["services"]["worker"])["CELERY_BROKER_URL"])
    assert worker_app_report["broker_url"] == expected


def test_worker_app_loads_celeryconfig(worker_app_report: dict[str, Any]) -> None:
    expected = json.loads(json.dumps(_load_celeryconfig().beat_schedule))
    assert worker_app_report["beat_schedule"] == expected


def test_worker_app_has_start_task(worker_app_report: dict[str, Any]) -> None:
    parameters = worker_app_report["start_task_parameters"]
    assert parameters is not None, f"the ready-made app registers no task {START_TASK_NAME}"
    assert {"recipe", "parameters"} <= set(parameters)


@pytest.fixture
def flask_example() -> Iterator[Path]:
    """The Flask example's folder, or a skip while it does not exist."""
    if not FLASK_EXAMPLE.is_dir():
        pytest.skip("examples/flask does not exist yet, so the web service's app cannot be loaded")
    yield FLASK_EXAMPLE


def test_web_app_reads_broker_variable(compose: dict[str, Any], flask_example: Path) -> None:
    service = compose["services"]["web"]
    parsed = parse_service_command(service)
    assert parsed.invocation is not None
    app_path = parsed.invocation.group_params["app"]
    working_dir = _image(compose, "web").repository_path(service["working_dir"])
    assert working_dir == flask_example
    # ScriptInfo.load_app is how "flask --app" finds the app and calls its factory.
    script = (
        "import json; from flask.cli import ScriptInfo; "
        f"app = ScriptInfo(app_import_path={app_path!r}).load_app(); "
        "print(json.dumps(app.extensions['celery'].conf.broker_url))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env=_container_environment(compose, "web"),
        cwd=working_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    expected = interpolate(environment_of(service)["FLASK_CELERY__broker_url"])
    assert json.loads(completed.stdout.splitlines()[-1]) == expected
