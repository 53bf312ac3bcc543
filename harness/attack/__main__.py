"""``python -m harness.attack``: the command line (harness/attack/cli.py)."""

import sys

from harness.attack.cli import main

sys.exit(main())
