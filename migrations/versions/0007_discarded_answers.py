"""answers paid for and not kept count in a batch's tokens and cost

A run with `--retry-invalid-json` sends a request again when its answer does not match the
request's json_schema: the answer was complete and billed, but only the last answer of a job
was kept, so `status` and a resumed run's `--max-cost` counted a fraction of what was spent.
Each such answer's usage now gets a row here, written with the attempts log.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 07:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "discarded_answers",
        sa.Column(
            "job_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("reasoning_tokens", sa.Integer(), nullable=False),
        sa.Column("total_tokens", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "started_at", name=op.f("pk_discarded_answers")),
    )
    op.create_index("ix_discarded_answers_batch_id", "discarded_answers", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_discarded_answers_batch_id", table_name="discarded_answers")
    op.drop_table("discarded_answers")
