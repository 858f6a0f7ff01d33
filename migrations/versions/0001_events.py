"""Create the events table and the consumer-group tables.

Revision ID: 0001_events
Revises:
Create Date: 2025-01-01

The table name is a parameter (``DatabaseProvider(table_name=...)``); the definitions are
frozen here on purpose rather than imported from the live model.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0001_events"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade(table_name: str = "events") -> None:
    t = table_name
    is_pg = op.get_bind().dialect.name == "postgresql"
    ts = sa.DateTime(timezone=True)
    if is_pg:
        id_type: sa.types.TypeEngine = pg.UUID(as_uuid=False)
        json_type: sa.types.TypeEngine = pg.JSONB(none_as_null=True)
        meta_type: sa.types.TypeEngine = pg.JSONB()
        type_type: sa.types.TypeEngine = sa.String(255, collation="C")
        seq_col = sa.Column("seq", sa.BigInteger(), sa.Identity(), primary_key=True)
        group_id_col = sa.Column("id", sa.Integer(), sa.Identity(), primary_key=True)
        extra: list[sa.schema.SchemaItem] = [
            sa.Column(
                "tx_id",
                sa.BigInteger(),
                nullable=False,
                server_default=sa.text("CAST(CAST(pg_current_xact_id() AS text) AS bigint)"),
            )
        ]
    else:
        id_type = sa.String(36)
        json_type = sa.JSON(none_as_null=True)
        meta_type = sa.JSON()
        type_type = sa.String(255)
        seq_col = sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
            autoincrement=True,
        )
        group_id_col = sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True)
        extra = []

    op.create_table(
        t,
        seq_col,
        sa.Column("id", id_type, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("type", type_type, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("payload", json_type, nullable=True),
        sa.Column("user_id", sa.BigInteger(), nullable=True),
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("instance_id", sa.String(255), nullable=False),
        sa.Column("schema", sa.String(128), nullable=False),
        sa.Column("entity", sa.String(128), nullable=False),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("processed_at", ts, nullable=True),
        sa.Column("completed_at", ts, nullable=True),
        sa.Column("metadata", meta_type, nullable=False),
        *extra,
        sa.UniqueConstraint("id", name=f"uq_{t}_id"),
        sqlite_autoincrement=True,
    )
    op.create_index(f"ix_{t}_type", t, ["type"])
    op.create_index(f"ix_{t}_status", t, ["status"])
    op.create_index(f"ix_{t}_created_at", t, ["created_at"])
    op.create_index(f"ix_{t}_schema_entity", t, ["schema", "entity"])
    if is_pg:
        op.create_index(f"ix_{t}_tx_id_seq", t, ["tx_id", "seq"])

    op.create_table(
        f"{t}_groups",
        group_id_col,
        sa.Column("group_name", sa.String(255), nullable=False),
        sa.Column("pattern", sa.String(255), nullable=False),
        sa.Column("cursor_tx", sa.BigInteger(), nullable=False),
        sa.Column("cursor_seq", sa.BigInteger(), nullable=False),
        sa.Column("start_snapshot", sa.Text(), nullable=True),
        sa.Column("created_at", ts, nullable=False),
        sa.UniqueConstraint("group_name", "pattern", name=f"uq_{t}_groups_name_pattern"),
    )
    op.create_table(
        f"{t}_claims",
        sa.Column(
            "group_id",
            sa.Integer(),
            sa.ForeignKey(f"{t}_groups.id", ondelete="CASCADE", name=f"fk_{t}_claims_group"),
            primary_key=True,
        ),
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("event_id", id_type, nullable=False),
        sa.Column("lease_until", sa.Double(), nullable=False),
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
    )


def downgrade(table_name: str = "events") -> None:
    t = table_name
    op.drop_table(f"{t}_claims")
    op.drop_table(f"{t}_groups")
    op.drop_table(t)
