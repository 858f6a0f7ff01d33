"""DatabaseProvider: events in a table of any SQLAlchemy database; LISTEN/NOTIFY on PostgreSQL.

Backend
    One events table (``events`` by default; schema in ``_db_schema.py``) holding every
    ``Event`` field plus ``seq``, a monotonically increasing ``bigint`` identity. Create it
    with the Alembic migrations (``python -m sqlalchemy_eventbroker.migrate upgrade --url URL``
    or :func:`upgrade`) or with :meth:`DatabaseProvider.create_schema`. URL: any SQLAlchemy
    URL, e.g. ``postgresql+psycopg://user:pw@127.0.0.1:5432/app`` or ``sqlite:///events.db``.

Delivery guarantee and ordering (fan-out, :meth:`~DatabaseProvider.stream`)
    Every committed row is delivered once to every stream open when it became visible, never
    skipped and never repeated, also across a lost listener connection or a database restart.
    Rows are read by position, not pushed: a NOTIFY only says "look again".

    *Commit order without gaps.* ``seq`` is handed out at insert time but transactions commit
    in any order, so "give me ``seq > last``" would skip the row of a slow transaction that
    commits after a faster one with a higher ``seq``. On PostgreSQL each row therefore also
    records the inserting transaction's id (``tx_id``, from ``pg_current_xact_id()``; the one
    column beyond the ``Event`` fields and ``seq``, and the reason it exists). Readers move a
    cursor ``(tx_id, seq)`` and only pass rows whose ``tx_id`` is below the current snapshot's
    ``xmin``: every transaction below ``xmin`` has ended, so no row can ever appear behind the
    cursor. Writers are never serialised. A row of a later transaction waits (is "held back")
    until every transaction that started writing before it has ended; delivery order is thus
    transaction order, which for any one writer is its commit order. The cost: a long-running
    writing transaction anywhere in the cluster delays (never loses) delivery until it ends;
    keep transactions short, and set ``idle_in_transaction_session_timeout``.
    On SQLite writers are serialised by the database, so ``seq`` order is commit order and the
    cursor is ``seq`` alone (``AUTOINCREMENT`` never reuses a value).

Wake-ups
    PostgreSQL: one ``pg_notify(channel, <table name>)`` per writing statement, folded into the
    insert statement itself; PostgreSQL delivers one per transaction (identical payloads in a
    transaction are merged), never the payload (NOTIFY is limited to 8000 bytes). Each provider
    holds one dedicated autocommit psycopg 3 connection that LISTENs; at connect it notifies
    itself and, if that self-test does not come back (a pooler in transaction mode), logs a
    warning and falls back to polling. Other databases poll every ``poll_interval`` seconds
    (writes through the same provider wake its readers at once).

Groups (:meth:`~DatabaseProvider.group_stream`)
    Durable per ``(group, pattern)`` in ``<table>_groups`` (a cursor, starting at the tail
    when the group is first opened) and ``<table>_claims`` (events the group still owes).
    A member that finds no free claim advances the group's cursor with the same gap-free read
    and inserts one claim per matching event; members take claims with
    ``FOR UPDATE SKIP LOCKED`` (PostgreSQL) or a compare-and-set update (elsewhere), leasing
    each for ``lease`` seconds. ``ack`` deletes the claim, ``renew`` extends the lease, and an
    expired lease makes the claim free again: at-least-once, each event to one member at a time.

Transactional outbox
    :meth:`~DatabaseProvider.write_in_transaction` inserts a flush's events with ONE statement
    on the caller's connection (on PostgreSQL one JSON document parameter expanded by
    ``jsonb_to_recordset``), so they commit or vanish with the caller's data.
"""

from __future__ import annotations

import builtins
import datetime as dt
import logging
import os
import re
import select
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from .. import _json
from .._threads import QuietThread
from ..errors import EventValidationError, ProviderError
from ..event import Event, EventStatus
from ..pattern import compile_pattern, validate_pattern
from ._db_schema import (
    EVENT_COLUMNS,
    EventTables,
    build_tables,
    downgrade,
    stamp_head,
    upgrade,
    version_table_name,
)
from .base import Closeable, EventFilter, ProviderBase, ProviderStats, QueueEventStream, StatusUpdate

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

__all__ = ["DatabaseProvider", "downgrade", "upgrade"]

logger = logging.getLogger(__name__)

UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)

#: psycopg/SQLite type names for ``jsonb_to_recordset``'s column definition list.
_PG_RECORD_TYPES = {
    "id": "uuid", "source": "text", "type": "text", "status": "text", "retry_count": "integer",
    "error": "text", "payload": "jsonb", "user_id": "bigint", "session_id": "text",
    "instance_id": "text", "schema": "text", "entity": "text", "operation": "text",
    "created_at": "timestamptz", "processed_at": "timestamptz", "completed_at": "timestamptz",
    "metadata": "jsonb",
}  # fmt: skip

_ASYNC_DRIVERS = {"asyncpg": "psycopg", "psycopg_async": "psycopg", "aiosqlite": "pysqlite"}

#: A reader's position: (tx_id, seq) on PostgreSQL, (0, seq) elsewhere.
Cursor = tuple[int, int]


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else _utc(value).isoformat()  # type: ignore[union-attr]


def _pg_doc_row(e: Event) -> dict[str, Any]:
    return {
        "id": e.id, "source": str(e.source), "type": e.type, "status": str(e.status),
        "retry_count": e.retry_count, "error": e.error, "payload": e.payload,
        "user_id": e.user_id, "session_id": e.session_id, "instance_id": e.instance_id,
        "schema": e.schema, "entity": e.entity, "operation": e.operation,
        "created_at": _iso(e.created_at), "processed_at": _iso(e.processed_at),
        "completed_at": _iso(e.completed_at), "metadata": e.metadata,
    }  # fmt: skip


def _core_row(e: Event) -> dict[str, Any]:
    # to_jsonable copies the payload and metadata (later changes to the event are not seen)
    # and converts what plain json.dumps could not hold.
    return {
        "id": e.id, "source": str(e.source), "type": e.type, "status": str(e.status),
        "retry_count": e.retry_count, "error": e.error,
        "payload": _json.to_jsonable(e.payload), "user_id": e.user_id,
        "session_id": e.session_id, "instance_id": e.instance_id, "schema": e.schema,
        "entity": e.entity, "operation": e.operation, "created_at": _utc(e.created_at),
        "processed_at": _utc(e.processed_at), "completed_at": _utc(e.completed_at),
        "metadata": _json.to_jsonable(e.metadata, "metadata"),
    }  # fmt: skip


def _row_event(row: Sequence[Any]) -> Event:
    """An ``Event`` from the first 17 columns of a row selected in ``EVENT_COLUMNS`` order."""
    return Event(
        str(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9],
        row[10], row[11], row[12], _utc(row[13]), _utc(row[14]), _utc(row[15]),  # type: ignore[arg-type]
        row[16] if row[16] is not None else {},
    )


#: The savepoint around an outbox write (see DatabaseProvider._isolated_insert).
_OUTBOX_SAVEPOINT = "eventbroker_outbox"

#: A pooled connection idle for longer than this is pinged before use (see _ping_when_idle).
_PING_AFTER_IDLE = 1.0


def _ping_when_idle(engine: Engine, after: float = _PING_AFTER_IDLE) -> None:
    """``pool_pre_ping``, but only for connections that sat in the pool over ``after`` s.

    A ping is a round trip, as much as the statement it protects when the provider is busy
    (a store is one autocommit statement). A connection that was in use a moment ago is
    alive with near certainty; one that slept may have been cut (server restart, idle
    timeout, ``pg_terminate_backend``) and is replaced transparently, as with pre-ping. A
    connection that dies between uses anyway fails its statement with a ProviderError and
    the engine then invalidates the pool, so the next call reconnects.
    """

    @sa.event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        record.info["eventbroker_idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("eventbroker_idle_since")
        if since is None or time.monotonic() - since <= after:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # noqa: BLE001 - any failure: this connection is gone
            raise sa_exc.DisconnectionError(str(exc)) from exc
        if not alive:
            raise sa_exc.DisconnectionError("ping failed")


def _like_escape(text: str) -> str:
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


def _glob_escape(text: str) -> str:
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in text)


