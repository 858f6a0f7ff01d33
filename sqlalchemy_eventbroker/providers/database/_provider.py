"""DatabaseProvider: the facade that ties the package's pieces together (see ``__init__``)."""

from __future__ import annotations

import builtins
import datetime as dt
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ...errors import ProviderError
from ...event import Event, EventStatus
from ...pattern import validate_pattern
from .._urls import redact_url
from ..base import EventFilter, ProviderBase, ProviderStats, StatusUpdate
from . import _audit
from ._codec import row_event, utc
from ._dialect import dialect_for
from ._engine import Database, ErrorTranslator, make_engine
from ._groups import DbGroupStream, GroupStore
from ._listener import Announcer, Listener
from ._reader import DbEventStream, FanOut, Start
from ._schema import (
    EventTables,
    build_tables,
    check_channel,
    check_table_name,
    stamp_head,
    version_table_name,
)
from ._wake import Waker

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

__all__ = ["DatabaseProvider"]

UTC = dt.UTC

#: How many ids of events stored by ``store`` (and not yet published) are remembered, so that
#: ``publish`` right after ``store`` does not write the row a second time.
_MAX_STORED_UNPUBLISHED = 100_000


class DatabaseProvider(ProviderBase):
    """Events in a database table; PostgreSQL LISTEN/NOTIFY wakes listeners, others poll.

    See the package docstring for guarantees, ordering, wake-ups and groups. Thread-safe.

    Args:
        engine_or_url: an ``Engine`` (not disposed by :meth:`close`) or a URL (the provider
            creates and owns its engine). Async URLs/engines are mapped to their sync driver.
        table_name: the events table; group state lives in ``<table>_groups``/``_claims``.
        channel: the PostgreSQL NOTIFY channel.
        poll_interval: seconds between reads when notifications are unavailable (other
            databases, or the LISTEN self-test failed).
        backstop_interval: PostgreSQL: longest wait of a listener or an idle group member
            before it reads again although no wake-up arrived. Wake-ups are sent after commit
            and can be lost (a crash between commit and announcement, an announcer that is
            reconnecting); this bounds the delay they cause, and nothing is ever lost. The
            default, 1 s, costs one cheap indexed read per second per provider (and per idle
            group member) while nothing happens, and bounds a lost wake-up's delay to 1 s.
        page_size: rows per read.
        group_prefetch: most events a group member claims per round trip (a busy member
            ramps up to it; a slow one takes one at a time).
        selftest_timeout: how long the listener waits for its own test notification.
        connect_timeout: seconds, for engines the provider creates.

    Raises:
        ConfigError: (a ``ValueError``) ``table_name`` is not a plain name or a name derived
            from it (``<table>_groups``, the version table, an index) would exceed
            PostgreSQL's 63 bytes (see ``_schema.check_table_name``: at most 35 characters),
            or ``channel`` is empty, holds U+0000 or has more than 63 bytes in UTF-8.
        ProviderError: the database is unreachable or rejects the credentials (the message
            says which and names the address, never the password).
    """

    def __init__(
        self,
        engine_or_url: str | sa.URL | Engine | Any,
        table_name: str = "events",
        channel: str = "eventbroker_events",
        *,
        poll_interval: float = 0.5,
        backstop_interval: float = 1.0,
        page_size: int = 500,
        group_prefetch: int = 100,
        selftest_timeout: float = 2.0,
        connect_timeout: float = 10.0,
    ) -> None:
        check_table_name(table_name)
        check_channel(channel)
        if poll_interval <= 0 or backstop_interval <= 0 or page_size < 1 or group_prefetch < 1:
            raise ValueError(
                "DatabaseProvider: intervals must be > 0, page_size and group_prefetch >= 1"
            )
        self.table_name = table_name
        self.channel = channel
        self.poll_interval = float(poll_interval)
        self.backstop_interval = float(backstop_interval)
        self.page_size = int(page_size)
        self.group_prefetch = int(group_prefetch)
        self.selftest_timeout = float(selftest_timeout)
        self.engine, self._owns_engine = make_engine(engine_or_url, connect_timeout)
        self.url = self.engine.url
        self.tables: EventTables = build_tables(table_name, self.engine.dialect.name)
        self._dialect = dialect_for(self.engine, self.tables)
        self._db = Database(
            self.engine, ErrorTranslator(self.address, table_name),
            serialise=self._is_memory_sqlite(), autocommit_single=self._dialect.autocommit_single,
        )
        self._lock = threading.RLock()
        self._closed = False
        self._waker = Waker()
        self._fanout = FanOut()
        self._listener: Listener | None = None
        self._announcer = (
            Announcer(self.engine, channel, table_name, self.address)
            if self._dialect.has_notify else None
        )
        self._groups = GroupStore(self._db, self._dialect, self.page_size, self._start_point,
                                  self._waker, self._announce)
        self._group_streams: weakref.WeakSet[DbGroupStream] = weakref.WeakSet()
        self._published = 0
        self._stored_unpublished: dict[str, None] = {}
        self._share_cache: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        with self._db.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    @property
    def dialect(self) -> str:
        """The database's dialect name (``postgresql``, ``sqlite``, ...)."""
        return self._dialect.name

    @property
    def address(self) -> str:
        """The database URL without its secrets (password, ``?password=``/``sslpassword=``)."""
        return redact_url(self.url.render_as_string(hide_password=False))

    def _repr_target(self) -> str:
        return f"{self.address!r}, table_name={self.table_name!r}"

    def _is_memory_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite" and self.url.database in (None, "", ":memory:")

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError(f"DatabaseProvider({self.address}) is closed")

    # -- schema ------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the events and group tables if missing (quick starts and tests).

        Also stamps the migrations' version table at head, so that running the migrations
        later finds the schema current. Production databases should use the migrations.
        """
        with self._db.begin() as conn:
            self.tables.metadata.create_all(conn)
            stamp_head(conn, self.table_name)

    def drop_schema(self) -> None:
        """Drop the events and group tables and their migration version table (tests)."""
        version = sa.Table(version_table_name(self.table_name), sa.MetaData(),
                           sa.Column("version_num", sa.String(32)))
        with self._db.begin() as conn:
            self.tables.metadata.drop_all(conn)
            version.drop(conn, checkfirst=True)  # quoted by SQLAlchemy, as every identifier

    # -- writing -----------------------------------------------------------------------

    def _write(self, events: Sequence[Event], origin: str) -> None:
        """ONE autocommit statement (PostgreSQL) inserting ``events``; an id already stored
        is replaced under a new ``seq``, so that it travels again."""
        self._check_open()
        self._dialect.check_ids(events)
        params = self._dialect.encode(events, origin)
        try:
            with self._db.one_statement() as conn:
                self._dialect.insert(conn, params)
        except ProviderError as exc:
            if not isinstance(exc.__cause__, sa_exc.IntegrityError):
                raise
            t = self.tables.events
            with self._db.begin() as conn:
                conn.execute(t.delete().where(t.c.id.in_([e.id for e in events])))
                self._dialect.insert(conn, params)

    def store(self, event: Event) -> None:
        """Insert ``event`` (a copy: later changes to the object are not seen).

        The row travels by being committed, so readers are woken as for a publish; a
        :meth:`publish` of the same event right after costs nothing. Storing an id that is
        already stored replaces that row under a new ``seq``.

        Raises:
            EventValidationError: on PostgreSQL, the id is not a UUID.
            PayloadError: the payload or metadata cannot be stored (names the event id).
            ProviderError: the database failed (a missing table says how to create it).
        """
        self._write((event,), "")
        with self._lock:
            self._stored_unpublished[event.id] = None
            while len(self._stored_unpublished) > _MAX_STORED_UNPUBLISHED:
                del self._stored_unpublished[next(iter(self._stored_unpublished))]
        self._announce()

    def publish(self, event: Event) -> None:
        """Make ``event`` travel to every stream and group on this database.

        An event this provider has just stored already travels (section 4's ``store`` then
        ``publish`` delivers once); any other is written now, replacing a stored row of the
        same id under a new ``seq`` (a redrive).
        """
        with self._lock:
            try:
                del self._stored_unpublished[event.id]
            except KeyError:
                pass
            else:
                self._published += 1
                return
        self.store_and_publish_many((event,))

    def store_and_publish_many(self, events: Sequence[Event], *, origin: str = "") -> None:
        """Insert ``events`` with ONE statement (its own transaction), then announce them.

        Ids already stored are replaced under a new ``seq`` and travel again. Streams opened
        with ``exclude_origin=origin`` skip these rows.

        Raises:
            EventValidationError, PayloadError, ProviderError: as :meth:`store`.
        """
        if not events:
            return
        self._write(events, origin)
        with self._lock:
            self._published += len(events)
            for e in events:  # travelling now: a later publish() of it is a redrive again
                self._stored_unpublished.pop(e.id, None)
        self._announce()

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None:
        """:meth:`update_status` for many events: ONE statement in one transaction.

        ``processing`` sets ``processed_at``; ``completed``/``failed`` set ``completed_at``
        (and ``processed_at`` when never set), timestamps from the moment of this call;
        ``retry_count`` only when given. Unknown ids are ignored; for an id given twice the
        last item wins.
        """
        self._check_open()
        latest: dict[str, StatusUpdate] = {}
        for u in updates:
            key = self._dialect.lookup_id(u.event_id)
            if key is not None:
                latest[key] = u
        if not latest:
            return
        with self._db.begin() as conn:
            self._dialect.update_status_many(conn, latest, dt.datetime.now(UTC))

    def delete(self, event_id: str) -> None:
        """Remove the stored event (unknown ids are ignored)."""
        self._check_open()
        key = self._dialect.lookup_id(event_id)
        if key is None:
            return
        t = self.tables.events
        with self._db.begin() as conn:
            conn.execute(t.delete().where(t.c.id == key))

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
        sqlite = b.get_backend_name() == "sqlite"
        same = (
            a.get_backend_name() == b.get_backend_name()
            and (a.host or "localhost") == (b.host or "localhost")
            and (a.port or 0) == (b.port or 0)
            and a.database == b.database
            and not (sqlite and a.database in (None, "", ":memory:"))
        )
        if same and sqlite and a.database:
            same = os.path.realpath(a.database) == os.path.realpath(b.database or "")
        self._share_cache[engine] = same
        return same

    def write_in_transaction(self, connection: Connection, events: Sequence[Event], *,
                             origin: str = "") -> None:
        """Insert ``events`` on ``connection``, inside its transaction: ONE statement.

        Isolated by the provider itself: on PostgreSQL with psycopg 3 a savepoint, the insert
        and its release travel in one round trip; elsewhere ``begin_nested()``. When the
        write fails only it is undone, the caller's transaction stays usable, and this
        raises. No wake-up is sent from inside the transaction: the rows become visible when
        the caller commits, and :meth:`announce_committed` then wakes the readers.

        Raises:
            EventValidationError, PayloadError: before any SQL (the transaction is untouched).
            ProviderError: the database refused the write (e.g. an id already stored).
        """
        if not events:
            return
        self._check_open()
        self._dialect.check_ids(events)
        params = self._dialect.encode(events, origin)
        with self._db.errors():
            self._dialect.write_isolated(connection, params)
        with self._lock:
            self._published += len(events)

    def announce_committed(self, events: Sequence[Event]) -> None:
        """The transaction that wrote ``events`` committed: wake the readers.

        Local readers wake at once; on PostgreSQL the announcer also sends one coalesced
        NOTIFY from its own connection. Never blocks on the database and never raises.
        """
        if events and not self._closed:
            self._announce()

    def _announce(self) -> None:
        self._waker.wake()
        listener = self._listener
        if listener is not None:
            listener.kick()
        if self._announcer is not None:
            self._announcer.announce()

    # -- reading -----------------------------------------------------------------------

    def get(self, event_id: str) -> Event | None:
        """The stored event with this id, or ``None``."""
        self._check_open()
        key = self._dialect.lookup_id(event_id)
        if key is None:
            return None
        t = self.tables.events
        with self._db.connect() as conn:
            row = conn.execute(sa.select(*self._dialect.event_cols).where(t.c.id == key)).first()
        return None if row is None else row_event(row)

    def list(self, filter: EventFilter | None = None) -> builtins.list[Event]:
        """Stored events that pass ``filter``, oldest first (``created_at``, then ``seq``).

        Conditions run in SQL on indexed columns where one exists (see ``_audit.py``);
        ``limit``/``offset`` apply in SQL.
        """
        return builtins.list(self.iter_events(filter))

    def iter_events(self, filter: EventFilter | None = None, *, page_size: int = 1000) -> Iterator[Event]:
        """Like :meth:`list`, but reads in pages of ``page_size`` rows (keyset pagination on
        ``(created_at, seq)``), so memory stays flat for any number of rows (``replay``)."""
        self._check_open()
        return _audit.iter_events(self._db, self._dialect, filter or EventFilter(), page_size)

    def purge(
        self,
        older_than: dt.datetime | dt.timedelta | float,
        statuses: Sequence[EventStatus | str] | None = (EventStatus.COMPLETED, EventStatus.FAILED),
        *,
        batch_size: int = 10_000,
    ) -> int:
        """Delete events that finished before ``older_than`` and return how many.

        ``older_than`` is a cutoff time, or an age (``timedelta`` or seconds) counted back
        from now. An event's time is its ``completed_at``, or ``created_at`` when it never
        finished. ``statuses=None`` purges every status. Deletes in batches of
        ``batch_size`` rows, each its own transaction, so a large purge never holds long locks.
        """
        self._check_open()
        if isinstance(older_than, dt.datetime):
            cutoff = utc(older_than)
        elif isinstance(older_than, dt.timedelta):
            cutoff = dt.datetime.now(UTC) - older_than
        else:
            cutoff = dt.datetime.now(UTC) - dt.timedelta(seconds=float(older_than))
        assert cutoff is not None
        return _audit.purge(self._db, self._dialect, cutoff, statuses, batch_size)

    def stats(self) -> ProviderStats:
        """Counts by status (one query), and what this provider carried."""
        self._check_open()
        t = self.tables.events
        with self._db.connect() as conn:
            counts: dict[str, int] = dict(
                conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status)).all()
            )
        listener, announcer = self._listener, self._announcer
        with self._lock:
            active = self._fanout.open_count() + sum(
                1 for g in builtins.list(self._group_streams) if not g.closed
            )
            published = self._published
        return ProviderStats(
            provider_type="database",
            total_events=sum(counts.values()),
            pending_events=counts.get("pending", 0),
            processing_events=counts.get("processing", 0),
            completed_events=counts.get("completed", 0),
            failed_events=counts.get("failed", 0),
            events_published=published,
            events_consumed=self._fanout.delivered + self._groups.consumed,
            active_subscribers=active,
            provider_specific={
                "dialect": self.dialect,
                "table": self.table_name,
                "channel": self.channel,
                "listener": listener.mode if listener else "stopped",
                "listener_pid": listener.backend_pid if listener else None,
                "listener_reconnects": listener.reconnects if listener else 0,
                "cursor_seq": listener.cursor[1] if listener else None,
                "announcer_pid": announcer.backend_pid if announcer else None,
                "announcements": announcer.sent if announcer else 0,
            },
        )

    # -- fan-out streams ---------------------------------------------------------------

    def _start_point(self) -> Start:
        with self._db.connect() as conn:
            conn.execute(sa.select(self.tables.events.c.seq).limit(0))  # a missing table fails here
            return self._dialect.start_point(conn)

    def _read_page(self, cursor: tuple[int, int], limit: int) -> Any:
        with self._db.connect() as conn:
            return self._dialect.read_page(conn, cursor, limit)

    def stream(self, pattern: str, *, exclude_origin: str = "") -> DbEventStream:
        """Every matching event committed after this call, once, in commit order; rows
        written with ``origin == exclude_origin`` are skipped.

        Raises:
            PatternError: the pattern is malformed.
            ProviderError: the database or the table is missing.
        """
        validate_pattern(pattern)
        self._check_open()
        listener = self._ensure_listener()
        stream = DbEventStream(pattern, exclude_origin, on_close=self._fanout.forget)
        self._fanout.register(stream, self._start_point)
        listener.kick()
        return stream

    def _ensure_listener(self) -> Listener:
        with self._lock:
            self._check_open()
            if self._listener is None:
                d = self._dialect
                listener = Listener(
                    fanout=self._fanout, waker=self._waker, read_page=self._read_page,
                    read_page_raw=d.read_page_raw if d.has_notify else None,
                    engine=self.engine if d.has_notify else None, channel=self.channel,
                    address=self.address, cursor=self._start_point().cursor(),
                    page_size=self.page_size, poll_interval=self.poll_interval,
                    backstop_interval=self.backstop_interval,
                    selftest_timeout=self.selftest_timeout,
                )
                listener.start()
                self._listener = listener
            return self._listener

    # -- groups ------------------------------------------------------------------------

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0,
                     ordered: bool = False) -> DbGroupStream:
        """Join the consumer group ``(group, pattern)``, creating it at the tail if new.

        ``ordered``: take a claim only when no older claim of the same key is left in the
        group, so no two members hold one key and a key goes oldest first (every member of
        the group should ask for it).

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
        if self._dialect.has_notify:
            self._ensure_listener()  # its notifications wake the members
        group_id = self._groups.open(group, pattern)
        idle = self.backstop_interval if self._dialect.has_notify else self.poll_interval
        stream = DbGroupStream(
            self._groups, self._waker, group_id, group, pattern, float(lease),
            prefetch=self.group_prefetch, idle=idle, provider_closed=lambda: self._closed,
            ordered=ordered,
        )
        with self._lock:
            self._group_streams.add(stream)
        return stream

    def drop_group(self, group: str, pattern: str) -> None:
        """Forget a consumer group: its cursor and unfinished claims."""
        self._check_open()
        self._groups.drop(group, pattern)

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the listener and the announcer, end open streams, and dispose the engine if
        the provider made it. Idempotent; other calls afterwards raise :class:`ProviderError`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listener, self._listener = self._listener, None
            groups = builtins.list(self._group_streams)
        self._fanout.close_all()
        for g in groups:
            g.close()
        self._groups.close()
        self._waker.close()
        if listener is not None:
            listener.stop()
        if self._announcer is not None:
            self._announcer.stop()
        if self._owns_engine:
            self.engine.dispose()
