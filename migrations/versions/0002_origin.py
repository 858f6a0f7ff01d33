"""Add ``origin`` to the events table: which broker wrote the row.

Revision ID: 0002_origin
Revises: 0001_events
Create Date: 2026-11-29

A broker writes its events with its own origin and opens its fan-out stream excluding that
origin, so it never receives its own events back. The column is nullable: rows written before
this migration (and rows written without an origin) have NULL there and reach every stream,
so existing rows stay readable. The downgrade drops the column (the rows stay, untagged).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_origin"
down_revision: str | Sequence[str] | None = "0001_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade(table_name: str = "events") -> None:
    op.add_column(table_name, sa.Column("origin", sa.String(64), nullable=True))


def downgrade(table_name: str = "events") -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # SQLite (3.35+) drops a column in place; Alembic's batch mode would copy the table
        # and lose its AUTOINCREMENT (seq values must never be reused).
        table = bind.dialect.identifier_preparer.quote(table_name)
        op.execute(f"ALTER TABLE {table} DROP COLUMN origin")
    else:
        op.drop_column(table_name, "origin")
