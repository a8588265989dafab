"""castbook's error types. The CLI prints any `CastbookError` as its message (no traceback) and exits
with its `exit_code`: 2 for input a user can fix (a spec, a path, a file), 1 for work that failed.

Raise them where the bad value is known (the loader knows the line, the runner knows the folder).
`castbook.cli.main` also turns an OSError on a path the user named (or on $CASTBOOK_HOME) into
exit 2; any other exception is a bug in castbook and keeps its traceback."""

from __future__ import annotations

INPUT_ERROR = 2
FAILED = 1


class CastbookError(Exception):
    """Base of every error castbook raises on purpose. `str(err)` names the thing, the value and
    what to do instead."""

    exit_code = INPUT_ERROR


class InputError(CastbookError):
    """A path, file or argument given by the user cannot be used (exit 2)."""


class JobError(CastbookError):
    """A job could not be rendered (exit 1 when it ends a command)."""

    exit_code = FAILED

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
