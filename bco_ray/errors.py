"""Mistakes a user can fix, said in one line: what is wrong, then what to do.

The CLI prints a UserError as `bco-ray: error: <problem>; <fix>` and exits with its code,
without a traceback (the trace goes to the run's log file, and to the console under
--verbose). Anything else is a bug or an outage and is reported as such.
"""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 300) -> str:
    """An error's first line, for one-line reports (the rest goes to the log)."""
    return (str(e).strip().splitlines() or [""])[0][:limit]


class UserError(Exception):
    def __init__(self, problem: str, fix: str, exit_code: int = 2):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix, self.exit_code = problem, fix, exit_code
