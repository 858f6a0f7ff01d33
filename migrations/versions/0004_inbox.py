"""Create the inbox table: which events each consumer has already handled.

Revision ID: 0004_inbox
Revises: 0003_key
Create Date: 2026-11-29

``sqlalchemy_eventbroker.Inbox`` records ``(consumer, event_id)`` in the handler's own
transaction; the primary key makes a second delivery of one event a no-op. The table is
``eventbroker_inbox`` next to the default events table, and ``<table_name>_inbox`` next to
an events table migrated with ``--table-name``, so that two events tables in one database
(each with its own version table) never create the same inbox twice.

Creating and dropping are conditional: ``Inbox.create_schema()`` may have created the table
before this migration runs, and ``DatabaseProvider.create_schema()`` stamps the head revision
without creating it; a downgrade from either state still works.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0004_inbox"
down_revision: str | Sequence[str] | None = "0003_key"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _inbox(table_name: str) -> str:
    return "eventbroker_inbox" if table_name == "events" else f"{table_name}_inbox"


def _exists(name: str) -> bool:
    if context.is_offline_mode():  # no database to look at: emit the plain statement
        return False
    return sa.inspect(op.get_bind()).has_table(name)


def upgrade(table_name: str = "events") -> None:
    t = _inbox(table_name)
    if _exists(t):
        return
    op.create_table(
        t,
        sa.Column("consumer", sa.String(255), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "event_id", name=f"pk_{t}"),
    )
    op.create_index(f"ix_{t}_processed_at", t, ["processed_at"])


def downgrade(table_name: str = "events") -> None:
    t = _inbox(table_name)
    if context.is_offline_mode() or _exists(t):
        op.drop_index(f"ix_{t}_processed_at", table_name=t)
        op.drop_table(t)