class _Backoff:
    """Capped exponential delays: ``first``, ×2 each call, at most ``cap``."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap, self._next = first, cap, first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


@dataclass(frozen=True, slots=True)
class _Start:
    """Where a stream or group began: the rows already visible then come "before" it.

    PostgreSQL: the snapshot ``xmin:xmax:xip`` taken at the opening. A row (which exists, so
    its transaction committed) was visible then when its ``tx_id`` is below ``xmin``, or below
    ``xmax`` and not among the transactions then in progress. Starting the cursor at
    ``(xmin, 0)`` and skipping those rows makes the start exact even while older transactions
    run elsewhere in the cluster. SQLite: simply the highest ``seq`` at the opening.
    """

    xmin: int
    xmax: int
    xip: frozenset[int]
    seq: int

    def before(self, tx: int, seq: int) -> bool:
        if self.xmax == 0:
            return seq <= self.seq
        return tx < self.xmin or (tx < self.xmax and tx not in self.xip)

    def cursor(self) -> Cursor:
        return (self.xmin, 0) if self.xmax else (0, self.seq)

    def text(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, sorted(self.xip)))}"

    @classmethod
    def parse(cls, text: str) -> _Start:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x), 0)


@dataclass(slots=True)
class _Page:
    """One read of the events table past a cursor."""

    #: ``(event, tx_id, seq)`` in delivery order.
    events: list[tuple[Event, int, int]]
    cursor: Cursor
    #: Visible rows exist past the cursor whose transactions may still have earlier siblings.
    held_back: bool
    full: bool


class DatabaseProvider(ProviderBase):
    """Events in a database table; PostgreSQL LISTEN/NOTIFY wakes listeners, others poll.

    See the module docstring for guarantees, ordering and groups. Thread-safe.

    Args:
        engine_or_url: an ``Engine`` (not disposed by :meth:`close`) or a URL (the provider
            creates and owns its engine). Async URLs/engines are mapped to their sync driver.
        table_name: the events table; group state lives in ``<table>_groups``/``_claims``.
        channel: the PostgreSQL NOTIFY channel.
        poll_interval: seconds between reads when notifications are unavailable (non-PG, or
            the self-test failed).
        idle_interval: PostgreSQL: longest wait between reads while no notification arrives
            (a safety net for writers that do not notify); also pings the listen connection.
        page_size: rows per read.
        group_prefetch: most events a group member claims per round trip (a busy member
            ramps up to it; a slow one takes one at a time).
        selftest_timeout: how long the listener waits for its own test notification.
        connect_timeout: seconds, for engines the provider creates.

    Raises:
        ProviderError: the database is unreachable or rejects the credentials (the message says
            which and names the address, never the password).
    """

    def __init__(
        self,
        engine_or_url: str | sa.URL | Engine | Any,
        table_name: str = "events",
        channel: str = "eventbroker_events",
        *,
        poll_interval: float = 0.5,
        idle_interval: float = 5.0,
        page_size: int = 500,
        group_prefetch: int = 100,
        selftest_timeout: float = 2.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", table_name):
            raise ValueError(f"DatabaseProvider: table_name {table_name!r} is not a plain name")
        if not channel or len(channel) > 63:
            raise ValueError(f"DatabaseProvider: channel {channel!r} must be 1-63 characters")
        if poll_interval <= 0 or idle_interval <= 0 or page_size < 1 or group_prefetch < 1:
            raise ValueError(
                "DatabaseProvider: intervals must be > 0, page_size and group_prefetch >= 1"
            )
        self.table_name = table_name
        self.channel = channel
        self.poll_interval = float(poll_interval)
        self.idle_interval = float(idle_interval)
        self.page_size = int(page_size)
        self.group_prefetch = int(group_prefetch)
        self.selftest_timeout = float(selftest_timeout)
        self.engine, self._owns_engine = self._make_engine(engine_or_url, connect_timeout)
        self.url = self.engine.url
        self.dialect = self.engine.dialect.name
        self.is_postgres = self.dialect == "postgresql"
        self.tables: EventTables = build_tables(table_name, self.dialect)
        self._t = self.tables.events
        self._cols = [self._t.c[name] for name in EVENT_COLUMNS]
        # An in-memory SQLite database is one shared connection: serialise its use.
        self._serial: AbstractContextManager[Any] = (
            threading.RLock() if self._is_memory_sqlite() else nullcontext()
        )
        self._lock = threading.RLock()
        self._closed = False
        self._streams: list[QueueEventStream] = []
        self._starts: dict[QueueEventStream, _Start] = {}
        self._group_streams: weakref.WeakSet[_DbGroupStream] = weakref.WeakSet()
        self._flusher: _AckFlusher | None = None
        #: Streams holding deferred acknowledgements (kept alive until they are written).
        self._acks_pending: set[_DbGroupStream] = set()
        self._listener: _Listener | None = None
        self._wake = threading.Condition()
        self._wake_gen = 0
        self._published = 0
        self._consumed = 0
        self._stored_unpublished: dict[str, None] = {}
        self._share_cache: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._pg_insert_sql = self._build_pg_insert() if self.is_postgres else None
        self._pg_page_sql = self._build_pg_page_sql() if self.is_postgres else None
        self._build_group_sql()
        self._build_batch_group_sql()
        self._build_status_sql()
        self._ping()

    # -- construction ------------------------------------------------------------------

    @staticmethod
    def _make_engine(target: Any, connect_timeout: float) -> tuple[Engine, bool]:
        if isinstance(target, sa.Engine):
            return target, False
        sync_engine = getattr(target, "sync_engine", None)  # an AsyncEngine
        if isinstance(sync_engine, sa.Engine):
            target = sync_engine.url
        url = sa.make_url(target)
        backend, _, driver = url.drivername.partition("+")
        if driver in _ASYNC_DRIVERS:
            url = url.set(drivername=f"{backend}+{_ASYNC_DRIVERS[driver]}")
        kwargs: dict[str, Any] = {}
        if backend == "postgresql":
            if not driver or driver in _ASYNC_DRIVERS:
                url = url.set(drivername="postgresql+psycopg")
            if "connect_timeout" not in url.query:
                kwargs["connect_args"] = {"connect_timeout": max(1, int(connect_timeout))}
        elif backend == "sqlite" and url.database in (None, "", ":memory:"):
            kwargs = {"poolclass": sa.pool.StaticPool,
                      "connect_args": {"check_same_thread": False}}
        engine = sa.create_engine(url, **kwargs)
        if backend != "sqlite":
            _ping_when_idle(engine)
        return engine, True

    def _is_memory_sqlite(self) -> bool:
        return self.dialect == "sqlite" and self.url.database in (None, "", ":memory:")

    def _ping(self) -> None:
        with self._errors(), self._serial, self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def _repr_target(self) -> str:
        return f"{self.address!r}, table_name={self.table_name!r}"

    @property
    def address(self) -> str:
        """The database URL without its password."""
        return self.url.render_as_string(hide_password=True)

    # -- schema ------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the events and group tables if missing (quick starts and tests).

        Also stamps the migrations' version table at head, so that running the migrations
        later finds the schema current. Production databases should use the migrations.
        """
        with self._errors(), self._serial, self.engine.begin() as conn:
            self.tables.metadata.create_all(conn)
            stamp_head(conn, self.table_name)

    def drop_schema(self) -> None:
        """Drop the events and group tables and our migration version table (tests, teardown)."""
        with self._errors(), self._serial, self.engine.begin() as conn:
            self.tables.metadata.drop_all(conn)
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {version_table_name(self.table_name)}"))

    # -- errors ------------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn driver errors into :class:`ProviderError` saying what is wrong and what to do."""
        try:
            yield
        except ProviderError:
            raise
        except sa_exc.DBAPIError as exc:
            raise self._describe(exc) from exc
        except sa_exc.SQLAlchemyError as exc:
            raise ProviderError(f"database at {self.address}: {exc}") from exc

    def _describe(self, exc: sa_exc.DBAPIError) -> ProviderError:
        orig = exc.orig
        text = str(orig).strip()
        low = text.lower()
        code = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None)
        addr = f"database at {self.address}"
        if code == "42P01" or "no such table" in low or (
            "relation" in low and "does not exist" in low
        ):
            return ProviderError(
                f"{addr}: the events table {self.table_name!r} (or its _groups/_claims tables) "
                f"is missing: run the migrations: python -m sqlalchemy_eventbroker.migrate upgrade "
                f"--url '{self.address}' --table-name {self.table_name} "
                f"(or call DatabaseProvider.create_schema()). Driver said: {text}"
            )
        if code in ("28P01", "28000") or "password authentication failed" in low or (
            "role" in low and "does not exist" in low
        ) or "no password supplied" in low:
            return ProviderError(
                f"{addr}: wrong credentials: the server rejected the user or password; "
                f"check them in the URL. Driver said: {text}"
            )
        if code == "3D000" or ("database" in low and "does not exist" in low):
            return ProviderError(
                f"{addr}: the database does not exist: create it first "
                f"(CREATE DATABASE ...). Driver said: {text}"
            )
        if exc.connection_invalidated or any(
            s in low
            for s in ("connection refused", "could not connect", "connection failed", "timeout",
                      "timed out", "name or service not known", "unable to open database",
                      "server closed the connection", "terminating connection", "no route")
        ):
            return ProviderError(
                f"{addr}: unreachable: is the server running and are host and port right? "
                f"Driver said: {text}"
            )
        return ProviderError(f"{addr}: {text}")

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError(f"DatabaseProvider({self.address}) is closed")

    def _check_ids(self, events: Sequence[Event]) -> None:
        if not self.is_postgres:
            return
        for e in events:
            try:
                uuid.UUID(e.id)
            except (ValueError, TypeError, AttributeError):
                raise EventValidationError(
                    f"event.id: {e.id!r} is not a UUID (the events table stores ids as uuid)",
                    field="id",
                ) from None

    def _lookup_id(self, event_id: str) -> str | None:
        """``event_id`` if it can exist in the table (PostgreSQL only holds UUIDs)."""
        if not isinstance(event_id, str) or not event_id:
            return None
        if self.is_postgres:
            try:
                uuid.UUID(event_id)
            except ValueError:
                return None
        return event_id

    # -- writing -----------------------------------------------------------------------

    def _build_pg_insert(self) -> sa.TextClause:
        prep = self.engine.dialect.identifier_preparer
        names = ", ".join(prep.quote(c) for c in EVENT_COLUMNS)
        defs = ", ".join(f"{prep.quote(c)} {_PG_RECORD_TYPES[c]}" for c in EVENT_COLUMNS)
        table = prep.format_table(self._t)
        return sa.text(
            f"WITH ins AS (INSERT INTO {table} ({names}) SELECT {names} "
            f"FROM jsonb_to_recordset(CAST(:doc AS jsonb)) AS r({defs})) "
            f"SELECT pg_notify(:channel, :hint)"
        )

    def _insert(self, conn: Connection, events: Sequence[Event]) -> None:
        """ONE statement for all ``events`` on ``conn`` (plus the NOTIFY on PostgreSQL)."""
        self._execute_insert(conn, self._insert_params(events))

    def _insert_params(self, events: Sequence[Event]) -> Any:
        if self._pg_insert_sql is not None:
            doc = _json.dumps([_pg_doc_row(e) for e in events])
            return {"doc": doc, "channel": self.channel, "hint": self.table_name}
        return [_core_row(e) for e in events]

    def _execute_insert(self, conn: Connection, params: Any) -> None:
        if self._pg_insert_sql is not None:
            conn.execute(self._pg_insert_sql, params)
        else:
            conn.execute(self._t.insert(), params)

    def _isolated_insert(self, conn: Connection, events: Sequence[Event]) -> None:
        """:meth:`_insert` inside a savepoint of its own, so that a failure undoes only the
        insert and the caller's transaction goes on.

        PostgreSQL with psycopg 3: ``SAVEPOINT``, the insert and ``RELEASE`` travel in ONE
        round trip (pipeline mode on the driver connection); on failure one more round trip
        rolls back to the savepoint. Other PostgreSQL drivers: a SQLAlchemy ``begin_nested()``.
        A connection in autocommit mode needs none: the insert is a transaction of its own.
        Other databases: no savepoint here (``write_in_transaction_is_isolated`` is False
        there; capture adds its own).
        """
        params = self._insert_params(events)  # Python-side failures happen before any SQL
        if not self.is_postgres:
            # Not isolated here (write_in_transaction_is_isolated is False): capture adds its
            # savepoint, where the application configured SQLite savepoints to work.
            self._execute_insert(conn, params)
            return
        import psycopg

        driver = conn.connection.driver_connection
        if getattr(driver, "autocommit", False):
            self._execute_insert(conn, params)
            return
        if not isinstance(driver, psycopg.Connection):  # asyncpg, psycopg async, psycopg2
            with conn.begin_nested():
                self._execute_insert(conn, params)
            return
        if not conn.in_transaction():
            conn.begin()  # as SQLAlchemy's autobegin would on the first statement
        savepoint = False
        try:
            with driver.pipeline():
                conn.exec_driver_sql(f"SAVEPOINT {_OUTBOX_SAVEPOINT}")
                savepoint = True
                self._execute_insert(conn, params)
                conn.exec_driver_sql(f"RELEASE SAVEPOINT {_OUTBOX_SAVEPOINT}")
        except Exception as exc:
            if savepoint:
                self._undo_savepoint(driver)
            if isinstance(exc, sa_exc.SQLAlchemyError | ProviderError):
                raise
            raise ProviderError(f"database at {self.address}: {exc}") from exc

    @staticmethod
    def _undo_savepoint(driver: Any) -> None:
        """After a failed pipelined write: roll back to the savepoint (if the release did not
        happen) so the caller's transaction is usable again."""
        import psycopg

        status = driver.info.transaction_status
        if status == psycopg.pq.TransactionStatus.IDLE:
            return
        try:
            driver.execute(f"ROLLBACK TO SAVEPOINT {_OUTBOX_SAVEPOINT}")
            driver.execute(f"RELEASE SAVEPOINT {_OUTBOX_SAVEPOINT}")
        except psycopg.errors.InvalidSavepointSpecification:
            pass  # released before the failure: nothing of ours is left to undo

    def _store(self, events: Sequence[Event], *, track: bool = True) -> None:
        if not events:
            return
        self._check_open()
        self._check_ids(events)
        try:
            with self._errors(), self._serial, self._one_statement_conn() as conn:
                self._insert(conn, events)
        except ProviderError as exc:
            if not isinstance(exc.__cause__, sa_exc.IntegrityError):
                raise
            # An id that is already stored: replace the row, under a new seq (it travels again).
            with self._errors(), self._serial, self.engine.begin() as conn:
                conn.execute(self._t.delete().where(self._t.c.id.in_([e.id for e in events])))
                self._insert(conn, events)
        if track:
            with self._lock:
                for e in events:
                    self._stored_unpublished[e.id] = None
                while len(self._stored_unpublished) > 100_000:
                    del self._stored_unpublished[next(iter(self._stored_unpublished))]
        self._wake_local()

    def store(self, event: Event) -> None:
        """Insert ``event`` (a copy: later changes to the object are not seen).

        On PostgreSQL the wake-up NOTIFY travels in the same statement. Storing an id that is
        already stored replaces that row under a new ``seq``.

        Raises:
            EventValidationError: on PostgreSQL, the id is not a UUID.
            ProviderError: the database failed (a missing table says how to create it).
        """
        self._store([event])

    def store_many(self, events: Sequence[Event]) -> None:
        """Insert ``events`` with one statement in one transaction."""
        self._store(list(events))

    def publish(self, event: Event) -> None:
        """Make ``event`` travel to every stream and group on this database.

        Rows travel by being committed. ``store`` already wrote the row and sent the wake-up,
        so publishing an event this provider has just stored costs nothing. Any other event
        (never stored, or stored earlier and published again, e.g. a redrive) is written now,
        replacing a stored row of the same id under a new ``seq`` so that it travels again.
        """
        self.publish_many([event])

    def publish_many(self, events: Sequence[Event]) -> None:
        """:meth:`publish` for several events: at most one insert statement and one NOTIFY."""
        self._check_open()
        untracked: list[Event] = []
        with self._lock:
            for e in events:
                try:
                    del self._stored_unpublished[e.id]
                except KeyError:
                    untracked.append(e)
            self._published += len(events)
        if untracked:
            self._store(untracked, track=False)

    def _quoted_table(self) -> str:
        return self.engine.dialect.identifier_preparer.format_table(self._t)

    # -- outbox (TransactionalProvider) --------------------------------------------------

    def shares_transaction(self, connection: Connection) -> bool:
        """Whether ``connection`` is on this provider's database (same engine, or same
        backend, host, port and database in its URL)."""
        engine = connection.engine
        if engine is self.engine:
            return True
        cached = self._share_cache.get(engine)
        if cached is not None:
            return cached
        a, b = engine.url, self.url
        same = (
            a.get_backend_name() == b.get_backend_name()
            and (a.host or "localhost") == (b.host or "localhost")
            and (a.port or 0) == (b.port or 0)
            and a.database == b.database
            and not (self.dialect == "sqlite" and a.database in (None, "", ":memory:"))
        )
        if same and self.dialect == "sqlite" and a.database:
            same = os.path.realpath(a.database) == os.path.realpath(b.database or "")
        self._share_cache[engine] = same
        return same

    @property
    def write_in_transaction_is_isolated(self) -> bool:
        """PostgreSQL: ``write_in_transaction`` protects the caller's transaction itself (a
        failing write rolls back only its own savepoint), so capture adds none of its own."""
        return self.is_postgres

    def write_in_transaction(self, connection: Connection, events: Sequence[Event]) -> None:
        """Insert ``events`` on ``connection``, inside its transaction: ONE statement.

        On PostgreSQL the statement also issues the wake-up ``pg_notify``; PostgreSQL merges
        identical notifications of one transaction, so listeners wake once per commit. The rows
        become visible to streams when (and only if) the caller commits.

        On PostgreSQL the insert runs in a savepoint of its own (sent in the same round trip:
        ``SAVEPOINT``, insert, ``RELEASE`` pipelined), so when it fails only the insert is
        undone: the caller's transaction stays usable and this raises :class:`ProviderError`.
        """
        if not events:
            return
        self._check_open()
        self._check_ids(events)
        with self._errors():
            self._isolated_insert(connection, events)
        with self._lock:
            self._published += len(events)
            for e in events:  # travels on commit: a later publish() must not resend it
                self._stored_unpublished[e.id] = None
        if not self.is_postgres:
            self._wake_after_commit(connection)

    def _wake_after_commit(self, connection: Connection) -> None:
        tx = connection.get_transaction()
        marker = connection.info.get("_eventbroker_wake")
        if tx is None or marker is tx:
            return
        connection.info["_eventbroker_wake"] = tx
        sa.event.listen(connection, "commit", lambda conn: self._wake_local(), once=True)

    # -- reading -----------------------------------------------------------------------

    def get(self, event_id: str) -> Event | None:
        """The stored event with this id, or ``None``."""
        self._check_open()
        key = self._lookup_id(event_id)
        if key is None:
            return None
        with self._errors(), self._serial, self.engine.connect() as conn:
            row = conn.execute(sa.select(*self._cols).where(self._t.c.id == key)).first()
        return None if row is None else _row_event(row)

    def list(self, filter: EventFilter | None = None) -> list[Event]:
        """Stored events that pass ``filter``, oldest first (``created_at``, then ``seq``).

        Every field is a SQL condition on an indexed column where one exists; ``type_pattern``
        becomes ``LIKE 'prefix%'`` plus an exact regular expression (PostgreSQL) or ``GLOB`` and
        a segment count (SQLite). ``limit``/``offset`` apply in SQL.
        """
        return list(self.iter_events(filter))

    def iter_events(
        self, filter: EventFilter | None = None, *, page_size: int = 1000
    ) -> Iterator[Event]:
        """Like :meth:`list`, but reads in pages of ``page_size`` rows (keyset pagination on
        ``(created_at, seq)``), so memory stays flat for any number of rows (``replay``)."""
        f = filter or EventFilter()
        self._check_open()
        t = self._t
        conds: list[sa.ColumnElement[bool]] = []
        if f.source is not None:
            conds.append(t.c.source == str(f.source))
        if f.status is not None:
            conds.append(t.c.status == str(f.status))
        if f.user_id is not None:
            conds.append(t.c.user_id == f.user_id)
        for name in ("schema", "entity", "operation", "instance_id"):
            value = getattr(f, name)
            if value:
                conds.append(t.c[name] == value)
        if f.start_time is not None:
            conds.append(t.c.created_at >= _utc(f.start_time))
        if f.end_time is not None:
            conds.append(t.c.created_at < _utc(f.end_time))
        refine: Callable[[str], bool] | None = None
        if f.type_pattern:
            clause, exact = self._pattern_clause(f.type_pattern)
            if clause is not None:
                conds.append(clause)
            if not exact:
                refine = compile_pattern(f.type_pattern)
        remaining = f.limit or None
        skip = f.offset
        key: tuple[dt.datetime, int] | None = None
        while True:
            stmt = sa.select(*self._cols, t.c.seq).where(*conds)
            if key is not None:
                stmt = stmt.where(
                    sa.tuple_(t.c.created_at, t.c.seq)
                    > sa.tuple_(
                        sa.literal(key[0], t.c.created_at.type), sa.literal(key[1], sa.BigInteger())
                    )
                )
            n = page_size
            if refine is None:
                if skip:
                    stmt = stmt.offset(skip)
                    skip = 0
                if remaining is not None:
                    n = min(n, remaining)
            stmt = stmt.order_by(t.c.created_at, t.c.seq).limit(n)
            with self._errors(), self._serial, self.engine.connect() as conn:
                rows = conn.execute(stmt).all()
            for row in rows:
                if refine is not None and not refine(row[2]):
                    continue
                if skip:
                    skip -= 1
                    continue
                yield _row_event(row)
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        return
            if len(rows) < n:
                return
            key = (rows[-1][13], rows[-1][17])

    def _pattern_clause(self, pattern: str) -> tuple[sa.ColumnElement[bool] | None, bool]:
        """SQL for a subscription pattern on ``type``, and whether it is exact."""
        segments = validate_pattern(pattern)
        col = self._t.c.type
        if pattern == "*":
            return None, True
        if "*" not in pattern:
            return col == pattern, True
        literal_prefix: list[str] = []
        for seg in segments:
            if "*" in seg:
                break
            literal_prefix.append(seg)
        prefix = ".".join(literal_prefix) + "." if literal_prefix else ""
        conds: list[sa.ColumnElement[bool]] = []
        if prefix:
            conds.append(col.like(_like_escape(prefix) + "%", escape="/"))
        trailing = segments[-1] == "**"
        if self.is_postgres:
            parts = [
                ".*" if s == "**" else "[^.]*" if s == "*" else re.escape(s) for s in segments
            ]
            regex = "^" + r"\.".join(parts) + "$"
            conds.append(col.op("~")(regex))
            return sa.and_(*conds), True
        if self.dialect == "sqlite":
            glob = ".".join("*" if "*" in s else _glob_escape(s) for s in segments)
            conds.append(col.op("GLOB")(glob))
            if not trailing:
                dots = sa.func.length(col) - sa.func.length(sa.func.replace(col, ".", ""))
                conds.append(dots == len(segments) - 1)
                return sa.and_(*conds), True
            # '*.x.**': a GLOB '*' could swallow dots before the literal segment.
            return sa.and_(*conds), "*" not in segments[:-1]
        return (sa.and_(*conds) if conds else None), False

    def update_status(
        self, event_id: str, status: EventStatus, error: str = "", *, retry_count: int | None = None
    ) -> None:
        """Set status, error and (when given) retry count of the stored event.

        ``processing`` sets ``processed_at``; ``completed``/``failed`` set ``completed_at`` and
        ``processed_at`` when it was never set. Unknown ids are ignored.
        """
        self._check_open()
        key = self._lookup_id(event_id)
        if key is None:
            return
        t = self._t
        now = dt.datetime.now(UTC)
        status = EventStatus(status)
        values: dict[str, Any] = {"status": str(status), "error": error}
        if retry_count is not None:
            values["retry_count"] = retry_count
        if status is EventStatus.PROCESSING:
            values["processed_at"] = now
        elif status in (EventStatus.COMPLETED, EventStatus.FAILED):
            values["completed_at"] = now
            values["processed_at"] = sa.func.coalesce(
                t.c.processed_at, sa.literal(now, t.c.processed_at.type)
            )
        with self._errors(), self._serial, self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.id == key).values(**values))

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None:
        """:meth:`update_status` for many events: ONE statement in one transaction.

        Same semantics per item (timestamps from the moment of this call, ``retry_count`` only
        when given); unknown ids are ignored; for an id given twice the last item wins.
        PostgreSQL: ``UPDATE ... FROM jsonb_to_recordset(:doc)``; elsewhere an executemany.
        """
        self._check_open()
        latest: dict[str, StatusUpdate] = {}
        for u in updates:
            key = self._lookup_id(u.event_id)
            if key is not None:
                latest[key] = u
        if not latest:
            return
        now = dt.datetime.now(UTC)
        if self._sql_status_many_pg is not None:
            doc = _json.dumps([
                {"id": key, "status": str(EventStatus(u.status)), "error": u.error or "",
                 "retry_count": u.retry_count}
                for key, u in latest.items()
            ])
            params: Any = {"doc": doc, "now": now}
            stmt: Any = self._sql_status_many_pg
        else:
            params = [
                {"b_id": key, "b_status": str(EventStatus(u.status)), "b_error": u.error or "",
                 "b_retry": u.retry_count, "b_now": now}
                for key, u in latest.items()
            ]
            stmt = self._sql_status_many
        with self._errors(), self._serial, self.engine.begin() as conn:
            conn.execute(stmt, params)

    def _build_status_sql(self) -> None:
        """The batched status update, built once (see :meth:`update_status_many`)."""
        t = self._t
        finals = [str(EventStatus.COMPLETED), str(EventStatus.FAILED)]
        processing = str(EventStatus.PROCESSING)
        self._sql_status_many_pg: sa.TextClause | None = None
        if self.is_postgres:
            prep = self.engine.dialect.identifier_preparer
            table = prep.format_table(t)
            q = prep.quote
            self._sql_status_many_pg = sa.text(
                f"UPDATE {table} AS t SET {q('status')} = u.status, {q('error')} = u.error, "
                f"{q('retry_count')} = coalesce(u.retry_count, t.{q('retry_count')}), "
                f"{q('processed_at')} = CASE WHEN u.status = '{processing}' THEN :now "
                f"WHEN u.status IN ('{finals[0]}', '{finals[1]}') "
                f"THEN coalesce(t.{q('processed_at')}, :now) ELSE t.{q('processed_at')} END, "
                f"{q('completed_at')} = CASE WHEN u.status IN ('{finals[0]}', '{finals[1]}') "
                f"THEN :now ELSE t.{q('completed_at')} END "
                f"FROM jsonb_to_recordset(CAST(:doc AS jsonb)) "
                f"AS u(id uuid, status text, error text, retry_count integer) "
                f"WHERE t.{q('id')} = u.id"
            ).bindparams(sa.bindparam("now", type_=sa.DateTime(timezone=True)))
        status = sa.bindparam("b_status", type_=sa.String())
        when = sa.bindparam("b_now", type_=t.c.processed_at.type)
        final = sa.or_(status == finals[0], status == finals[1])  # no IN: executemany
        self._sql_status_many = (
            t.update()
            .where(t.c.id == sa.bindparam("b_id", type_=t.c.id.type))
            .values(
                status=status,
                error=sa.bindparam("b_error", type_=sa.Text()),
                retry_count=sa.func.coalesce(
                    sa.bindparam("b_retry", type_=sa.Integer()), t.c.retry_count
                ),
                processed_at=sa.case(
                    (status == processing, when),
                    (final, sa.func.coalesce(t.c.processed_at, when)),
                    else_=t.c.processed_at,
                ),
                completed_at=sa.case((final, when), else_=t.c.completed_at),
            )
        )

    def delete(self, event_id: str) -> None:
        """Remove the stored event (unknown ids are ignored)."""
        self._check_open()
        key = self._lookup_id(event_id)
        if key is None:
            return
        with self._errors(), self._serial, self.engine.begin() as conn:
            conn.execute(self._t.delete().where(self._t.c.id == key))

    def purge(
        self,
        older_than: dt.datetime | dt.timedelta | float,
        statuses: Sequence[EventStatus | str] | None = (EventStatus.COMPLETED, EventStatus.FAILED),
        *,
        batch_size: int = 10_000,
    ) -> int:
        """Delete events that finished before ``older_than`` and return how many.

        ``older_than`` is a cutoff time, or an age (``timedelta`` or seconds) counted back from
        now. An event's time is its ``completed_at``, or ``created_at`` when it never finished.
        ``statuses=None`` purges every status. Deletes in batches of ``batch_size`` rows, each
        its own transaction, so a large purge never holds long locks.
        """
        self._check_open()
        if isinstance(older_than, dt.datetime):
            cutoff = _utc(older_than)
        elif isinstance(older_than, dt.timedelta):
            cutoff = dt.datetime.now(UTC) - older_than
        else:
            cutoff = dt.datetime.now(UTC) - dt.timedelta(seconds=float(older_than))
        t = self._t
        conds: list[sa.ColumnElement[bool]] = [
            sa.func.coalesce(t.c.completed_at, t.c.created_at) < sa.literal(cutoff, t.c.created_at.type)
        ]
        if statuses is not None:
            conds.append(t.c.status.in_([str(EventStatus(s)) for s in statuses]))
        total = 0
        while True:
            batch = sa.select(t.c.seq).where(*conds).limit(batch_size).scalar_subquery()
            with self._errors(), self._serial, self.engine.begin() as conn:
                n = conn.execute(t.delete().where(t.c.seq.in_(batch))).rowcount
            total += n
            if n < batch_size:
                return total

    def stats(self) -> ProviderStats:
        """Counts by status (one query), and what this provider carried."""
        self._check_open()
        t = self._t
        with self._errors(), self._serial, self.engine.connect() as conn:
            counts: dict[str, int] = dict(
                conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status)).all()
            )
        listener = self._listener
        with self._lock:
            active = sum(1 for s in self._streams if not s.closed) + sum(
                1 for g in list(self._group_streams) if not g.closed
            )
            return ProviderStats(
                provider_type="database",
                total_events=sum(counts.values()),
                pending_events=counts.get("pending", 0),
                processing_events=counts.get("processing", 0),
                completed_events=counts.get("completed", 0),
                failed_events=counts.get("failed", 0),
                events_published=self._published,
                events_consumed=self._consumed,
                active_subscribers=active,
                provider_specific={
                    "dialect": self.dialect,
                    "table": self.table_name,
                    "channel": self.channel,
                    "listener": listener.mode if listener else "stopped",
                    "listener_pid": listener.backend_pid if listener else None,
                    "listener_reconnects": listener.reconnects if listener else 0,
                    "cursor_seq": listener.cursor[1] if listener else None,
                },
            )

    # -- the gap-free reader -----------------------------------------------------------

    def _start_point(self) -> _Start:
        """Now, as a starting point: what is visible now is "before" (see :class:`_Start`)."""
        t = self._t
        with self._errors(), self._serial, self.engine.connect() as conn:
            conn.execute(sa.select(t.c.seq).limit(0))  # a missing table fails here, clearly
            if self.is_postgres:
                snap = conn.execute(
                    sa.select(sa.cast(sa.func.pg_current_snapshot(), sa.Text))
                ).scalar_one()
                return _Start.parse(snap)
            top = conn.execute(sa.select(sa.func.coalesce(sa.func.max(t.c.seq), 0))).scalar_one()
            return _Start(0, 0, frozenset(), int(top))

    @staticmethod
    def _pg_xmin() -> sa.ColumnElement[int]:
        return sa.cast(
            sa.cast(sa.func.pg_snapshot_xmin(sa.func.pg_current_snapshot()), sa.Text),
            sa.BigInteger,
        )

    def _read_page(self, cursor: Cursor, limit: int, raw: Any = None) -> _Page:
        """Rows past ``cursor`` that can never again be preceded by a later commit.

        PostgreSQL: rows ordered by ``(tx_id, seq)``; a row counts only when its ``tx_id`` is
        below the statement's snapshot ``xmin`` (every older transaction has ended). Later
        visible rows are reported as ``held_back`` so the caller looks again soon. ``raw``: a
        psycopg connection in autocommit mode to read on instead of a pooled one.
        """
        if raw is not None and self._pg_page_sql is not None:
            # The listener's own autocommit connection: one round trip, no pool checkout.
            rows: Sequence[Any] = raw.execute(
                self._pg_page_sql, (cursor[0], cursor[1], limit), prepare=True
            ).fetchall()
            return self._page(rows, cursor, limit)
        t = self._t
        if self.is_postgres:
            stmt = (
                sa.select(*self._cols, t.c.tx_id, t.c.seq, (t.c.tx_id < self._pg_xmin()).label("ready"))
                .where(sa.tuple_(t.c.tx_id, t.c.seq) > sa.tuple_(sa.literal(cursor[0]), sa.literal(cursor[1])))
                .order_by(t.c.tx_id, t.c.seq)
                .limit(limit)
            )
        else:
            stmt = sa.select(*self._cols, sa.literal(0), t.c.seq, sa.true()).where(
                t.c.seq > cursor[1]
            ).order_by(t.c.seq).limit(limit)
        with self._errors(), self._serial, self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return self._page(rows, cursor, limit)

    @staticmethod
    def _page(rows: Sequence[Any], cursor: Cursor, limit: int) -> _Page:
        events: list[tuple[Event, int, int]] = []
        held = False
        for row in rows:
            if not row[19]:
                held = True
                break
            cursor = (int(row[17]), int(row[18]))
            events.append((_row_event(row), *cursor))
        return _Page(events, cursor, held, len(rows) == limit and not held)

    def _build_pg_page_sql(self) -> str:
        """``_read_page``'s query as plain SQL for the listener's psycopg connection."""
        prep = self.engine.dialect.identifier_preparer
        cols = ", ".join(prep.quote(c) for c in EVENT_COLUMNS)
        return (
            f"SELECT {cols}, tx_id, seq, tx_id < CAST(CAST(pg_snapshot_xmin("
            f"pg_current_snapshot()) AS text) AS bigint) FROM {prep.format_table(self._t)} "
            f"WHERE (tx_id, seq) > (%s::bigint, %s::bigint) ORDER BY tx_id, seq LIMIT %s"
        )

    # -- fan-out streams ---------------------------------------------------------------

    def stream(self, pattern: str) -> QueueEventStream:
        """Every matching event committed after this call, once, in commit order.

        Raises:
            PatternError: the pattern is malformed.
            ProviderError: the database or the table is missing.
        """
        validate_pattern(pattern)
        self._check_open()
        listener = self._ensure_listener()
        stream = QueueEventStream(pattern, on_close=self._forget_stream)
        # Under the dispatch lock: no page can slip between the snapshot and the registration.
        with self._lock:
            start = self._starts[stream] = self._start_point()
            if not any(not s.closed for s in self._streams):
                # The listener read nothing while no stream was open; everything before
                # this start is "before" the stream anyway, so it may skip there.
                listener.jump = start.cursor()
            self._streams.append(stream)
        listener.kick()
        return stream

    def _forget_stream(self, stream: QueueEventStream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)
            self._starts.pop(stream, None)

    def _ensure_listener(self) -> _Listener:
        with self._lock:
            self._check_open()
            if self._listener is None:
                listener = _Listener(self, self._start_point().cursor())
                listener.start()
                self._listener = listener
            return self._listener

    def _dispatch(self, events: builtins.list[tuple[Event, int, int]]) -> None:
        with self._lock:
            streams = [s for s in self._streams if not s.closed]
            starts = self._starts
            for event, tx, seq in events:
                first = True
                for s in streams:
                    start = starts.get(s)
                    if start is not None and start.before(tx, seq):
                        continue  # visible when the stream opened: not "after" it
                    if s.wants(event.type):
                        s._put(event if first else event.clone())
                        first = False
                        self._consumed += 1

    def _retire_starts(self, cursor: Cursor) -> None:
        """Forget start points the reader is past (no row beyond it can be "before" them)."""
        with self._lock:
            for s in [s for s, st in self._starts.items() if st.xmax and cursor[0] >= st.xmax]:
                del self._starts[s]

    def _wake_local(self) -> None:
        """Something changed: wake group members waiting here, and (without NOTIFY) the reader."""
        with self._wake:
            self._wake_gen += 1
            self._wake.notify_all()
        listener = self._listener
        if listener is not None and listener.mode != "notify":
            listener.kick()

    def _wait_wake(self, gen: int, timeout: float) -> None:
        with self._wake:
            if self._wake_gen == gen and not self._closed:
                self._wake.wait(timeout)

    # -- groups ------------------------------------------------------------------------

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0) -> _DbGroupStream:
        """Join the consumer group ``(group, pattern)``, creating it at the tail if new.

        Raises:
            PatternError: the pattern is malformed.
            ValueError: empty group name or non-positive lease.
        """
        validate_pattern(pattern)
        if not group:
            raise ValueError("group_stream: group must be a non-empty string")
        if lease <= 0:
            raise ValueError(f"group_stream: lease must be > 0, got {lease}")
        self._check_open()
        if self.is_postgres:
            self._ensure_listener()  # its notifications wake the members
        group_id = self._open_group(group, pattern)
        stream = _DbGroupStream(self, group_id, group, pattern, float(lease), self.group_prefetch)
        with self._lock:
            self._group_streams.add(stream)
        return stream

    def drop_group(self, group: str, pattern: str) -> None:
        """Forget a consumer group: its cursor and unfinished claims."""
        self._check_open()
        g, c = self.tables.groups, self.tables.claims
        with self._errors(), self._serial, self.engine.begin() as conn:
            gid = conn.execute(
                sa.select(g.c.id).where(g.c.group_name == group, g.c.pattern == pattern)
            ).scalar()
            if gid is not None:
                conn.execute(c.delete().where(c.c.group_id == gid))
                conn.execute(g.delete().where(g.c.id == gid))

    def _open_group(self, group: str, pattern: str) -> int:
        g = self.tables.groups
        where = (g.c.group_name == group, g.c.pattern == pattern)
        start = self._start_point()
        tx, seq = start.cursor()
        now = dt.datetime.now(UTC)
        with self._errors(), self._serial, self.engine.begin() as conn:
            gid = conn.execute(sa.select(g.c.id).where(*where)).scalar()
            if gid is not None:
                return int(gid)
            values = {"group_name": group, "pattern": pattern, "cursor_tx": tx, "cursor_seq": seq,
                      "start_snapshot": start.text() if self.is_postgres else None,
                      "created_at": now}
            if self.dialect in ("postgresql", "sqlite"):
                insert = pg_dialect.insert(g) if self.is_postgres else sqlite_dialect.insert(g)
                conn.execute(insert.values(**values).on_conflict_do_nothing())
            else:
                conn.execute(g.insert().values(**values))
            return int(conn.execute(sa.select(g.c.id).where(*where)).scalar_one())

    def _build_group_sql(self) -> None:
        """The single-claim renewal, built once: each call only binds parameters, so
        SQLAlchemy reuses the compiled form."""
        c = self.tables.claims
        gid = sa.bindparam("p_gid", type_=sa.Integer())
        seq = sa.bindparam("p_seq", type_=sa.BigInteger())
        lease: sa.BindParameter[float] = sa.bindparam("p_lease", type_=sa.Double())
        token = sa.bindparam("p_token", type_=sa.String())
        if self.is_postgres:
            now: sa.ColumnElement[Any] = sa.func.extract("epoch", sa.func.clock_timestamp())
            fast = [self._async_commit()]
        else:
            now = sa.bindparam("p_now", type_=sa.Double())
            fast = []
        self._sql_renew = (
            c.update()
            .where(c.c.group_id == gid, c.c.seq == seq, c.c.token == token, *fast)
            .values(lease_until=now + lease)
        )

    def _build_batch_group_sql(self) -> None:
        """Statements that take, acknowledge, renew or release many claims at once."""
        c, t = self.tables.claims, self._t
        if self.is_postgres:
            prep = self.engine.dialect.identifier_preparer
            ct, et = prep.format_table(c), prep.format_table(t)
            cols = ", ".join(f"t.{prep.quote(n)}" for n in EVENT_COLUMNS)
            now = "extract(epoch FROM clock_timestamp())"
            fast = "(SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL"
            acks = "CAST(:acks AS bigint[])"
            # Deferred acknowledgements ride along with the next claim: one round trip.
            self._sql_claim_batch = sa.text(
                f"WITH acked AS (DELETE FROM {ct} WHERE group_id = :gid AND seq = ANY({acks})), "
                f"pick AS (SELECT group_id, seq FROM {ct} WHERE group_id = :gid "
                f"AND lease_until <= {now} AND NOT (seq = ANY({acks})) AND {fast} "
                f"ORDER BY seq LIMIT :n FOR UPDATE SKIP LOCKED), "
                f"claimed AS (UPDATE {ct} AS c SET lease_until = {now} + :lease, token = :token, "
                f"deliveries = c.deliveries + 1 FROM pick "
                f"WHERE c.group_id = pick.group_id AND c.seq = pick.seq RETURNING c.seq) "
                f"SELECT claimed.seq, {cols} FROM claimed LEFT JOIN {et} AS t "
                f"ON t.seq = claimed.seq ORDER BY claimed.seq"
            ).bindparams(sa.bindparam("lease", type_=sa.Double()))
            self._sql_fill_pg: sa.TextClause | None = sa.text(
                f"INSERT INTO {ct} (group_id, seq, event_id, lease_until, token, deliveries) "
                f"SELECT :gid, u.seq, u.id, 0, '', 0 FROM "
                f"unnest(CAST(:seqs AS bigint[]), CAST(:ids AS uuid[])) AS u(seq, id)"
            )
            self._sql_ack_many = sa.text(
                f"DELETE FROM {ct} WHERE group_id = :gid AND seq = ANY({acks}) AND {fast}"
            )
            pairs = "unnest(CAST(:seqs AS bigint[]), CAST(:tokens AS text[])) AS u(seq, token)"
            self._sql_relet_many = sa.text(
                f"UPDATE {ct} AS c SET lease_until = CASE WHEN :lease > 0 THEN {now} + :lease "
                f"ELSE 0 END FROM {pairs} WHERE c.group_id = :gid AND c.seq = u.seq "
                f"AND c.token = u.token AND {fast} RETURNING c.seq"
            ).bindparams(sa.bindparam("lease", type_=sa.Double()))
        else:
            self._sql_fill_pg = None
            gid = sa.bindparam("p_gid", type_=sa.Integer())
            now_p: sa.BindParameter[float] = sa.bindparam("p_now", type_=sa.Double())
            free = (
                sa.select(c.c.seq)
                .where(c.c.group_id == gid, c.c.lease_until <= now_p)
                .order_by(c.c.seq)
                .limit(sa.bindparam("p_n", type_=sa.Integer()))
                .scalar_subquery()
            )
            # One statement: SQLite takes the write lock for it, so two members never take
            # the same claim (the token then finds exactly this batch).
            self._sql_take_batch = (
                c.update()
                .where(c.c.group_id == gid, c.c.seq.in_(free))
                .values(lease_until=now_p + sa.bindparam("p_lease", type_=sa.Double()),
                        token=sa.bindparam("p_token", type_=sa.String()),
                        deliveries=c.c.deliveries + 1)
            )
            self._sql_taken = (
                sa.select(c.c.seq, *self._cols)
                .select_from(c.outerjoin(t, t.c.seq == c.c.seq))
                .where(c.c.group_id == gid, c.c.token == sa.bindparam("p_token", type_=sa.String()))
                .order_by(c.c.seq)
            )

    def _claim_batch(
        self, stream: _DbGroupStream, n: int, acks: builtins.list[int]
    ) -> builtins.list[_DbDelivery]:
        """Write ``acks`` and lease up to ``n`` of the group's oldest free (or expired) claims,
        with their events, in one transaction (PostgreSQL: one statement)."""
        token = uuid.uuid4().hex
        claimed_at = time.monotonic()
        gone: builtins.list[int] = []
        with self._errors(), self._serial, self._one_statement_conn() as conn:
            if self.is_postgres:
                rows = conn.execute(self._sql_claim_batch, {
                    "gid": stream.group_id, "acks": acks, "n": n, "lease": stream.lease,
                    "token": token,
                }).all()
            else:
                if acks:
                    conn.execute(self._sql_ack_in(stream.group_id, acks))
                params = {"p_gid": stream.group_id, "p_now": time.time(), "p_n": n,
                          "p_lease": stream.lease, "p_token": token}
                rows = []
                if conn.execute(self._sql_take_batch, params).rowcount:
                    rows = conn.execute(self._sql_taken, params).all()
        out: builtins.list[_DbDelivery] = []
        for row in rows:
            seq = int(row[0])
            if row[1] is None:  # the event was deleted or purged meanwhile: nothing to deliver
                gone.append(seq)
                continue
            out.append(_DbDelivery(_row_event(row[1:]), stream, seq, token, claimed_at))
        if gone:
            stream._ack_later_many(gone)
        if out:
            with self._lock:
                self._consumed += len(out)
        return out

    def _sql_ack_in(self, gid: int, seqs: Sequence[int]) -> sa.Delete:
        c = self.tables.claims
        return c.delete().where(c.c.group_id == gid, c.c.seq.in_(list(seqs)))

    def _ack_many(self, stream: _DbGroupStream, seqs: Sequence[int]) -> None:
        """Delete the claims ``seqs`` of the group: one statement."""
        with self._errors(), self._serial, self._one_statement_conn() as conn:
            if self.is_postgres:
                conn.execute(self._sql_ack_many, {"gid": stream.group_id, "acks": list(seqs)})
            else:
                conn.execute(self._sql_ack_in(stream.group_id, seqs))

    def _relet_many(
        self, stream: _DbGroupStream, deliveries: Sequence[_DbDelivery], lease: float
    ) -> set[int]:
        """Set the leases of ``deliveries`` still held with their tokens to ``lease`` seconds
        from now (0: free them at once); returns the seqs that were still held."""
        if not deliveries:
            return set()
        if self.is_postgres:
            with self._errors(), self._serial, self._one_statement_conn() as conn:
                rows = conn.execute(self._sql_relet_many, {
                    "gid": stream.group_id, "seqs": [d.seq for d in deliveries],
                    "tokens": [d.token for d in deliveries], "lease": lease,
                }).all()
            return {int(r[0]) for r in rows}
        held: set[int] = set()
        c = self.tables.claims
        with self._errors(), self._serial, self._one_statement_conn() as conn:
            until = time.time() + lease if lease > 0 else 0.0
            for d in deliveries:
                if conn.execute(
                    c.update()
                    .where(c.c.group_id == stream.group_id, c.c.seq == d.seq, c.c.token == d.token)
                    .values(lease_until=until)
                ).rowcount:
                    held.add(d.seq)
        return held

    def _ack_flusher(self) -> _AckFlusher:
        with self._lock:
            if self._flusher is None:
                self._flusher = _AckFlusher(self)
                self._flusher.start()
            return self._flusher

    def _fill(self, stream: _DbGroupStream) -> tuple[int, bool]:
        """Advance the group's cursor by one page, adding a claim per matching event.

        Returns ``(claims added, should look again soon)``. Gap-free like the fan-out reader.
        PostgreSQL: optimistic (the cursor moves by compare-and-set, no lock is held while
        reading); elsewhere the transaction starts with a write, which serialises fillers.
        """
        g, c, t = self.tables.groups, self.tables.claims, self._t
        gid = stream.group_id
        limit = self.page_size
        with self._errors(), self._serial, self.engine.begin() as conn:
            if not self.is_postgres:
                conn.execute(g.update().where(g.c.id == gid).values(cursor_seq=g.c.cursor_seq))
            row = conn.execute(
                sa.select(g.c.cursor_tx, g.c.cursor_seq, g.c.start_snapshot).where(g.c.id == gid)
            ).first()
            if row is None:
                raise ProviderError(f"consumer group {stream.group!r} was dropped")
            old = (int(row[0]), int(row[1]))
            start = _Start.parse(row[2]) if row[2] else None
            if self.is_postgres:
                stmt = (
                    sa.select(t.c.seq, t.c.id, t.c.type, t.c.tx_id, (t.c.tx_id < self._pg_xmin()))
                    .where(sa.tuple_(t.c.tx_id, t.c.seq) > sa.tuple_(sa.literal(old[0]), sa.literal(old[1])))
                    .order_by(t.c.tx_id, t.c.seq)
                    .limit(limit)
                )
            else:
                stmt = (
                    sa.select(t.c.seq, t.c.id, t.c.type, sa.literal(0), sa.true())
                    .where(t.c.seq > old[1])
                    .order_by(t.c.seq)
                    .limit(limit)
                )
            rows = conn.execute(stmt).all()
            cursor, held, claims = old, False, []
            for seq, event_id, etype, tx, ready in rows:
                if not ready:
                    held = True
                    break
                cursor = (int(tx), int(seq))
                if start is not None and start.before(*cursor):
                    continue  # visible when the group was created: before its start
                if stream.wants(etype):
                    claims.append({"group_id": gid, "seq": seq, "event_id": str(event_id),
                                   "lease_until": 0.0, "token": "", "deliveries": 0})
            if cursor == old:
                return 0, held
            moved = conn.execute(
                g.update()
                .where(g.c.id == gid, g.c.cursor_tx == old[0], g.c.cursor_seq == old[1])
                .values(cursor_tx=cursor[0], cursor_seq=cursor[1])
            ).rowcount
            if not moved:  # another member filled this page first; nothing was written
                return 0, True
            if claims and self._sql_fill_pg is not None:
                conn.execute(self._sql_fill_pg, {
                    "gid": gid, "seqs": [x["seq"] for x in claims],
                    "ids": [x["event_id"] for x in claims],
                })
            elif claims:
                conn.execute(c.insert(), claims)
                if self.is_postgres:  # wake the other members, wherever they run
                    conn.execute(sa.select(sa.func.pg_notify(self.channel, self.table_name)))
        if claims:
            self._wake_local()
        return len(claims), held or len(rows) == limit

    def _renew(self, delivery: _DbDelivery) -> bool:
        params: dict[str, Any] = {"p_gid": delivery.stream.group_id, "p_seq": delivery.seq,
                  "p_token": delivery.token, "p_lease": delivery.stream.lease}
        if not self.is_postgres:
            params["p_now"] = time.time()
        with self._errors(), self._serial, self._one_statement_conn() as conn:
            return bool(conn.execute(self._sql_renew, params).rowcount)

    @contextmanager
    def _one_statement_conn(self) -> Iterator[Connection]:
        """A connection for work that is ONE statement (stores, group claim/ack/renew).
        PostgreSQL: autocommit (a single statement is its own transaction: no BEGIN/COMMIT
        round trips); elsewhere a transaction (SQLite's claim is a compare-and-set of two
        statements, which it keeps together)."""
        if self.is_postgres:
            with self.engine.connect() as conn:
                yield conn.execution_options(isolation_level="AUTOCOMMIT")
        else:
            with self.engine.begin() as conn:
                yield conn

    @staticmethod
    def _async_commit() -> sa.ColumnElement[bool]:
        """``synchronous_commit = off`` for the statement's own (autocommit) transaction.

        Claims, acks and lease renewals need not wait for the WAL flush: if the server
        crashes before it, the claim or ack is simply undone and the event delivered again,
        which at-least-once allows. Set in the statement itself (``set_config(..., true)``),
        so it costs no round trip and never leaks into the pooled session.
        """
        # An uncorrelated scalar subquery: evaluated once, before the scan (an InitPlan).
        return sa.select(
            sa.func.set_config("synchronous_commit", "off", True)
        ).scalar_subquery().is_not(None)

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the listener, end open streams, and dispose the engine if the provider made it.

        Idempotent; other calls afterwards raise :class:`ProviderError`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listener, self._listener = self._listener, None
            streams = list(self._streams)
            groups = list(self._group_streams)
        for s in streams:
            s.close()
        for g in groups:
            g.close()
        with self._lock:
            flusher, self._flusher = self._flusher, None
            pending = list(self._acks_pending)
        if flusher is not None:
            flusher.stop()
        for g in pending:  # streams nobody closed: write what they still owe
            g._flush_acks_or_warn()
        with self._wake:
            self._wake.notify_all()
        if listener is not None:
            listener.stop()
        if self._owns_engine:
            self.engine.dispose()


