"""an attempt is logged once: attempts are unique by job and start time

A run that dies with its last record still queued at the PostgreSQL server leaves that
statement to run after it. The next run records the dead run's answers from its journal, with
the attempts that led to them; the dead run's statement, fenced for its results by then,
still logged its attempts, so they could be logged twice. An attempt is one job's request
sent at one moment: a unique index on (job_id, started_at), which every insert of an attempt
now skips on conflict, keeps each in the log once, whichever statement comes first. It
replaces ix_attempts_job (job_id), whose lookups it serves too; duplicates already logged are
deleted first (the lowest id of each is kept).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 17:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Through ix_attempts_job, still there: one lookup per attempt on both backends.
    op.execute(
        "DELETE FROM attempts WHERE EXISTS (SELECT 1 FROM attempts AS first"
        " WHERE first.job_id = attempts.job_id AND first.started_at = attempts.started_at"
        " AND first.id < attempts.id)"
    )
    op.create_index("uq_attempts_job_started", "attempts", ["job_id", "started_at"], unique=True)
    op.drop_index("ix_attempts_job", table_name="attempts")


def downgrade() -> None:
    op.create_index("ix_attempts_job", "attempts", ["job_id"], unique=False)
    op.drop_index("uq_attempts_job_started", table_name="attempts")
