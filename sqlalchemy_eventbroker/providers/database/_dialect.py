"""What differs between PostgreSQL and other databases, chosen once per provider.

:func:`dialect_for` returns one strategy object; the rest of the package calls its methods
and never asks which database it is on. :class:`PostgresDialect` writes with one JSON
document parameter, reads gap-free by ``(tx_id, seq)`` below the snapshot's ``xmin``, and
has LISTEN/NOTIFY; :class:`SqliteDialect` and the generic :class:`Dialect` use portable
Core statements, ``seq`` alone as the cursor, and polling.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from ... import _json
from ...errors import EventValidationError, ProviderError
from ...event import Event, EventStatus
from ...pattern import validate_pattern
from ..base import StatusUpdate
from ._codec import ORIGIN, READ_COLUMNS, core_rows, json_document, row_event
from ._group_sql import GenericGroupSql, GroupSql, PostgresGroupSql
from ._reader import Cursor, Page, Row, Start
from ._schema import EVENT_COLUMNS, EventTables

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

__all__ = ["Dialect", "PostgresDialect", "SqliteDialect", "dialect_for"]

#: Type names for ``jsonb_to_recordset``'s column definition list.
_PG_RECORD_TYPES = {
    "id": "uuid", "source": "text", "type": "text", "status": "text", "retry_count": "integer",
    "error": "text", "payload": "jsonb", "user_id": "bigint", "session_id": "text",
    "instance_id": "text", "schema": "text", "entity": "text", "operation": "text",
    "created_at": "timestamptz", "processed_at": "timestamptz", "completed_at": "timestamptz",
    "metadata": "jsonb", "origin": "text", "key": "text",
}  # fmt: skip

#: The savepoint around an outbox write on PostgreSQL (see PostgresDialect.write_isolated).
_OUTBOX_SAVEPOINT = "eventbroker_outbox"

_FINALS = (str(EventStatus.COMPLETED), str(EventStatus.FAILED))
_PROCESSING = str(EventStatus.PROCESSING)


def dialect_for(engine: Engine, tables: EventTables) -> Dialect:
    """The strategy for ``engine``'s database."""
    name = engine.dialect.name
    if name == "postgresql":
        return PostgresDialect(engine, tables)
    if name == "sqlite":
        return SqliteDialect(engine, tables)
    return Dialect(engine, tables)


def _like_escape(text: str) -> str:
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


def _glob_escape(text: str) -> str:
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in text)


