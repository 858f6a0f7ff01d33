"""The database provider's tables, and the Alembic migrations that create them.

Three tables per events table name ``<t>`` (default ``events``):

``<t>``
    One row per event: every :class:`~sqlalchemy_eventbroker.Event` field, plus ``seq`` (a
    monotonically increasing ``bigint`` identity, the primary key), ``origin`` (which broker
    wrote the row, so that its own fan-out stream can skip it; NULL when untagged) and, on
    PostgreSQL only, ``tx_id`` (the inserting transaction's 64-bit id, see the package
    docstring for why).
``<t>_groups``
    One row per consumer group ``(group_name, pattern)``: how far into ``<t>`` the group has
    read (its cursor).
``<t>_claims``
    One row per event a group still has to handle: free (``lease_until = 0``), or leased to a
    member until ``lease_until`` (seconds since the epoch). An acknowledged event's row is
    deleted.

The table definitions are built per dialect (PostgreSQL gets ``uuid``, ``jsonb``,
``timestamptz``, a ``"C"``-collated ``type`` so that ``LIKE 'prefix%'`` can use its index, and
``tx_id``); every other database gets portable types. The migrations in ``migrations/`` spell
the same tables out again (a migration is frozen history and never imports the live model);
``tests/migrations`` check that the two agree.

Migrations keep their own version table (``eventbroker_alembic_version``), never the
application's ``alembic_version``, so they coexist with the application's own Alembic setup::

    python -m sqlalchemy_eventbroker.migrate upgrade --url postgresql+psycopg://127.0.0.1/app

or, from Python, :func:`upgrade` (``sqlalchemy_eventbroker.providers.database.upgrade``).
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from ...errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection, Engine

__all__ = [
    "HEAD_REVISION",
    "EventTables",
    "IDENTIFIER_BYTES",
    "build_tables",
    "check_channel",
    "check_table_name",
    "derived_identifiers",
    "downgrade",
    "migrations_path",
    "stamp_head",
    "upgrade",
    "version_table_name",
]

#: The newest migration in ``migrations/versions``; ``create_schema()`` stamps it.
HEAD_REVISION = "0005_claim_key"

#: The columns that hold an ``Event``'s fields, in ``Event`` field order.
EVENT_COLUMNS = (
    "id", "source", "type", "status", "retry_count", "error", "payload", "user_id",
    "session_id", "instance_id", "schema", "entity", "operation", "created_at",
    "processed_at", "completed_at", "metadata", "key",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class EventTables:
    """The three tables of one events table name, on one ``MetaData``."""

    metadata: sa.MetaData
    events: sa.Table
    groups: sa.Table
    claims: sa.Table


#: PostgreSQL's longest identifier, in bytes (``NAMEDATALEN - 1``); a longer one is cut short
#: silently, so two names could collide, or a channel would not match its listener.
IDENTIFIER_BYTES = 63

_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def derived_identifiers(table_name: str) -> list[str]:
    """Every identifier created for ``table_name``: tables, the version table, constraints and
    indexes. Each must fit :data:`IDENTIFIER_BYTES`."""
    t = table_name
    return [
        t, f"{t}_groups", f"{t}_claims", version_table_name(t),
        f"uq_{t}_id", f"ix_{t}_type", f"ix_{t}_status", f"ix_{t}_created_at",
        f"ix_{t}_schema_entity", f"ix_{t}_tx_id_seq", f"uq_{t}_groups_name_pattern",
        f"fk_{t}_claims_group",
    ]


def check_table_name(table_name: object) -> str:
    """``table_name`` if it can name an events table on every database; the one check that the
    provider, ``upgrade``/``downgrade`` and the command line share.

    A plain name (ASCII letters, digits, ``_``, not starting with a digit) whose every derived
    identifier (:func:`derived_identifiers`; the longest is the version table,
    ``eventbroker_alembic_version_<name>``) fits PostgreSQL's 63 bytes: at most 35 characters.

    Raises:
        ConfigError: (a ``ValueError``) naming ``table_name`` and the limit.
    """
    if not isinstance(table_name, str) or not _PLAIN_NAME.fullmatch(table_name):
        shown = repr(table_name)[:80]
        raise ConfigError(
            f"table_name: {shown} is not a plain name (ASCII letters, digits and _, not "
            f"starting with a digit)", path="table_name")
    for name in derived_identifiers(table_name):
        if len(name.encode()) > IDENTIFIER_BYTES:
            longest = IDENTIFIER_BYTES - (len(version_table_name("x")) - 1)
            raise ConfigError(
                f"table_name: {table_name!r} is too long: the derived identifier {name!r} has "
                f"{len(name.encode())} bytes, over PostgreSQL's limit of {IDENTIFIER_BYTES} "
                f"bytes; use at most {longest} characters", path="table_name")
    return table_name


def check_channel(channel: object) -> str:
    """``channel`` if it can be a PostgreSQL NOTIFY channel: 1 to 63 bytes in UTF-8, no NUL.

    Raises:
        ConfigError: (a ``ValueError``) naming ``channel`` and the limit.
    """
    if not isinstance(channel, str) or not channel or "\x00" in channel:
        raise ConfigError(
            f"channel: {repr(channel)[:80]} must be a non-empty string without U+0000",
            path="channel")
    size = len(channel.encode("utf-8", "surrogatepass"))
    if size > IDENTIFIER_BYTES:
        raise ConfigError(
            f"channel: {channel[:20]!r}... has {size} bytes in UTF-8, over PostgreSQL's limit "
            f"of {IDENTIFIER_BYTES} bytes", path="channel")
    return channel


def version_table_name(table_name: str = "events") -> str:
    """Alembic's version table for an events table: ours, never the app's ``alembic_version``.

    The default table keeps the plain name ``eventbroker_alembic_version``; another table name
    gets its own version table so that two event tables in one database migrate independently.
    """
    if table_name == "events":
        return "eventbroker_alembic_version"
    return f"eventbroker_alembic_version_{table_name}"


def build_tables(
    table_name: str = "events", dialect_name: str = "postgresql", metadata: sa.MetaData | None = None
) -> EventTables:
    """Build the Core tables for ``table_name`` with the types that suit ``dialect_name``."""
    md = metadata if metadata is not None else sa.MetaData()
    is_pg = dialect_name == "postgresql"
    t = table_name
    ts = sa.DateTime(timezone=True)
    if is_pg:
        id_type: sa.types.TypeEngine[str] = pg.UUID(as_uuid=False)
        json_type: sa.types.TypeEngine[object] = pg.JSONB(none_as_null=True)
        meta_type: sa.types.TypeEngine[object] = pg.JSONB()
        type_type: sa.types.TypeEngine[str] = sa.String(255, collation="C")
        seq_args: list[object] = [sa.BigInteger(), sa.Identity()]
        group_id_args: list[object] = [sa.Integer(), sa.Identity()]
    else:
        id_type = sa.String(36)
        json_type = sa.JSON(none_as_null=True)
        meta_type = sa.JSON()
        type_type = sa.String(255)
        # INTEGER PRIMARY KEY AUTOINCREMENT on SQLite: never reuses a value, even after the
        # newest rows were deleted, which a reader that resumes from "seq > last" relies on.
        seq_args = [sa.BigInteger().with_variant(sa.Integer(), "sqlite")]
        group_id_args = [sa.Integer()]

    columns: list[sa.schema.SchemaItem] = [
        sa.Column("seq", *seq_args, primary_key=True, autoincrement=True),  # type: ignore[arg-type]
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
        # Added by migration 0002 (hence last): the writing broker's origin, or NULL.
        sa.Column("origin", sa.String(64), nullable=True),
        # Added by migration 0003: the event's ordering key (the row identity for captured
        # events), "" for rows written before it.
        sa.Column("key", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.UniqueConstraint("id", name=f"uq_{t}_id"),
        sa.Index(f"ix_{t}_type", "type"),
        sa.Index(f"ix_{t}_status", "status"),
        sa.Index(f"ix_{t}_created_at", "created_at"),
        sa.Index(f"ix_{t}_schema_entity", "schema", "entity"),
    ]
    if is_pg:
        columns += [
            sa.Column(
                "tx_id",
                sa.BigInteger(),
                nullable=False,
                server_default=sa.text("CAST(CAST(pg_current_xact_id() AS text) AS bigint)"),
            ),
            sa.Index(f"ix_{t}_tx_id_seq", "tx_id", "seq"),
        ]
    events = sa.Table(t, md, *columns, sqlite_autoincrement=True)

    groups = sa.Table(
        f"{t}_groups",
        md,
        sa.Column("id", *group_id_args, primary_key=True, autoincrement=True),  # type: ignore[arg-type]
        sa.Column("group_name", sa.String(255), nullable=False),
        sa.Column("pattern", sa.String(255), nullable=False),
        sa.Column("cursor_tx", sa.BigInteger(), nullable=False),
        sa.Column("cursor_seq", sa.BigInteger(), nullable=False),
        # PostgreSQL: the snapshot taken when the group was created (rows visible in it are
        # "before" the group); see _reader.Start.
        sa.Column("start_snapshot", sa.Text(), nullable=True),
        sa.Column("created_at", ts, nullable=False),
        sa.UniqueConstraint("group_name", "pattern", name=f"uq_{t}_groups_name_pattern"),
    )
    claims = sa.Table(
        f"{t}_claims",
        md,
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
        # The event's ordering key: an ordered group's member skips a claim while an older
        # claim of its key is left (see _group_sql). Empty: not ordered.
        sa.Column("key", sa.Text(), nullable=False, server_default=sa.text("''")),
        # No index on lease_until: members scan the primary key (group_id, seq) in order and
        # stop at the first free claim, and lease updates stay HOT (no index entry changes).
        sa.Index(f"ix_{t}_claims_key", "group_id", "key", "seq"),
    )
    return EventTables(md, events, groups, claims)


def stamp_head(connection: Connection, table_name: str = "events") -> None:
    """Record the head revision in our version table (after ``create_all``), so that running
    the migrations later finds the schema current instead of creating it twice."""
    vt = sa.Table(
        version_table_name(table_name),
        sa.MetaData(),
        sa.Column("version_num", sa.String(32), primary_key=True),
    )
    vt.create(connection, checkfirst=True)
    if connection.execute(sa.select(sa.func.count()).select_from(vt)).scalar_one() == 0:
        connection.execute(vt.insert().values(version_num=HEAD_REVISION))


# -- migrations ---------------------------------------------------------------------------


def migrations_path() -> Path:
    """Where the Alembic scripts are: inside the installed package (the wheel ships them as
    ``sqlalchemy_eventbroker/migrations``), else ``migrations/`` of the source checkout."""
    packaged = Path(str(importlib.resources.files("sqlalchemy_eventbroker"))) / "migrations"
    if (packaged / "env.py").is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[3] / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    raise FileNotFoundError(
        f"sqlalchemy_eventbroker: Alembic migrations not found in {packaged} or {checkout}"
    )


def alembic_config(
    url_or_engine: str | sa.URL | Engine | Connection, table_name: str = "events"
) -> Config:
    """An Alembic ``Config`` for our migrations, aimed at one database.

    Pass a URL, an ``Engine`` or a ``Connection`` (the latter runs in its transaction).
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_path()))
    cfg.attributes["table_name"] = table_name
    if isinstance(url_or_engine, sa.Engine | sa.Connection):
        cfg.attributes["connectable"] = url_or_engine
    else:
        url = sa.make_url(url_or_engine)
        cfg.attributes["url"] = url
    return cfg


def upgrade(
    url_or_engine: str | sa.URL | Engine | Connection,
    revision: str = "head",
    *,
    table_name: str = "events",
) -> None:
    """Apply the migrations up to ``revision`` (creates the events tables on a fresh database).

    The one-liner from a shell is ``python -m sqlalchemy_eventbroker.migrate upgrade --url URL``.

    Raises:
        ConfigError: ``table_name`` fails :func:`check_table_name`.
    """
    from alembic import command

    command.upgrade(alembic_config(url_or_engine, check_table_name(table_name)), revision)


def downgrade(
    url_or_engine: str | sa.URL | Engine | Connection,
    revision: str = "base",
    *,
    table_name: str = "events",
) -> None:
    """Revert the migrations down to ``revision``; ``base`` drops the events tables.

    Raises:
        ConfigError: ``table_name`` fails :func:`check_table_name`.
    """
    from alembic import command

    command.downgrade(alembic_config(url_or_engine, check_table_name(table_name)), revision)
