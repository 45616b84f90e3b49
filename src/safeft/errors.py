"""What counts as bad input: errors reported as one line with exit code 2 and no traceback, by the CLI and by a
bench run's process alike."""

from __future__ import annotations


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2, no traceback."""


# Errors that mean bad input (a value, a file, a setting the run cannot succeed with): exit code 2, one message.
USER_ERRORS = (UsageError, ValueError, FileExistsError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError, FloatingPointError, UnicodeDecodeError)