class Dialect:
    """Any SQLAlchemy database: portable statements, ``seq`` as the cursor, polling."""

    #: LISTEN/NOTIFY exists: wake-ups cross processes (else readers poll).
    has_notify: ClassVar[bool] = False
    #: A single statement runs in autocommit (no BEGIN/COMMIT round trips).
    autocommit_single: ClassVar[bool] = False
    #: Rows carry the writing transaction's id (``tx_id``), the first half of the cursor.
    uses_tx_id: ClassVar[bool] = False

    def __init__(self, engine: Engine, tables: EventTables) -> None:
        self.name = engine.dialect.name
        self.tables = tables
        self.t = tables.events
        self.prep = engine.dialect.identifier_preparer
        self.event_cols = [self.t.c[n] for n in EVENT_COLUMNS]
        self.read_cols = [self.t.c[n] for n in READ_COLUMNS]
        self.group_sql: GroupSql = self._group_sql()
        self._status_many = self._build_status_many()

    def _group_sql(self) -> GroupSql:
        return GenericGroupSql(self.tables)

    # -- ids --

    def check_ids(self, events: Sequence[Event]) -> None:
        """Refuse ids the table cannot hold (only PostgreSQL's ``uuid`` column is strict)."""

    def lookup_id(self, event_id: str) -> str | None:
        """``event_id`` if it can exist in the table, else ``None``."""
        if not isinstance(event_id, str) or not event_id:
            return None
        return event_id

    # -- writes --

    def encode(self, events: Sequence[Event], origin: str) -> Any:
        """The parameters of the one insert statement for ``events`` (Python-side work, done
        before any SQL, so a bad payload fails before the transaction is touched)."""
        return core_rows(events, origin)

    def insert(self, conn: Connection, params: Any) -> None:
        """ONE insert statement for encoded events."""
        conn.execute(self.t.insert(), params)

    def write_isolated(self, conn: Connection, params: Any) -> None:
        """:meth:`insert` inside the caller's transaction, undoing only itself on failure."""
        if _autocommit(conn):
            self.insert(conn, params)  # its own transaction already
            return
        with conn.begin_nested():
            self.insert(conn, params)

    # -- status --

    def _build_status_many(self) -> Any:
        t = self.t
        status = sa.bindparam("b_status", type_=sa.String())
        when = sa.bindparam("b_now", type_=t.c.processed_at.type)
        final = sa.or_(status == _FINALS[0], status == _FINALS[1])  # no IN: executemany
        return (
            t.update()
            .where(t.c.id == sa.bindparam("b_id", type_=t.c.id.type))
            .values(
                status=status,
                error=sa.bindparam("b_error", type_=sa.Text()),
                retry_count=sa.func.coalesce(sa.bindparam("b_retry", type_=sa.Integer()), t.c.retry_count),
                processed_at=sa.case(
                    (status == _PROCESSING, when),
                    (final, sa.func.coalesce(t.c.processed_at, when)),
                    else_=t.c.processed_at,
                ),
                completed_at=sa.case((final, when), else_=t.c.completed_at),
            )
        )

    def update_status_many(self, conn: Connection, latest: dict[str, StatusUpdate],
                           now: dt.datetime) -> None:
        """ONE statement applying ``latest`` (id -> update); see ``update_status_many``."""
        conn.execute(self._status_many, [
            {"b_id": key, "b_status": str(EventStatus(u.status)), "b_error": u.error or "",
             "b_retry": u.retry_count, "b_now": now}
            for key, u in latest.items()
        ])

    # -- reading --

    def start_point(self, conn: Connection) -> Start:
        """Now, as a starting point: what is visible now is "before" (see :class:`Start`)."""
        top = conn.execute(sa.select(sa.func.coalesce(sa.func.max(self.t.c.seq), 0))).scalar_one()
        return Start(0, 0, frozenset(), int(top))

    def read_page(self, conn: Connection, cursor: Cursor, limit: int) -> Page:
        """Rows past ``cursor`` that can never again be preceded by a later commit."""
        t = self.t
        stmt = (
            sa.select(*self.read_cols, sa.literal(0), t.c.seq, sa.true())
            .where(t.c.seq > cursor[1]).order_by(t.c.seq).limit(limit)
        )
        return page_of(conn.execute(stmt).all(), cursor, limit)

    def read_page_raw(self, raw: Any, cursor: Cursor, limit: int) -> Page:
        """:meth:`read_page` on the LISTEN connection (only where :attr:`has_notify`)."""
        raise NotImplementedError

    def claimable(self, cursor: Cursor, limit: int) -> sa.Select[Any]:
        """``(seq, id, type, key, tx, ready)`` of the rows past a group's cursor (see
        read_page)."""
        t = self.t
        return (
            sa.select(t.c.seq, t.c.id, t.c.type, t.c.key, sa.literal(0), sa.true())
            .where(t.c.seq > cursor[1]).order_by(t.c.seq).limit(limit)
        )

    def type_clause(self, pattern: str) -> tuple[sa.ColumnElement[bool] | None, bool]:
        """SQL for a subscription pattern on ``type``, and whether it is exact (else the caller
        filters the rows with the pattern too)."""
        segments = validate_pattern(pattern)
        if pattern == "*":
            return None, True
        if "*" not in pattern:
            return self.t.c.type == pattern, True
        return self._wildcard_clause(segments)

    def _wildcard_clause(self, segments: Sequence[str]) -> tuple[sa.ColumnElement[bool] | None,
                                                                  bool]:
        """:meth:`type_clause` for a pattern with ``*``/``**``: here only the literal prefix
        (the caller filters the rows with the pattern too); dialects match exactly."""
        conds = self._prefix(segments)
        return (sa.and_(*conds) if conds else None), False

    def _prefix(self, segments: Sequence[str]) -> list[sa.ColumnElement[bool]]:
        literal: list[str] = []
        for seg in segments:
            if "*" in seg:
                break
            literal.append(seg)
        if not literal:
            return []
        return [self.t.c.type.like(_like_escape(".".join(literal) + ".") + "%", escape="/")]

    # -- groups --

    def insert_group(self, conn: Connection, values: dict[str, Any]) -> None:
        """Insert a group row; a concurrent insert of the same group may win (then nothing)."""
        try:
            with conn.begin_nested():
                conn.execute(self.tables.groups.insert().values(**values))
        except sa_exc.IntegrityError:
            pass

    def lock_group(self, conn: Connection, group_id: int) -> None:
        """Serialise fillers of one group (a write first; PostgreSQL needs none)."""
        g = self.tables.groups
        conn.execute(g.update().where(g.c.id == group_id).values(cursor_seq=g.c.cursor_seq))


