"""python -m replicate.maic: the MAIC recipe's command line."""

import sys

from replicate.maic import TASK

sys.exit(TASK.main())
