"""Add ``key`` to the events table: the event's ordering key.

Revision ID: 0003_key
Revises: 0002_origin
Create Date: 2026-11-29

Capture sets it to the row's identity (``public.users:42``); ordered subscriptions keep the
events of one key in order. The column is NOT NULL with a server default of ``""``, so rows
written before this migration read back with an empty key (not ordered), as events without a
key always were. The downgrade drops the column (the rows stay, without their keys).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_key"
down_revision: str | Sequence[str] | None = "0002_origin"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade(table_name: str = "events") -> None:
    op.add_column(
        table_name, sa.Column("key", sa.Text(), nullable=False, server_default=sa.text("''"))
    )


def downgrade(table_name: str = "events") -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # SQLite (3.35+) drops a column in place; Alembic's batch mode would copy the table
        # and lose its AUTOINCREMENT (seq values must never be reused).
        table = bind.dialect.identifier_preparer.quote(table_name)
        op.execute(f"ALTER TABLE {table} DROP COLUMN {bind.dialect.identifier_preparer.quote('key')}")
    else:
        op.drop_column(table_name, "key")
