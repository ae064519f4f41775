"""One exception hierarchy: every message says what was expected, what arrived, and what to do."""

from __future__ import annotations


class VsalError(Exception):
    """Base of every error vsal raises on purpose; the CLIs print it as one line, no traceback."""


class MediaError(VsalError, ValueError):
    """A media file that cannot be used: names the file and what is wrong with it."""
