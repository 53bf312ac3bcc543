"""The one base class of every error a user can act on, and the one way each command reports it.

A ``CapsbenchError``'s message is a single line that names the problem and the fix; commands print it as
``error: <message>`` and exit with the error's ``exit_code``: 2 for bad input (a file, a setting, a name),
1 for a run that failed on good input (NaN loss, a database that went away).

    @cli_errors
    def main(argv=None) -> int: ...
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class CapsbenchError(Exception):
    """An error the user can fix; its message says how."""

    exit_code = 2


def cli_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's ``main``: a ``CapsbenchError`` becomes ``error: ...`` on stderr and its exit code;
    Ctrl-C exits 130 without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except CapsbenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            return 130

    return wrapper
