# Importing the Celery app here, when Django starts, makes it the current app,
# so code that imports no app of its own (``@shared_task``) uses this one.
from proj.celery import app as celery_app

__all__ = ("celery_app",)
