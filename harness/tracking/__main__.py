import sys

from harness.tracking.ui import main

sys.exit(main())
