"""`python -m optimum_isoprune` runs the `optimum-isoprune` console script."""

import sys

from .cli import main

sys.exit(main())
