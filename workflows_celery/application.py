"""Setting up a Celery app for workflows: one call for a user's own app, and ready-made apps."""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType
from typing import Any

from celery import Celery

from workflows_celery import logcontext
from workflows_celery.constants import (
    CONFIG_MODULE_VARIABLE,
    DEFAULT_APP_NAME,
    DEFAULT_PROCESS_START_TIMEOUT_S,
    LEDGER_URL_VARIABLE,
    NAMESPACE_VARIABLE,
    SETTING_LEDGER_URL,
    SETTING_NAMESPACE,
    SETTING_SERVICES,
    START_TASK_NAME,
    STEP_TASK_NAME,
)
from workflows_celery.errors import ConfigurationError

#: Celery's own default for ``worker_proc_alive_timeout``, in seconds.
_CELERY_PROCESS_START_TIMEOUT_S = 4.0

#: Broker URL schemes of Redis.
_REDIS_SCHEMES = frozenset({"redis", "rediss"})

#: Broker URL schemes of RabbitMQ through py-amqp.
_AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

_default_app: Celery | None = None
_default_app_lock = threading.Lock()


def setup_app(app: Celery, *, services: Any = None) -> Celery:
    """Prepare a Celery app to carry workflows messages and host services.

    Call it once where the app is created (in Django, in ``proj/celery.py``
    after ``config_from_object``). It registers the step task, limits
    serialisation to JSON (a worker accepts no pickle), adds the worker's
    ``--services`` option and its hosting bootstep, and sets the
    ``workflows_services`` setting when ``services`` is given.

    Args:
        app: The app to prepare.
        services: Services its workers host unless ``--services`` names others:
            entry-point names, import paths or classes.

    Returns:
        The same app, for chaining.
    """
    from workflows_celery.canvas import start_recipe_task
    from workflows_celery.hosting import run_step
    from workflows_celery.worker import install_worker_support

    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        result_serializer="json",
    )
    if app.conf.worker_proc_alive_timeout == _CELERY_PROCESS_START_TIMEOUT_S:
        app.conf.worker_proc_alive_timeout = DEFAULT_PROCESS_START_TIMEOUT_S
    if services is not None:
        app.conf[SETTING_SERVICES] = services
    if app.conf.get(SETTING_NAMESPACE) is None and os.environ.get(NAMESPACE_VARIABLE):
        app.conf[SETTING_NAMESPACE] = os.environ[NAMESPACE_VARIABLE]
    if app.conf.get(SETTING_LEDGER_URL) is None and os.environ.get(LEDGER_URL_VARIABLE):
        app.conf[SETTING_LEDGER_URL] = os.environ[LEDGER_URL_VARIABLE]
    apply_broker_defaults(app)
    # Worker log lines about a step name its service, run ID and node.
    logcontext.install()
    if app.conf.worker_log_format == logcontext.CELERY_WORKER_LOG_FORMAT:
        app.conf.worker_log_format = logcontext.WORKER_LOG_FORMAT

    if STEP_TASK_NAME not in app.tasks:
        # Not shared: each app's step task serves that app's hosted services.
        app.task(
            name=STEP_TASK_NAME,
            bind=True,
            shared=False,
            acks_late=True,
            reject_on_worker_lost=True,
            ignore_result=True,
            typing=False,
        )(run_step)
    if START_TASK_NAME not in app.tasks:
        app.task(name=START_TASK_NAME, bind=True, shared=False)(start_recipe_task)
    install_worker_support(app)
    return app


def apply_broker_defaults(app: Celery) -> None:
    """Give ``app`` the settings its broker needs for at-least-once delivery.

    Settings the app already has are kept. On Redis: the transport of
    :mod:`workflows_celery.redis_transport` and a visibility timeout of two
    minutes (renewed while a message is held, see :mod:`workflows_celery.leases`),
    and a connect timeout of ``broker_connection_timeout``.
    On RabbitMQ: publisher confirms, so that a send returns only once the broker
    has the message.

    ``setup_app`` calls it, and so does the worker once ``celery -b URL`` has
    set the broker (the command line sets it after the app is loaded).
    """
    from workflows_celery.leases import set_default_visibility_timeout, uses_redis
    from workflows_celery.redis_transport import TRANSPORT_NAME

    url = str(app.conf.broker_url or "")
    scheme = url.partition("://")[0].lower()
    if uses_redis(app):
        set_default_visibility_timeout(app)
    if scheme == "redis" and not app.conf.broker_transport:
        app.conf.broker_transport = TRANSPORT_NAME
    if scheme in _REDIS_SCHEMES:
        # kombu's Redis transport ignores ``broker_connection_timeout``, so a
        # host that drops connection attempts would block a send until the
        # operating system gives up, which takes minutes.
        options = dict(app.conf.broker_transport_options or {})
        options.setdefault("socket_connect_timeout", app.conf.broker_connection_timeout)
        app.conf.broker_transport_options = options
    if scheme in _AMQP_SCHEMES:
        options = dict(app.conf.broker_transport_options or {})
        options.setdefault("confirm_publish", True)
        app.conf.broker_transport_options = options


def create_app(broker_url: str | None = None, *, main: str = DEFAULT_APP_NAME) -> Celery:
    """Create a new Celery app set up for workflows.

    Args:
        broker_url: Broker to use; when omitted Celery reads ``CELERY_BROKER_URL``.
        main: Name of the app's main module, as for :class:`celery.Celery`.
    """
    app = Celery(main, broker=broker_url, set_as_current=False)
    return setup_app(app)


def default_app() -> Celery:
    """Return the ready-made app that ``celery -A workflows_celery`` runs.

    When the environment variable ``CELERY_CONFIG_MODULE`` names a module, the
    app loads its settings (lower-case Celery setting names, such as
    ``beat_schedule``) before workflows-celery adds its own. Celery's loader
    reads that variable for any app without a configuration of its own. The
    module is imported here so that a module that cannot be imported gives
    an error naming the variable.
    """
    global _default_app
    with _default_app_lock:
        if _default_app is None:
            app = Celery(DEFAULT_APP_NAME, set_as_current=False)
            module_name = os.environ.get(CONFIG_MODULE_VARIABLE)
            if module_name:
                app.config_from_object(_settings_module(module_name))
            _default_app = setup_app(app)
        return _default_app


def _settings_module(name: str) -> ModuleType:
    """Import the settings module that ``CELERY_CONFIG_MODULE`` names.

    Raises:
        ConfigurationError: the module cannot be imported.
    """
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise ConfigurationError(
            f"{CONFIG_MODULE_VARIABLE}={name!r} names a module that cannot be imported "
            f"({type(error).__name__}: {error}); put its folder on PYTHONPATH, "
            "fix the module, or unset the variable"
        ) from error
