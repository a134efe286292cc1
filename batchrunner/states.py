"""The states a job goes through, and the widths of text columns, apart from the mapped
tables (models.py).

The dispatcher and the store need only these; importing models.py would build the ORM mapping
of every table on every run (~30 ms of start-up) for the few statements that use it.
"""

from __future__ import annotations

import enum


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
