"""``python -m soak``: run the soak test and print its report."""

import sys

from soak.run import main

sys.exit(main())
