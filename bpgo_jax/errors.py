"""The errors a user can fix, and the exit codes of the commands.

Launchers print a `UserError` as one line, `error: <message>`, and exit with
`EXIT_ERROR`; the message names the field, file or flag at fault. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_ERROR = 1
# A run stopped by SIGTERM after saving its checkpoint: unfinished, safe to
# requeue (sysexits' EX_TEMPFAIL, "try again later").
EXIT_PREEMPTED = 75


class UserError(Exception):
    """A bad input or environment, reported as one line."""


class ConfigError(UserError, ValueError):
    """A config field that is missing, mistyped or inconsistent."""


class InputFileError(UserError, ValueError):
    """A data file (prompts, ...) that is missing, unreadable or malformed."""


class WeightsError(UserError, ValueError):
    """A weights file or folder that cannot be read as the model expects."""


class WorkdirError(UserError):
    """A run directory that is locked, unwritable, damaged or from another config."""


class Preempted(Exception):  # noqa: N818 (a signal, not a failure)
    """Raised after a SIGTERM-triggered checkpoint: the run is unfinished."""


class DivergedError(UserError):
    """Too many consecutive updates skipped for non-finite rewards, loss or gradients."""