class SqliteDialect(Dialect):
    """SQLite: ``GLOB`` patterns, and a real transaction before an outbox savepoint."""

    def write_isolated(self, conn: Connection, params: Any) -> None:
        driver: Any = conn.connection.driver_connection
        if _autocommit(conn) or getattr(driver, "isolation_level", "") is None:
            self.insert(conn, params)
            return
        if not conn.in_transaction():
            conn.begin()
        if not getattr(driver, "in_transaction", True):
            # pysqlite opens its transaction only before DML: a SAVEPOINT issued first would
            # open one itself and its RELEASE would COMMIT, out of the caller's control.
            conn.exec_driver_sql("BEGIN")
        with conn.begin_nested():
            self.insert(conn, params)

    def _wildcard_clause(self, segments: Sequence[str]) -> tuple[sa.ColumnElement[bool] | None,
                                                                  bool]:
        col = self.t.c.type
        conds = self._prefix(segments)
        glob = ".".join("*" if "*" in s else _glob_escape(s) for s in segments)
        conds.append(col.op("GLOB")(glob))
        if segments[-1] != "**":
            dots = sa.func.length(col) - sa.func.length(sa.func.replace(col, ".", ""))
            conds.append(dots == len(segments) - 1)
            return sa.and_(*conds), True
        # '*.x.**': a GLOB '*' could swallow dots before the literal segment.
        return sa.and_(*conds), "*" not in segments[:-1]

    def insert_group(self, conn: Connection, values: dict[str, Any]) -> None:
        conn.execute(sqlite_dialect.insert(self.tables.groups).values(**values).on_conflict_do_nothing())


