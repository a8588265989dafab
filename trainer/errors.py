"""The trainer's errors: problems a user can fix (a spec, a dataset, a path), exit code 2.

They subclass `core.errors.CastbookError`, so the CLI prints the message without a traceback.
"""

from __future__ import annotations

from core.errors import CastbookError


class TrainingError(CastbookError):
    """Bad input found before (or while) training; `problems` lists every one."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("cannot train:\n" + "\n".join(f"  - {p}" for p in self.problems))


class PrepareError(CastbookError):
    """`castbook dataset prepare` cannot run with these inputs."""
