"""`python -m gptedge ...`: the same command line as `gptedge ...`."""

import sys

from gptedge.cli import main

sys.exit(main())
