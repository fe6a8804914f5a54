"""Every way a command can end other than success, and its exit status. `cli.main` maps them, once.

| exception      | exit | meaning                                                                  |
|----------------|------|--------------------------------------------------------------------------|
| UserError      | 2    | bad input or environment: one line per problem, nothing half-written     |
| ExportFailed   | 2    | an export proof failed; no export/ folder was written                    |
| RunFailed      | 1    | a child run (compare, sweep, twin, bench) failed; its output says why    |
| Diverged       | 3    | a non-finite loss or gradient norm; the last good checkpoint is kept     |
| Interrupted    | 130 / 143 | SIGINT / SIGTERM: the run saved a checkpoint and can be resumed     |

Anything else is a bug in twin-dpo and keeps its traceback (exit 1).
"""

from __future__ import annotations

import signal
from pathlib import Path

EXIT_CHILD_FAILED = 1  # a bug keeps its traceback and Python's own exit status 1
EXIT_USER = 2
EXIT_DIVERGED = 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class UserError(Exception):
    """Bad input: a recipe field, a dataset row, a missing path, a full disk. One line per problem."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ExportFailed(UserError):
    """A proof failed: the export is refused and no export/ folder is written."""


class RunFailed(Exception):
    """A child run (compare, sweep, twin, bench) exited non-zero; its own output says why."""


class Diverged(Exception):
    """Training produced a non-finite loss or gradient norm; the message says where and what to try."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped a run after it saved a checkpoint (or before the first one)."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        return EXIT_SIGNAL[self.signum]
