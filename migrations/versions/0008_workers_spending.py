"""workers report what they spent of a --max-cost cap

A run's `--max-cost` counted the batch's cost when it started and its own spending after:
two runs sharing a batch (on two machines) each spent up to the cap, together twice it. Each
worker now writes what it has spent since it started (answers settled) and what it holds
reserved for requests in flight, and every other worker of the batch counts it.

Workers of runs from before keep NULL: they spend as they did, unseen.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 14:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns without a default: no table rewrite on either backend (as 0006's).
    op.add_column("workers", sa.Column("spent_usd", sa.Float(), nullable=True))
    op.add_column("workers", sa.Column("reserved_usd", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("workers", "reserved_usd")
    op.drop_column("workers", "spent_usd")
