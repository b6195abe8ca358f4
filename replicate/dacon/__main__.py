"""python -m replicate.dacon: the DACON recipe's command line."""

import sys

from replicate.dacon import TASK

sys.exit(TASK.main())
