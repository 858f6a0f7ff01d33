"""Add ``key`` to the group claims table, for ordered consumer groups.

Revision ID: 0005_claim_key
Revises: 0004_inbox
Create Date: 2026-11-29

A member of an ordered group (``subscribe(..., group=..., ordered=True)``) takes a claim only
when no older claim of the same key is left in its group (acknowledged claims are deleted),
so no two members hold one key and a key's events go oldest first. The index
``(group_id, key, seq)`` answers that question without a scan. Claims written before this
migration read back with an empty key (not ordered). The downgrade drops both.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_claim_key"
down_revision: str | Sequence[str] | None = "0004_inbox"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade(table_name: str = "events") -> None:
    claims = f"{table_name}_claims"
    op.add_column(
        claims, sa.Column("key", sa.Text(), nullable=False, server_default=sa.text("''"))
    )
    op.create_index(f"ix_{table_name}_claims_key", claims, ["group_id", "key", "seq"])


def downgrade(table_name: str = "events") -> None:
    claims = f"{table_name}_claims"
    op.drop_index(f"ix_{table_name}_claims_key", table_name=claims)
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # As in 0003: drop in place, never a batch copy of the table.
        q = bind.dialect.identifier_preparer.quote
        op.execute(f"ALTER TABLE {q(claims)} DROP COLUMN {q('key')}")
    else:
        op.drop_column(claims, "key")
