"""What the job tables hold, apart from the mapped tables (models.py): the states a job goes
through, the widths of text columns, and text as both databases can keep it.

The dispatcher and the store need only these; importing models.py would build the ORM mapping
of every table on every run (~30 ms of start-up) for the few statements that use it.
"""

from __future__ import annotations

import enum
import re
from typing import overload


class JobState(enum.StrEnum):
    #: Waiting to be sent (new, retried, or released by a stopped run).
    PENDING = "pending"
    #: Claimed by a worker that holds its lease; in flight or about to be.
    RUNNING = "running"
    #: Answered with a valid completion, stored in `results`.
    SUCCEEDED = "succeeded"
    #: Ended without a completion: an answer that cannot succeed, or attempts used up.
    FAILED = "failed"
    #: Stopped for good by `batchrunner cancel`.
    CANCELLED = "cancelled"


UNFINISHED_STATES = (JobState.PENDING, JobState.RUNNING)
ENDED_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# The widths of the text columns that hold names from a request file or an answer (models.py).
# PostgreSQL refuses a longer value, and one such row would fail a whole load, or every record
# of a run: a line with a longer name is refused with its number (lines.py), a longer name in
# an answer is cut to fit (store.py), a longer batch name is refused or, made from a file name,
# cut (ingest.py).
CUSTOM_ID_CHARS = 512
MODEL_CHARS = 200
REQUEST_ID_CHARS = 200
BATCH_NAME_CHARS = 200
KEY_ENV_CHARS = 200


@overload
def kept_text(value: str) -> str: ...
@overload
def kept_text(value: None) -> None: ...
def kept_text(value: str | None) -> str | None:
    """Text from outside (a status line, a header, an exception, a file name) as it can be kept:
    Python keeps bytes that are not UTF-8 as lone surrogates (aiohttp for a proxy writing
    Latin-1, the file system for a name in another encoding), which neither JSON nor either
    database can hold; they become U+FFFD, as in an answer's body."""
    if value is None or value.isascii():
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        raw = value.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


#: Control characters but tab and newline: C0, DEL and C1 (ESC begins a terminal's sequences,
#: CR goes back over a line).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """Text as it may go to a terminal: the control characters in it written out (`\\x1b`).
    A server's model name or error message, or a file's name, holding escape sequences could
    otherwise rewrite what the terminal shows (a line made to say all is well, a link)."""
    if _CONTROLS.search(text) is None:
        return text
    return _CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def cancelled_for_good(batch_id: str) -> str:
    """What a command that would send a cancelled batch's jobs says, and what to do instead."""
    return (
        f"batch {batch_id} was cancelled, and cancel is for good: `batchrunner export"
        f" {batch_id} --as-requests -o FILE` writes the requests that did not succeed, to"
        " submit as a new batch"
    )
