"""Celery settings of the worker and beat in docker-compose.yml.

Both containers set ``CELERY_CONFIG_MODULE=celeryconfig``, and the image puts
this folder on ``PYTHONPATH``. Names are Celery's lower-case setting names.
"""

#: Every minute (the schedule is in seconds), start a run of the pipethrough
#: example recipe. The worker reads the file where the Dockerfile copies examples/.
beat_schedule = {
    "pipethrough-every-minute": {
        "task": "workflows_celery.start_recipe",
        "schedule": 60.0,
        "kwargs": {
            "recipe": "/opt/workflows-celery/examples/recipes/pipethrough.json",
            "parameters": {"sample": "lysozyme"},
        },
    },
}