class PostgresDialect(Dialect):
    """PostgreSQL: JSON-document writes, the ``(tx_id, seq)`` cursor, LISTEN/NOTIFY."""

    has_notify = True
    autocommit_single = True
    uses_tx_id = True

    def __init__(self, engine: Engine, tables: EventTables) -> None:
        super().__init__(engine, tables)
        q = self.prep.quote
        table = self.prep.format_table(self.t)
        names = ", ".join(q(c) for c in READ_COLUMNS)
        defs = ", ".join(f"{q(c)} {_PG_RECORD_TYPES[c]}" for c in READ_COLUMNS)
        # No NOTIFY in here: a transaction that notified serialises its commit behind every
        # other notifying commit. The wake-up is announced after commit (see _listener.py).
        self._insert = sa.text(
            f"INSERT INTO {table} ({names}) SELECT {names} "
            f"FROM jsonb_to_recordset(CAST(:doc AS jsonb)) AS r({defs})"
        )
        cols = ", ".join(q(c) for c in READ_COLUMNS)
        self._page_sql = (
            f"SELECT {cols}, tx_id, seq, tx_id < CAST(CAST(pg_snapshot_xmin("
            f"pg_current_snapshot()) AS text) AS bigint) FROM {table} "
            f"WHERE (tx_id, seq) > (%s::bigint, %s::bigint) ORDER BY tx_id, seq LIMIT %s"
        )

    def _group_sql(self) -> GroupSql:
        return PostgresGroupSql(self.tables, self.prep)

    def check_ids(self, events: Sequence[Event]) -> None:
        for e in events:
            try:
                uuid.UUID(e.id)
            except (ValueError, TypeError, AttributeError):
                raise EventValidationError(
                    f"event.id: {e.id!r} is not a UUID (the events table stores ids as uuid)",
                    field="id",
                ) from None

    def lookup_id(self, event_id: str) -> str | None:
        if not isinstance(event_id, str) or not event_id:
            return None
        try:
            uuid.UUID(event_id)
        except ValueError:
            return None
        return event_id

    def encode(self, events: Sequence[Event], origin: str) -> Any:
        return {"doc": json_document(events, origin)}

    def insert(self, conn: Connection, params: Any) -> None:
        conn.execute(self._insert, params)

    def write_isolated(self, conn: Connection, params: Any) -> None:
        """SAVEPOINT, the insert and RELEASE in ONE round trip (psycopg 3 pipeline mode); on
        failure one more round trip rolls back to the savepoint. Other drivers:
        ``begin_nested()``. An autocommit connection needs none."""
        import psycopg

        driver = conn.connection.driver_connection
        if getattr(driver, "autocommit", False) or _autocommit(conn):
            self.insert(conn, params)
            return
        if not isinstance(driver, psycopg.Connection):  # asyncpg, psycopg async, psycopg2
            with conn.begin_nested():
                self.insert(conn, params)
            return
        if not conn.in_transaction():
            conn.begin()  # as SQLAlchemy's autobegin would on the first statement
        savepoint = False
        try:
            with driver.pipeline():
                conn.exec_driver_sql(f"SAVEPOINT {_OUTBOX_SAVEPOINT}")
                savepoint = True
                self.insert(conn, params)
                conn.exec_driver_sql(f"RELEASE SAVEPOINT {_OUTBOX_SAVEPOINT}")
        except Exception as exc:
            if savepoint:
                _undo_savepoint(driver)
            if isinstance(exc, sa_exc.SQLAlchemyError | ProviderError):
                raise
            # The first line only: a driver's DETAIL/CONTEXT lines may quote row data.
            first = (str(exc).splitlines() or [""])[0]
            raise ProviderError(f"outbox write failed: {type(exc).__name__}: {first}") from exc

    def update_status_many(self, conn: Connection, latest: dict[str, StatusUpdate],
                           now: dt.datetime) -> None:
        doc = _json.dumps([
            {"id": key, "status": str(EventStatus(u.status)), "error": u.error or "",
             "retry_count": u.retry_count}
            for key, u in latest.items()
        ])
        conn.execute(self._status_many, {"doc": doc, "now": now})

    def _build_status_many(self) -> Any:
        q = self.prep.quote
        table = self.prep.format_table(self.t)
        finals = f"('{_FINALS[0]}', '{_FINALS[1]}')"
        return sa.text(
            f"UPDATE {table} AS t SET {q('status')} = u.status, {q('error')} = u.error, "
            f"{q('retry_count')} = coalesce(u.retry_count, t.{q('retry_count')}), "
            f"{q('processed_at')} = CASE WHEN u.status = '{_PROCESSING}' THEN :now "
            f"WHEN u.status IN {finals} "
            f"THEN coalesce(t.{q('processed_at')}, :now) ELSE t.{q('processed_at')} END, "
            f"{q('completed_at')} = CASE WHEN u.status IN {finals} "
            f"THEN :now ELSE t.{q('completed_at')} END "
            f"FROM jsonb_to_recordset(CAST(:doc AS jsonb)) "
            f"AS u(id uuid, status text, error text, retry_count integer) "
            f"WHERE t.{q('id')} = u.id"
        ).bindparams(sa.bindparam("now", type_=sa.DateTime(timezone=True)))

    def start_point(self, conn: Connection) -> Start:
        snap = conn.execute(sa.select(sa.cast(sa.func.pg_current_snapshot(), sa.Text))).scalar_one()
        return Start.parse(snap)

    @staticmethod
    def _xmin() -> sa.ColumnElement[int]:
        return sa.cast(
            sa.cast(sa.func.pg_snapshot_xmin(sa.func.pg_current_snapshot()), sa.Text), sa.BigInteger
        )

    def _past(self, cursor: Cursor) -> sa.ColumnElement[bool]:
        t = self.t
        return sa.tuple_(t.c.tx_id, t.c.seq) > sa.tuple_(sa.literal(cursor[0]), sa.literal(cursor[1]))

    def read_page(self, conn: Connection, cursor: Cursor, limit: int) -> Page:
        """Rows ordered by ``(tx_id, seq)``; a row counts only when its ``tx_id`` is below the
        statement's snapshot ``xmin`` (every older transaction has ended). Later visible rows
        are reported as ``held_back`` so the caller looks again soon."""
        t = self.t
        stmt = (
            sa.select(*self.read_cols, t.c.tx_id, t.c.seq, (t.c.tx_id < self._xmin()).label("ready"))
            .where(self._past(cursor)).order_by(t.c.tx_id, t.c.seq).limit(limit)
        )
        return page_of(conn.execute(stmt).all(), cursor, limit)

    def read_page_raw(self, raw: Any, cursor: Cursor, limit: int) -> Page:
        """:meth:`read_page` on a psycopg autocommit connection: one round trip, no pool."""
        rows = raw.execute(self._page_sql, (cursor[0], cursor[1], limit), prepare=True).fetchall()
        return page_of(rows, cursor, limit)

    def claimable(self, cursor: Cursor, limit: int) -> sa.Select[Any]:
        t = self.t
        return (
            sa.select(t.c.seq, t.c.id, t.c.type, t.c.key, t.c.tx_id,
                      (t.c.tx_id < self._xmin()))
            .where(self._past(cursor)).order_by(t.c.tx_id, t.c.seq).limit(limit)
        )

    def _wildcard_clause(self, segments: Sequence[str]) -> tuple[sa.ColumnElement[bool] | None,
                                                                  bool]:
        col = self.t.c.type
        conds = self._prefix(segments)
        parts = [".*" if s == "**" else "[^.]*" if s == "*" else re.escape(s) for s in segments]
        conds.append(col.op("~")("^" + r"\.".join(parts) + "$"))
        return sa.and_(*conds), True

    def insert_group(self, conn: Connection, values: dict[str, Any]) -> None:
        conn.execute(pg_dialect.insert(self.tables.groups).values(**values).on_conflict_do_nothing())

    def lock_group(self, conn: Connection, group_id: int) -> None:
        """Nothing: PostgreSQL fillers are optimistic (the cursor moves by compare-and-set)."""


def _autocommit(conn: Connection) -> bool:
    return conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"


def page_of(rows: Sequence[Any], cursor: Cursor, limit: int) -> Page:
    """A :class:`Page` from rows selected as ``READ_COLUMNS, tx, seq, ready``."""
    out: list[Row] = []
    held = False
    n = len(READ_COLUMNS)
    for row in rows:
        if not row[n + 2]:
            held = True
            break
        cursor = (int(row[n]), int(row[n + 1]))
        out.append(Row(row_event(row), cursor[0], cursor[1], row[ORIGIN] or ""))
    return Page(out, cursor, held, len(rows) == limit and not held)


def _undo_savepoint(driver: Any) -> None:
    """After a failed pipelined write: roll back to the savepoint (if the release did not
    happen) so the caller's transaction is usable again."""
    import psycopg

    if driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    try:
        driver.execute(f"ROLLBACK TO SAVEPOINT {_OUTBOX_SAVEPOINT}")
        driver.execute(f"RELEASE SAVEPOINT {_OUTBOX_SAVEPOINT}")
    except psycopg.errors.InvalidSavepointSpecification:
        pass  # released before the failure: nothing of ours is left to undo
