"""python -m replicate.dcase: the DCASE recipe's command line."""

import sys

from replicate.dcase import TASK

sys.exit(TASK.main())
