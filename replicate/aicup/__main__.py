"""python -m replicate.aicup: the AI CUP recipe's command line."""

import sys

from replicate.aicup import TASK

sys.exit(TASK.main())
