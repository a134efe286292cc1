"""The exceptions batchrunner raises; every one derives from `BatchrunnerError`.

    BatchrunnerError
     +-- UsageError            the user asked for something that cannot be done (exit 2)
     |    +-- BatchNotFound    no batch with that id
     |    +-- InputError       a request file has bad lines
     +-- StoreError            the job database failed (exit 1)
     +-- RunAborted            a run stopped before every job ended (exit 1)
          +-- AuthError        the API rejected the key (401 / 403)
          +-- QuotaError       the account has no balance left (402 / insufficient_quota)
          +-- BudgetExceeded   the next request would pass --max-cost

The docstring of each class is its default message.
"""

from __future__ import annotations

from dataclasses import dataclass


class BatchrunnerError(Exception):
    """batchrunner failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(BatchrunnerError):
    """That cannot be done."""


class BatchNotFound(UsageError):
    """No such batch."""


@dataclass(frozen=True, slots=True)
class LineError:
    """One bad line of a request file."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class InputError(UsageError):
    """The request file has bad lines."""

    def __init__(self, errors: list[LineError], total: int, message: str | None = None) -> None:
        self.errors = errors
        self.total = total
        if message is None:
            shown = "\n".join(f"  {e}" for e in errors)
            more = f"\n  ... and {total - len(errors)} more" if total > len(errors) else ""
            message = f"{total} bad line(s); nothing was loaded:\n{shown}{more}"
        super().__init__(message)


class StoreError(BatchrunnerError):
    """The job database failed."""


class ConstraintViolation(StoreError):
    """A write broke one of the database's constraints (a unique key); the message is the
    driver's, which names it."""


class RunAborted(BatchrunnerError):
    """The run stopped before every job ended; run it again to resume."""


class AuthError(RunAborted):
    """The API rejected the key (401/403); no more requests were sent."""


class QuotaError(RunAborted):
    """The account has no balance left (402 / insufficient_quota); top it up and run again."""


class BudgetExceeded(RunAborted):
    """The next request could pass --max-cost; run again with a higher cap to go on."""
