"""Errors that are the user's to fix.

A `UserError` reaches the CLI, which prints its lines on stderr and exits with
status 2 (`EXIT_USER`). Anything else is a bug in twin-dpo and keeps its
traceback.
"""

from __future__ import annotations

EXIT_USER = 2


class UserError(Exception):
    """Bad input: a recipe field, a dataset row, a missing path. One line per problem."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class RunFailed(Exception):
    """A child run (compare, sweep, bench) exited non-zero; its own output says why. Exit status 1."""
