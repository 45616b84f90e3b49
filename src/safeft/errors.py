"""What counts as bad input: errors reported as one line with exit code 2 and no traceback, by the CLI and by a
bench run's process alike. Anything else is a bug: exit code 1, with ``--debug`` for the traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for or gave (a value, a file, a setting the run cannot succeed with):
    printed as one line naming the problem and the fix, exit code 2, no traceback. A ``ValueError`` subclass, so
    the Python API's callers can still catch ``ValueError``; a plain ``ValueError`` from deep inside is a bug."""


UsageError = UserError  # the former name

# exit code 2, one message: safeft's own user errors, and the OS's verdict on a path the user gave
USER_ERRORS = (UserError, FileExistsError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
               FloatingPointError, UnicodeDecodeError)