@dataclass(eq=False, slots=True)
class _DbDelivery:
    """One event leased to this member of a group."""

    event: Event
    stream: _DbGroupStream
    seq: int
    token: str
    #: ``time.monotonic()`` when the lease was last set (claim or renewal).
    leased_at: float = 0.0

    def ack(self) -> None:
        """Done: the claim is deleted, so the group never sees the event again.

        Deferred by a few milliseconds and written together with other acknowledgements (or
        with the stream's next claim); ``close()`` writes what is still pending. Until it is
        written the event stays leased to this member, so at worst (a crash in between) it is
        delivered again: at-least-once.
        """
        self.stream._ack_later(self.seq)

    def renew(self) -> None:
        """Extend the lease by its full length from now (no-op if it was lost meanwhile)."""
        self.leased_at = time.monotonic()
        if not self.stream.provider._renew(self):
            logger.warning(
                "group %r lost the lease on event %s: it may be delivered again",
                self.stream.group, self.event.id, extra={"event_id": self.event.id},
            )


#: Acknowledgements written at once when this many are pending (else after _ACK_DELAY s).
_ACK_BATCH = 256
_ACK_DELAY = 0.005
#: A member that handed out its last batch within this many seconds claims twice as many
#: next time (at most `prefetch`); a slower one claims one at a time.
_PREFETCH_HORIZON = 0.05


