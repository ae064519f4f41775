"""One exception hierarchy: every message says what was expected, what arrived, and what to do.

`VsalError` is the root of every error raised on purpose for a user's mistake or a bad input (a
package, a media file, a request, an option). The CLIs and the Triton orchestrator catch this tree
alone and print one line; anything else that escapes is a bug and keeps its traceback.

    VsalError
    ├── ConfigError        an option, preset or config value that is not valid
    ├── PackageError       a model package that is missing, corrupt, unsafe or of another format
    ├── MediaError         a media file that cannot be used
    ├── PromptError        a prompt that is not valid text, or empty
    ├── LimitError         a request past a limit (tokens, context, beams, upload size)
    ├── BuildError         a build that cannot start or did not meet its gate

Each module's own errors derive from VsalError or one of these: BackendError, EngineError,
ServeError, ServerError, RepositoryError, ExportError, Fp16Error, CheckpointError, AssetError,
QuantizeError (a BuildError), TokenizerFileError (a PackageError).
"""

from __future__ import annotations


class VsalError(Exception):
    """Base of every error vsal raises on purpose; the CLIs print it as one line, no traceback."""


class ConfigError(VsalError, ValueError):
    """An option, preset name or configuration value that is not valid: names it and the choices."""


class PackageError(VsalError, ValueError):
    """A model package that is missing, corrupt, unsafe or of another format: names the file and why."""


class MediaError(VsalError, ValueError):
    """A media file that cannot be used: names the file and what is wrong with it."""


class PromptError(VsalError, ValueError):
    """A prompt that is empty or not valid text."""


class LimitError(VsalError, ValueError):
    """A request past one of the model's or the server's limits: gives the limit and what to do."""


class BuildError(VsalError):
    """A build that cannot start (a lock held, a missing input) or whose result failed its gate."""
