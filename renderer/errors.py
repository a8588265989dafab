"""The one error type a single job raises: a clear, user-facing message."""

from __future__ import annotations


class JobError(Exception):
    """A job could not be rendered. `str(err)` names the thing, the value and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