class _DbGroupStream(Closeable):
    """One member of a consumer group (see :meth:`DatabaseProvider.group_stream`).

    Claims events in batches and hands them out one by one. The batch doubles (up to
    ``prefetch``) while each batch is handed out within ~50 ms and falls back to 1 otherwise,
    so an idle or slow member leases one event at a time and a busy one amortises the round
    trip over up to ``prefetch`` events. Leases count from the claim; a buffered delivery whose lease is
    half gone is renewed (with the rest of the buffer, one statement) before it is handed
    out, and dropped if the lease was lost meanwhile. Acknowledgements are deferred a few
    milliseconds and written in one statement, or with the next claim.
    """

    def __init__(
        self, provider: DatabaseProvider, group_id: int, group: str, pattern: str, lease: float,
        prefetch: int = 100,
    ) -> None:
        self.provider = provider
        self.group_id = group_id
        self.group = group
        self.pattern = pattern
        self.lease = lease
        self.prefetch = max(1, int(prefetch))
        self.wants = compile_pattern(pattern)
        self._closed = threading.Event()
        # Expired leases of dead members are noticed by looking: often enough for the lease.
        base = provider.idle_interval if provider.is_postgres else provider.poll_interval
        self._idle = max(0.05, min(base, lease / 4))
        self._buffer: deque[_DbDelivery] = deque()
        self._acks: builtins.list[int] = []
        self._acks_lock = threading.Lock()
        self._io = threading.RLock()  # one claim / ack write / buffer change at a time
        self._batch = 1
        self._handed = 0
        self._since = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def receive(self, timeout: float | None = None) -> _DbDelivery | None:
        """The next delivery, or ``None`` after ``timeout`` seconds.

        Raises:
            StopIteration: the stream (or its provider) was closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        soon = _Backoff(0.01, 0.25)
        p = self.provider
        while True:
            if self._closed.is_set() or p._closed:
                raise StopIteration
            gen = p._wake_gen
            delivery = self._next()
            if delivery is not None:
                return delivery
            added, again = p._fill(self)
            if added:
                soon.reset()
                continue
            wait = soon.next() if again else self._idle
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                wait = min(wait, remaining)
            p._wait_wake(gen, wait)

    def _next(self) -> _DbDelivery | None:
        """A buffered delivery (still leased), else the first of a freshly claimed batch."""
        with self._io:
            d = self._take_buffered()
            if d is not None:
                return d
            now = time.monotonic()
            if self._handed:  # the last batch is all out: was it quick?
                busy = now - self._since < _PREFETCH_HORIZON
                self._batch = min(self.prefetch, 2 * self._batch) if busy else 1
            with self._acks_lock:
                acks, self._acks = self._acks, []
            try:
                got = self.provider._claim_batch(self, self._batch, acks)
            except BaseException:
                self._restore_acks(acks)
                raise
            if got:
                self._handed, self._since = 0, now
                self._buffer.extend(got)
            return self._take_buffered()

    def _take_buffered(self) -> _DbDelivery | None:
        buf = self._buffer
        if not buf:
            return None
        if time.monotonic() - buf[0].leased_at > self.lease / 2:
            held = self.provider._relet_many(self, list(buf), self.lease)
            now = time.monotonic()
            kept = [d for d in buf if d.seq in held]
            for d in kept:
                d.leased_at = now
            buf.clear()
            buf.extend(kept)
            if not buf:
                return None
        self._handed += 1
        return buf.popleft()

    # -- acknowledgements --

    def _ack_later(self, seq: int) -> None:
        self._ack_later_many([seq])

    def _ack_later_many(self, seqs: builtins.list[int]) -> None:
        p = self.provider
        if self._closed.is_set():
            p._ack_many(self, seqs)  # after close: nothing will flush it later
            return
        with self._acks_lock:
            first = not self._acks
            self._acks.extend(seqs)
            n = len(self._acks)
        if first:
            with p._lock:
                p._acks_pending.add(self)
        if n >= _ACK_BATCH:
            self.flush_acks()
        elif first:
            p._ack_flusher().request()

    def _restore_acks(self, seqs: builtins.list[int]) -> None:
        if seqs:
            with self._acks_lock:
                self._acks[:0] = seqs

    def flush_acks(self) -> None:
        """Write the deferred acknowledgements now (one statement).

        Raises:
            ProviderError: the write failed; the acknowledgements stay pending.
        """
        p = self.provider
        with self._acks_lock:
            seqs, self._acks = self._acks, []
        if seqs:
            try:
                p._ack_many(self, seqs)
            except BaseException:
                self._restore_acks(seqs)
                raise
        with self._acks_lock:
            if not self._acks:
                with p._lock:
                    p._acks_pending.discard(self)

    def _flush_acks_or_warn(self) -> None:
        try:
            self.flush_acks()
        except Exception as exc:  # noqa: BLE001 - reported, never silent
            with self._acks_lock:
                n = len(self._acks)
            logger.warning(
                "group %r: %d acknowledgements could not be written (%s); those events "
                "will be delivered again when their leases end", self.group, n, exc,
            )

    def __iter__(self) -> Iterator[_DbDelivery]:
        while True:
            d = self.receive(None)
            if d is not None:
                yield d

    def close(self) -> None:
        """Leave the group: write pending acknowledgements, free the claims taken but never
        handed out; deliveries handed out but not acknowledged come back when their leases
        end."""
        if self._closed.is_set():
            return
        self._closed.set()
        p = self.provider
        with p._wake:
            p._wake.notify_all()
        with self._io:
            self._flush_acks_or_warn()
            unused, self._buffer = builtins.list(self._buffer), deque()
        if unused:
            try:
                p._relet_many(self, unused, 0.0)
            except Exception as exc:  # noqa: BLE001 - they come back when the leases end
                logger.debug("group %r: could not free %d claims: %s", self.group,
                             len(unused), exc)


class _AckFlusher(QuietThread):
    """Writes the deferred acknowledgements of a provider's group streams, ~5 ms after the
    first one of a batch arrived. A failed write keeps them pending and is retried."""

    def __init__(self, provider: DatabaseProvider) -> None:
        super().__init__(name=f"eventbroker-db-acks-{provider.table_name}", daemon=True)
        self.provider = provider
        self._cond = threading.Condition()
        self._asked = False
        self._stopping = False

    def request(self) -> None:
        with self._cond:
            self._asked = True
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self:
            self.join(timeout=10)

    def run(self) -> None:
        p = self.provider
        while True:
            with self._cond:
                while not self._asked and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._asked = False
                self._cond.wait(_ACK_DELAY)  # let a few gather (stop() cuts it short)
            with p._lock:
                streams = builtins.list(p._acks_pending)
            failed = False
            for s in streams:
                try:
                    s.flush_acks()
                except Exception as exc:  # noqa: BLE001 - kept pending, retried
                    failed = True
                    logger.warning("group %r: writing acknowledgements failed (%s); retrying",
                                   s.group, exc)
            if failed:
                with self._cond:
                    self._cond.wait(0.5)
                    self._asked = True


class _Listener(QuietThread):
    """The provider's reader: one thread, one dedicated LISTEN connection (PostgreSQL).

    Reads pages past its cursor and hands them to the provider's streams. Waits for a
    notification (or, in poll mode, ``poll_interval``); on any connection failure it backs
    off, reconnects and catches up from the cursor it kept, so nothing is lost or repeated.
    """

    def __init__(self, provider: DatabaseProvider, cursor: Cursor) -> None:
        super().__init__(name=f"eventbroker-db-listener-{provider.table_name}", daemon=True)
        self.provider = provider
        self.cursor = cursor
        self.mode = "connecting" if provider.is_postgres else "poll"
        self.backend_pid: int | None = None
        self.reconnects = 0
        #: Set by stream() when it opens the only stream: rows before it need not be read.
        self.jump: Cursor | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._conn: Any = None

    # -- control (other threads) --

    def kick(self) -> None:
        """Read now (a local write, a new stream)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def stop(self) -> None:
        self._stopping.set()
        self.kick()
        if threading.current_thread() is not self:
            self.join(timeout=10)
        for s in (self._wake_r, self._wake_w):
            s.close()

    # -- the loop --

    def run(self) -> None:
        retry = _Backoff(0.05, 5.0)
        first = True
        while not self._stopping.is_set():
            try:
                if self.provider.is_postgres and self.mode != "poll":
                    self._connect()
                if not first:
                    self.reconnects += 1
                first = False
                self._loop(retry)
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect and catch up
                if self._stopping.is_set():
                    break
                logger.warning(
                    "eventbroker listener on %s: %s; reconnecting and catching up from seq %s",
                    self.provider.address, exc, self.cursor[1],
                )
                self._close_conn()
                if self.mode == "notify":
                    self.mode = "connecting"
                self._sleep(retry.next())
        self._close_conn()

    def _loop(self, retry: _Backoff) -> None:
        # Held-back rows wait for some other transaction to end, usually a short one (a
        # status write, a claim): look again within milliseconds, then less often.
        soon = _Backoff(0.002, 0.25)
        while not self._stopping.is_set():
            held = self._drain()
            retry.reset()
            if self._notified():
                continue  # a wake-up arrived while reading: read again at once
            if held:
                timeout = soon.next()
            else:
                soon.reset()
                timeout = self.provider.idle_interval if self.mode == "notify" else self.provider.poll_interval
            self._wait(timeout)

    def _drain(self) -> bool:
        """Read every page past the cursor; True when rows are held back (look again soon)."""
        p = self.provider
        raw = self._conn if self.mode == "notify" else None
        while not self._stopping.is_set():
            with p._lock:
                if not any(not s.closed for s in p._streams):
                    # Nobody to deliver to (the listener only wakes group members): read
                    # nothing. The next stream's start point moves the cursor (see stream()).
                    return False
                jump, self.jump = self.jump, None
            if jump is not None and jump > self.cursor:
                self.cursor = jump
            page = p._read_page(self.cursor, p.page_size, raw)
            if page.events:
                self.cursor = page.cursor
                p._dispatch(page.events)
                p._retire_starts(self.cursor)
                with p._wake:
                    p._wake_gen += 1
                    p._wake.notify_all()
            else:
                self.cursor = page.cursor
            if not page.full:
                return page.held_back
        return False

    def _notified(self) -> bool:
        """Take the notifications already received (also those that came in while the
        connection ran a query, which psycopg keeps); True if there were any."""
        conn = self._conn
        if conn is None:
            return False
        got = False
        for _ in conn.notifies(timeout=0):
            got = True
        if got:
            p = self.provider
            with p._wake:  # group members wait on the same news
                p._wake_gen += 1
                p._wake.notify_all()
        return got

    def _wait(self, timeout: float) -> None:
        conn = self._conn
        fds: list[Any] = [self._wake_r]
        if conn is not None:
            fds.append(conn.fileno())
        ready, _, _ = select.select(fds, [], [], timeout)
        if self._wake_r in ready:
            self._drain_wake()
        if conn is not None:
            got = False
            for _ in conn.notifies(timeout=0):
                got = True
            if got:
                p = self.provider
                with p._wake:  # group members wait on the same news
                    p._wake_gen += 1
                    p._wake.notify_all()
            elif not ready:
                conn.execute("SELECT 1")  # idle: prove the connection is still alive

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            if select.select([self._wake_r], [], [], left)[0]:
                self._drain_wake()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass

    # -- the LISTEN connection --

    def _connect(self) -> None:
        p = self.provider
        self._close_conn()
        conn = _listen_connection(p.engine)
        if conn is None:
            logger.warning(
                "eventbroker: psycopg 3 is not available for LISTEN on %s; polling every %ss",
                p.address, p.poll_interval,
            )
            self.mode = "poll"
            return
        self._conn = conn
        quoted = p.engine.dialect.identifier_preparer.quote_identifier(p.channel)
        conn.execute(f"LISTEN {quoted}")
        token = f"selftest:{uuid.uuid4().hex}"
        self._send_selftest(conn, token)
        deadline = time.monotonic() + p.selftest_timeout
        while (left := deadline - time.monotonic()) > 0:
            if any(n.payload == token for n in conn.notifies(timeout=left, stop_after=1)):
                self.mode = "notify"
                self.backend_pid = conn.info.backend_pid
                return
        logger.warning(
            "eventbroker: the LISTEN connection to %s did not receive its own test notification "
            "within %ss (a pooler in transaction mode?); falling back to polling every %ss",
            p.address, p.selftest_timeout, p.poll_interval,
        )
        self._close_conn()
        self.mode = "poll"

    def _send_selftest(self, conn: Any, token: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (self.provider.channel, token))

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        self.backend_pid = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # best effort on a broken connection
                logger.debug("closing the LISTEN connection failed", exc_info=True)


def _listen_connection(engine: Engine) -> Any:
    """A dedicated autocommit psycopg 3 connection with the engine's connect arguments."""
    try:
        import psycopg
    except ImportError:
        return None
    if engine.dialect.driver == "psycopg":
        # A connection made exactly as the engine makes them, then taken out of its pool.
        raw = engine.raw_connection()
        conn: Any = raw.driver_connection
        raw.detach()
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
    else:
        args = engine.url.translate_connect_args(username="user", database="dbname")
        args.update({k: v for k, v in engine.url.query.items() if isinstance(v, str)})
        conn = psycopg.connect(**args)
    conn.autocommit = True
    conn.execute("SET application_name = 'eventbroker-listener'")
    return conn

