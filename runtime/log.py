"""One way to tell the user what is going on: a line per message, prefixed with the tool's name.

Progress goes to stderr so that a command's own output (an answer, a JSON report) stays clean on
stdout; the build and the export print their progress on stdout, which is their output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def say(prefix: str, message: str, *, enabled: bool = True, stdout: bool = False) -> None:
    """Print `prefix: message` at once (flushed), to stderr unless `stdout`."""
    if enabled:
        print(f"{prefix}: {message}", file=sys.stdout if stdout else sys.stderr, flush=True)


def sayer(prefix: str, *, enabled: bool = True, stdout: bool = False) -> Callable[[str], None]:
    """`say` with its prefix and switches bound: `say = sayer("vsal bench")`."""

    def bound(message: str) -> None:
        say(prefix, message, enabled=enabled, stdout=stdout)

    return bound
