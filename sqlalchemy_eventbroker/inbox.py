"""Inbox: exactly-once effects for handlers that write to a database.

Delivery is at least once (a redelivery after a crash, a group's lease running out, a retry), so
a handler that writes rows can apply one event twice. The inbox pattern fixes that where the
effect lives: the handler's own transaction also inserts ``(consumer, event id)`` into an inbox
table whose primary key is exactly that pair, so the record and the work commit or roll back
together::

    inbox = Inbox(session_factory, consumer="billing")

    @inbox.handler
    def on_order(event, session):          # runs inside one transaction
        session.add(Invoice(order_id=event.payload["id"]))

    broker.subscribe("public.orders.create", on_order, group="billing")

How one delivery runs (:meth:`Inbox.handler`):

1. open a session from the factory and begin a transaction;
2. ``INSERT`` the inbox row first, with ``ON CONFLICT DO NOTHING`` on PostgreSQL and SQLite
   (a savepoint and the unique violation elsewhere). No row inserted means the event was
   already handled for this consumer: commit nothing, return without calling the function;
3. call the function with the event and the session;
4. commit both; if the function raised, roll back both and let the exception propagate, so the
   broker retries (the event is not recorded, so the retry runs the function again).

Concurrent deliveries of one event never both run the function, and there is no window between
a check and an insert: the primary key decides. On PostgreSQL (READ COMMITTED) the second
``INSERT`` waits on the first transaction's uncommitted row; when that commits, it inserts
nothing and the loser returns; when it rolls back, the loser's row goes in and it does the work.
Under REPEATABLE READ or SERIALIZABLE the loser gets a serialization failure instead, which is
raised (the broker retries, and the retry is skipped). On SQLite writers are serialised by the
database lock.

Sessions: a ``sessionmaker`` (or any callable returning a :class:`~sqlalchemy.orm.Session`)
gives a sync inbox, an ``async_sessionmaker`` an async one whose wrapped handler is an
``async def`` (the broker runs it on its event loop). The function must not commit or roll back
the session itself; the inbox owns the transaction.

The table (``eventbroker_inbox`` unless ``table_name``) comes from the migrations (revision
``0004_inbox``) or from :meth:`Inbox.create_schema`; :meth:`Inbox.purge` keeps it bounded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast, overload

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from .errors import ConfigError, ProviderError
from .event import Event
from .providers.database._schema import check_table_name

__all__ = ["Inbox", "build_inbox_table"]

logger = logging.getLogger(__name__)

#: Longest consumer name (and longest event id) the table holds.
NAME_LIMIT = 255

SyncFunction = Callable[[Event, Session], object]
AsyncFunction = Callable[[Event, AsyncSession], Awaitable[object]]


def build_inbox_table(table_name: str = "eventbroker_inbox",
                      metadata: sa.MetaData | None = None) -> sa.Table:
    """The inbox table: one row per ``(consumer, event_id)`` handled, with when.

    Migration ``0004_inbox`` spells the same table out (frozen); ``tests/migrations`` check
    that the two agree. The index on ``processed_at`` serves :meth:`Inbox.purge`.
    """
    t = table_name
    return sa.Table(
        t,
        metadata if metadata is not None else sa.MetaData(),
        sa.Column("consumer", sa.String(NAME_LIMIT), nullable=False),
        sa.Column("event_id", sa.String(NAME_LIMIT), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "event_id", name=f"pk_{t}"),
        sa.Index(f"ix_{t}_processed_at", "processed_at"),
    )


def _check_consumer(consumer: object) -> str:
    if not isinstance(consumer, str) or not consumer.strip() or "\x00" in consumer:
        raise ConfigError(
            f"consumer: {repr(consumer)[:80]} must be a non-empty string without U+0000",
            path="consumer")
    if len(consumer) > NAME_LIMIT:
        raise ConfigError(
            f"consumer: {consumer[:20]!r}... has {len(consumer)} characters, over the limit of "
            f"{NAME_LIMIT}", path="consumer")
    return consumer


def _seconds(older_than: object) -> float:
    if isinstance(older_than, dt.timedelta):
        seconds = older_than.total_seconds()
    elif isinstance(older_than, int | float) and not isinstance(older_than, bool):
        seconds = float(older_than)
    else:
        raise ConfigError(
            f"older_than: expected seconds (a number) or a timedelta, got {older_than!r}",
            path="older_than")
    if not seconds >= 0:  # also refuses NaN
        raise ConfigError(f"older_than: must be >= 0 seconds, got {older_than!r}",
                          path="older_than")
    return seconds


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Inbox:
    """Records which events ``consumer`` has handled, in the handler's own transaction.

    Args:
        session_factory: a ``sessionmaker`` (or a callable returning a ``Session``) for a
            sync inbox, or an ``async_sessionmaker`` for an async one. Each delivery opens one
            session from it and closes it.
        consumer: who handles; the same event is handled once per consumer (use one name per
            effect, say the group name). At most 255 characters.
        table_name: the inbox table; several consumers share one table.

    Thread-safe: the wrapped handler opens its own session per call, so a broker's worker
    threads may run it concurrently. An async inbox's handlers run on the broker's event loop
    (a thread of its own when the application is sync); pooled async connections are bound
    to the loop that opened them, so give the inbox an engine of its own (or ``NullPool``)
    when the application also uses that engine on another loop.

    Raises:
        ConfigError: (a ``ValueError``) an empty or overlong ``consumer``, a ``table_name``
            that is not a plain identifier, or a ``session_factory`` that is not callable.
    """

    def __init__(self, session_factory: Callable[[], Session] | async_sessionmaker[Any], *,
                 consumer: str, table_name: str = "eventbroker_inbox") -> None:
        if not callable(session_factory):
            raise ConfigError(
                f"session_factory: expected a sessionmaker or async_sessionmaker, got "
                f"{type(session_factory).__name__}", path="session_factory")
        self.consumer = _check_consumer(consumer)
        self.table_name = check_table_name(table_name)
        #: True for an ``async_sessionmaker``: handlers, schema and purge are coroutines.
        self.is_async = isinstance(session_factory, async_sessionmaker)
        self._factory = session_factory
        self.metadata = sa.MetaData()
        self.table = build_inbox_table(table_name, self.metadata)

    def __repr__(self) -> str:
        kind = "async" if self.is_async else "sync"
        return f"Inbox(consumer={self.consumer!r}, table_name={self.table_name!r}, {kind})"

    # -- the handler ---------------------------------------------------------------------

    @overload
    def handler(self, fn: AsyncFunction) -> Callable[[Event], Awaitable[None]]: ...
    @overload
    def handler(self, fn: SyncFunction) -> Callable[[Event], None]: ...

    def handler(
        self, fn: SyncFunction | AsyncFunction
    ) -> Callable[[Event], None] | Callable[[Event], Awaitable[None]]:
        """Wrap ``fn(event, session)`` into a broker handler ``handler(event)`` with one effect
        per event for this consumer.

        The wrapper opens a session and a transaction, inserts ``(consumer, event.id)``, calls
        ``fn`` and commits both. An event already recorded is skipped without calling ``fn``
        (also when a concurrent delivery recorded it first: the loser returns quietly). If
        ``fn`` raises, both roll back and the exception propagates, so the broker retries.

        On an async inbox the wrapper is an ``async def`` and ``fn`` is awaited when it returns
        an awaitable (an ``async def`` handler; a plain function may still ``session.add``).

        Raises:
            ConfigError: ``fn`` is not callable, or is an ``async def`` on a sync inbox (it
                would never be awaited inside the transaction).
            ProviderError: (from the wrapper) the inbox insert failed, for instance because
                the table is missing; ``fn``'s own exceptions propagate unchanged.
        """
        if not callable(fn):
            raise ConfigError(f"handler: expected a callable, got {type(fn).__name__}",
                              path="handler")
        if self.is_async:
            return self._async_handler(cast(AsyncFunction, fn))
        if inspect.iscoroutinefunction(fn):
            raise ConfigError(
                f"handler: {fn.__qualname__} is async but this inbox has a sync session "
                f"factory; pass an async_sessionmaker", path="handler")
        return self._sync_handler(cast(SyncFunction, fn))

    def _sync_handler(self, fn: SyncFunction) -> Callable[[Event], None]:
        factory = cast(Callable[[], Session], self._factory)

        @functools.wraps(fn)
        def run(event: Event) -> None:
            with factory() as session, session.begin():
                if not self._record(session, event.id):
                    self._log_skip(event)
                    return
                fn(event, session)

        return run

    def _async_handler(self, fn: AsyncFunction) -> Callable[[Event], Awaitable[None]]:
        factory = cast(async_sessionmaker[AsyncSession], self._factory)

        @functools.wraps(fn)
        async def run(event: Event) -> None:
            async with factory() as session, session.begin():
                if not await self._arecord(session, event.id):
                    self._log_skip(event)
                    return
                result = fn(event, session)
                if inspect.isawaitable(result):
                    await result

        return run

    def _log_skip(self, event: Event) -> None:
        logger.debug("inbox %s: event %s already handled, skipped", self.consumer, event.id,
                     extra={"event_id": event.id})

    # -- recording -----------------------------------------------------------------------

    def _insert(self, dialect: str, event_id: str) -> tuple[sa.Executable, bool]:
        """The inbox INSERT for ``dialect``, and whether it ignores a conflict by itself."""
        values = {"consumer": self.consumer, "event_id": event_id, "processed_at": _now()}
        # RETURNING says whether the row went in: psycopg reports rowcount -1 for
        # SQLAlchemy's compiled INSERTs, so the count cannot be trusted.
        t = self.table
        if dialect == "postgresql":
            upsert: sa.Insert = pg.insert(t).values(values).on_conflict_do_nothing()
        elif dialect == "sqlite":
            upsert = sqlite.insert(t).values(values).on_conflict_do_nothing()
        else:
            return t.insert().values(values), False
        return upsert.returning(t.c.event_id), True

    def _record(self, session: Session, event_id: str) -> bool:
        """Insert the inbox row; False when it was already there (nothing inserted)."""
        stmt, ignores = self._insert(session.get_bind(clause=self.table).dialect.name, event_id)
        with self._translate():
            if ignores:
                return session.execute(stmt).first() is not None
            try:
                with session.begin_nested():
                    session.execute(stmt)
            except sa_exc.IntegrityError:
                return False
            return True

    async def _arecord(self, session: AsyncSession, event_id: str) -> bool:
        stmt, ignores = self._insert(session.get_bind(clause=self.table).dialect.name, event_id)
        with self._translate():
            if ignores:
                return (await session.execute(stmt)).first() is not None
            try:
                async with session.begin_nested():
                    await session.execute(stmt)
            except sa_exc.IntegrityError:
                return False
            return True

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        """Database errors of the inbox's own statements become a :class:`ProviderError`
        naming the inbox (a missing table says how to create it). Never wraps ``fn``: the
        handler's own errors propagate unchanged."""
        try:
            yield
        except sa_exc.DBAPIError as exc:
            message = " ".join(str(exc.orig).split())
            if "no such table" in message or "does not exist" in message:
                message += " (create it: inbox.create_schema() or `eventbroker migrate upgrade`)"
            raise ProviderError(
                f"inbox {self.table_name!r} (consumer {self.consumer!r}): "
                f"{type(exc.orig).__name__}: {message}") from exc

    # -- schema and purge ----------------------------------------------------------------

    def _purge_stmt(self, older_than: object, batch_size: int) -> sa.Delete:
        """One batch: at most ``batch_size`` of this consumer's rows older than the cutoff
        (found through the ``processed_at`` index), so no delete holds long locks."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size: expected int >= 1, got {batch_size!r}",
                              path="batch_size")
        cutoff = _now() - dt.timedelta(seconds=_seconds(older_than))
        t = self.table
        old = (sa.select(t.c.event_id)
               .where(t.c.consumer == self.consumer, t.c.processed_at < cutoff)
               .limit(batch_size))
        return t.delete().where(t.c.consumer == self.consumer, t.c.event_id.in_(old))

    def _sync_factory(self, method: str) -> Callable[[], Session]:
        if self.is_async:
            raise ConfigError(
                f"{method}: this inbox has an async_sessionmaker; use await inbox.a{method}()",
                path=method)
        return cast(Callable[[], Session], self._factory)

    def _async_factory(self, method: str) -> async_sessionmaker[AsyncSession]:
        if not self.is_async:
            raise ConfigError(
                f"a{method}: this inbox has a sync session factory; use inbox.{method}()",
                path=method)
        return cast(async_sessionmaker[AsyncSession], self._factory)

    def create_schema(self) -> None:
        """Create the inbox table and its index if missing (quick starts and tests; production
        databases use the migrations, which create ``eventbroker_inbox``).

        Raises:
            ConfigError: the inbox is async (use :meth:`acreate_schema`).
            ProviderError: the database failed.
        """
        factory = self._sync_factory("create_schema")
        with self._translate(), factory() as session, session.begin():
            self.metadata.create_all(session.connection(bind_arguments={"clause": self.table}))

    async def acreate_schema(self) -> None:
        """:meth:`create_schema` for an async inbox."""
        factory = self._async_factory("create_schema")
        with self._translate():
            async with factory() as session, session.begin():
                conn = await session.connection(bind_arguments={"clause": self.table})
                await conn.run_sync(self.metadata.create_all)

    def purge(self, older_than: float | dt.timedelta, *, batch_size: int = 10_000) -> int:
        """Delete this consumer's inbox rows recorded more than ``older_than`` ago (seconds or
        a ``timedelta``); returns how many were deleted. Deletes ``batch_size`` rows per
        transaction, so a large purge never holds long locks.

        Keep ``older_than`` well beyond the longest time an event can still be redelivered
        (retries, leases, a replay): a purged record no longer stops a duplicate.

        Raises:
            ConfigError: ``older_than`` is negative or not a number or ``timedelta``,
                ``batch_size`` is below 1; the inbox is async (use :meth:`apurge`).
            ProviderError: the database failed.
        """
        stmt = self._purge_stmt(older_than, batch_size)
        factory = self._sync_factory("purge")
        total = 0
        with self._translate():
            while True:
                with factory() as session, session.begin():
                    deleted = cast("sa.CursorResult[Any]", session.execute(stmt)).rowcount
                total += deleted
                if deleted < batch_size:
                    return total

    async def apurge(self, older_than: float | dt.timedelta, *, batch_size: int = 10_000) -> int:
        """:meth:`purge` for an async inbox."""
        stmt = self._purge_stmt(older_than, batch_size)
        factory = self._async_factory("purge")
        total = 0
        with self._translate():
            while True:
                async with factory() as session, session.begin():
                    result = await session.execute(stmt)
                deleted = cast("sa.CursorResult[Any]", result).rowcount
                total += deleted
                if deleted < batch_size:
                    return total
