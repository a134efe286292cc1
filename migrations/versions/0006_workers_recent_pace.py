"""workers report their recent pace

`status` took a running batch's speed and ETA from each live worker's average since it started:
a run slowed by 429s, or by a server that began to stall, showed the pace of its first minutes
for hours. Each heartbeat now also writes the worker's pace since the heartbeat before.

Workers of runs from before keep NULL: `status` takes their average, as it did.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 22:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns without a default: no table rewrite on either backend.
    op.add_column("workers", sa.Column("recent_requests_per_s", sa.Float(), nullable=True))
    op.add_column("workers", sa.Column("recent_tokens_per_s", sa.Float(), nullable=True))


def downgrade() -> None:
    # In place, on SQLite too (3.35 and later), as 0004's.
    op.drop_column("workers", "recent_tokens_per_s")
    op.drop_column("workers", "recent_requests_per_s")
