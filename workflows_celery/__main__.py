"""``python -m workflows_celery``: the same as the ``workflows-celery`` command."""

import sys

from workflows_celery.cli import main

sys.exit(main())
