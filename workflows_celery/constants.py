"""Names shared by senders and workers: the task, message fields, settings and defaults.

Every process that sends or receives workflows messages must agree on these, so
they live in one place.
"""

from __future__ import annotations

#: Name of the Celery task that carries every workflows message. A sender never
#: imports service code: the destination queue alone decides which worker runs it.
STEP_TASK_NAME = "workflows_celery.step"

#: Name of the task that starts a run of a recipe, e.g. from ``celery beat``.
START_TASK_NAME = "workflows_celery.start_recipe"

# Keyword arguments of the step task, as they appear in the task message body.
KWARG_QUEUE = "queue"
KWARG_TOPIC = "topic"
KWARG_HEADERS = "headers"
KWARG_MESSAGE = "message"

#: Header that marks a message body as a wrapped recipe (set by workflows itself).
HEADER_RECIPE = "workflows-recipe"

#: Topic on which services broadcast their status, as in workflows.
STATUS_TOPIC = "transient.status"

#: Topic on which services receive commands such as shutdown, as in workflows.
COMMAND_TOPIC = "command"

#: Seconds after which a status message is dropped, as in workflows.
STATUS_EXPIRATION_S = 15

#: Prefix of the queues created by ``subscribe_temporary``. Senders do not
#: declare these queues, because they belong to the connection that made them.
TEMPORARY_QUEUE_PREFIX = "transient.tmp."

# Celery settings read by workflows-celery (lower case, as in ``app.conf``; with
# a Django-style namespace they gain its prefix, e.g. ``CELERY_WORKFLOWS_SERVICES``).

#: Services a worker hosts: entry-point names or ``module:Class`` import paths.
SETTING_SERVICES = "workflows_services"

#: Seconds a prefork child may spend starting its services before Celery
#: considers it failed (Celery's own default of 4 s is too short for services
#: that connect to databases in ``initializing()``).
DEFAULT_PROCESS_START_TIMEOUT_S = 30.0

#: Deliveries after which a message goes to its dead-letter queue instead of
#: back to its queue; Zocalo gives its RabbitMQ queues the same limit.
DEFAULT_DELIVERY_LIMIT = 5

#: Setting that overrides :data:`DEFAULT_DELIVERY_LIMIT`.
SETTING_DELIVERY_LIMIT = "workflows_delivery_limit"

#: Largest message a sender may send, in bytes of JSON: the step task's body,
#: which contains the message, its headers and its destination. Large data
#: belongs in files; messages carry their paths.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: Setting naming the folder of named recipes (``NAME.json`` files).
SETTING_RECIPE_DIR = "workflows_recipe_dir"

#: Environment variable naming the recipe folder when the setting is not set.
RECIPE_DIR_VARIABLE = "WORKFLOWS_CELERY_RECIPE_DIR"

#: Environment variable naming the folder where ``run`` spools runs it could not send.
SPOOL_DIR_VARIABLE = "WORKFLOWS_CELERY_SPOOL_DIR"

#: Queue on which the dispatcher service takes start requests, as in Zocalo.
DISPATCHER_QUEUE = "processing_recipe"

#: Setting that turns the run ledger off when False (it is on by default on Redis).
SETTING_LEDGER = "workflows_ledger"

#: Setting naming the Redis of the run ledger (default: a Redis result backend or broker).
SETTING_LEDGER_URL = "workflows_ledger_url"

#: Environment variable giving ``workflows_ledger_url`` to apps that do not set it.
LEDGER_URL_VARIABLE = "WORKFLOWS_CELERY_LEDGER_URL"

#: Setting giving the seconds a run's ledger records are kept after its last update.
SETTING_LEDGER_TTL = "workflows_ledger_ttl"

#: Setting naming the environment (e.g. "live" or "test") whose broadcasts an
#: app sends and hears: topics become ``<namespace>.<topic>`` on the broker.
SETTING_NAMESPACE = "workflows_namespace"

#: Environment variable that sets :data:`SETTING_NAMESPACE` when an app does not.
NAMESPACE_VARIABLE = "WORKFLOWS_CELERY_NAMESPACE"

#: Setting that overrides :data:`DEFAULT_MAX_MESSAGE_BYTES` (0: no limit).
SETTING_MAX_MESSAGE_BYTES = "workflows_max_message_bytes"

#: Prefix of dead-letter queue names: messages of queue ``q`` end up in ``dlq.q``.
DEAD_LETTER_PREFIX = "dlq."

#: Header counting earlier deliveries of a message (the name RabbitMQ's quorum
#: queues use for the same count).
HEADER_DELIVERY_COUNT = "x-delivery-count"

#: Message header describing why a message was dead-lettered, laid out as
#: RabbitMQ's own dead-lettering writes it.
HEADER_DEATH = "x-death"

#: Message header with the error that dead-lettered a message, if any.
HEADER_DEAD_LETTER_ERROR = "x-workflows-error"

#: Header of a message re-injected from a dead-letter queue: where from, and when.
HEADER_REINJECTED = "workflows-reinjected"

#: Name of the ready-made app of ``celery -A workflows_celery``.
DEFAULT_APP_NAME = "workflows_celery"

#: Environment variable naming a module of Celery settings that the ready-made
#: app loads, as in Celery's own ``config_from_envvar`` example.
CONFIG_MODULE_VARIABLE = "CELERY_CONFIG_MODULE"

#: Celery's default for the ``worker_consumer`` setting, which workflows-celery
#: replaces with its own consumer unless an app already chose another.
CELERY_DEFAULT_CONSUMER = "celery.worker.consumer:Consumer"

#: Broker URL of the embedded mode: kombu's in-memory transport, one process.
EMBEDDED_BROKER_URL = "memory://localhost/"
