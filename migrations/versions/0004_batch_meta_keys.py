"""batches keep the keys of their jobs' metadata

A CSV export needs every metadata key of the batch before its first row (the header names a
column per key). Without them kept, it read every job's metadata first: a second per million
jobs before the first byte, beside the export's own work. Submit knows the keys as it parses
the lines and now writes them with the batch.

Batches loaded before keep NULL: the export reads their keys from the jobs, as it did.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 11:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: no table rewrite on either backend.
    op.add_column("batches", sa.Column("meta_keys", sa.Text(), nullable=True))


def downgrade() -> None:
    # In place, on SQLite too (3.35 and later): a batch-mode rebuild would drop the old
    # batches table, and with foreign keys on that deletes its children (invalid_lines).
    op.drop_column("batches", "meta_keys")
