"""results and attempts lose their batch_id indexes

Every request adds a row to both tables, and each index on them costs the hot path a B-tree
insert per row and a page per commit (2-3 % of a run at a zero-latency server). The queries
that used them (status's token sums, attempt errors and finish times) now reach a batch's rows
through its jobs: ix_jobs_claim, then the results' primary key and ix_attempts_job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 16:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_results_batch_id", table_name="results")
    op.drop_index("ix_attempts_batch", table_name="attempts")


def downgrade() -> None:
    op.create_index("ix_attempts_batch", "attempts", ["batch_id"], unique=False)
    op.create_index("ix_results_batch_id", "results", ["batch_id"], unique=False)
