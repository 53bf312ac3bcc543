import sys

from harness.study.cli import main

if __name__ == "__main__":
    sys.exit(main())
