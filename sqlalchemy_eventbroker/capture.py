"""ORM capture: every create, read, update and delete made through a session becomes an event.

``register_crud_hooks(session_factory, config, broker=...)`` attaches SQLAlchemy session and
mapper listeners; ``handle.remove()`` detaches exactly those. The path of a write event:

1. ``after_flush`` (``SessionEvents``) reads the unit of work it just executed:
   ``session.new`` → ``create``, ``session.dirty`` with changed columns → ``update``,
   ``session.deleted`` → ``delete``. At this point the INSERT/UPDATE/DELETE statements have
   run (generated keys and RETURNING-fetched server defaults are on the instances) while
   attribute history still holds the values before the flush, which gives ``update`` its
   ``metadata["changes"]`` and ``delete`` the row as it was, without any extra SELECT.
   ORM bulk statements (``session.execute(update(Model)...)``, ``delete(...)``,
   ``insert(Model)`` with a list of dicts) never reach the unit of work; ``do_orm_execute``
   captures them (see "Bulk statements" below).
2. The events wait on the session, in a bucket per transaction: the root transaction or
   the innermost savepoint (``begin_nested``). Releasing a savepoint moves its events to
   the enclosing bucket; rolling it back drops them (``after_commit`` fires for a savepoint
   release too, which is how a release is told from a rollback in
   ``after_transaction_end``).
3. Outbox seam: when ``broker.provider`` implements ``TransactionalProvider`` and
   ``shares_transaction(session.connection())`` (asked once per transaction), each flush's
   events are handed to ``write_in_transaction(connection, events)`` before commit, inside a
   SAVEPOINT of their own (capture's ``begin_nested()``, or the provider's own when the class
   defining ``write_in_transaction`` declares ``write_in_transaction_is_isolated = True``, as
   ``DatabaseProvider`` does: it pipelines savepoint, insert and release in one round trip),
   so a failing write rolls back only itself: the user's transaction goes on, and those
   events fall back to being stored by the broker after commit (logged and counted).
   ``broker.note_own(ids)`` runs first so the broker's receiver skips the echo.
4. ``after_commit`` of the root transaction hands everything, in flush order, to
   ``broker.publish_captured(events, stored=...)``; a rollback publishes nothing.

Payloads. ``payload`` maps column keys to values, JSON-encoded like ``Event.set_payload``
(bytes become base64 text; a value JSON cannot hold becomes its ``str``). Server-generated
keys and defaults are present when SQLAlchemy fetched them during the flush, which is the
default on PostgreSQL and SQLite ≥ 3.35 (``eager_defaults="auto"`` fetches INSERT defaults
with RETURNING); a server value SQLAlchemy left expired (``eager_defaults=False``, a
``server_onupdate`` column on UPDATE) is left out of the payload instead of being fetched with
a SELECT per row. Columns that were never loaded (deferred) are left out too.

Semantics worth knowing:

* One event per flushed instance. Joined-table inheritance gives one event per instance whose
  ``entity`` is the instance's own (most specific) table and whose payload holds the columns of
  every table in its hierarchy; single-table inheritance uses the shared table.
* An object inserted and then changed in the same transaction gives ``create`` then
  ``update`` when a flush happened in between, one ``create`` with the final values otherwise.
* ``merge`` produces what it flushes: ``create`` for a new row, ``update`` for changed columns.
* ORM cascaded deletes produce a ``delete`` per child; rows removed by the database's own
  ``ON DELETE CASCADE`` (``passive_deletes=True``) are invisible to the ORM and produce none.
* Within one flush, inserts and updates come in table dependency order (parents first), then
  deletes in reverse order (children first); flushes follow each other.

Bulk statements (``do_orm_execute``): with ``update_returning`` / ``delete_returning`` /
``insert_executemany_returning`` (PostgreSQL, SQLite ≥ 3.35) the statement gets
``RETURNING`` of every column of its table, which yields one event per affected row in the
same round trip; the caller gets back a result without rows whose ``rowcount`` is the number
of affected rows. Bulk events have ``metadata["bulk"] = True``. A bulk ``update`` carries
the new row and ``metadata["changes"]`` with
``{"new": ...}`` for the columns it sets (an UPDATE does not read the old values; use the unit
of work when you need them). Without RETURNING (other dialects, joined inheritance, the ORM
"bulk UPDATE by primary key" form with a list of dicts), events are built from the
statement's parameters: the values you passed, keys included only if you passed them. An
UPDATE/DELETE with a WHERE clause on a dialect without RETURNING is run first as a
``SELECT ... FOR UPDATE`` of the affected rows (one extra statement per bulk statement).
A statement that already has ``RETURNING`` is left alone; its rows are read (the result is
buffered) and the events hold what it returns.

Read events (``enable_read``) are one per instance loaded from a row by a query of a captured
session (the ``load`` instance event): first load into the session's identity map or
``populate_existing``. Objects already in the identity map, refreshes of expired attributes and
``session.refresh`` produce none. They are published immediately, one at a time, outside the
transaction's life; the cost is one event per loaded object, so enable them deliberately.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import datetime as dt
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, Self

from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import Mapper, Session, scoped_session, sessionmaker
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import NEVER_SET as _NEVER_SET
from sqlalchemy.orm.base import NO_VALUE as _NO_VALUE
from sqlalchemy.sql.schema import Column, Table

from . import _json
from ._types import JSON
from .errors import PayloadError
from .event import Event, EventSource, EventStatus, uuid7
from .providers.base import TransactionalProvider

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.orm import ORMExecuteState, SessionTransaction
    from sqlalchemy.orm.state import InstanceState

    from .broker import Broker

__all__ = ["CRUDHookConfig", "CaptureHandle", "EventContext", "event_context",
           "register_crud_hooks"]

log = logging.getLogger(__name__)

UTC = dt.UTC
_DATABASE = EventSource.DATABASE
_PENDING = EventStatus.PENDING
_SCALARS = frozenset((str, int, bool, float, type(None)))
_MISSING: Any = object()
_DEFAULT_SCHEMAS = {"postgresql": "public", "sqlite": "main"}


_ISOLATION: dict[type, bool] = {}


def _isolates_itself(provider: object) -> bool:
    """Whether ``provider.write_in_transaction`` wraps itself in a savepoint (then capture
    adds none: on PostgreSQL the provider sends savepoint, insert and release in one round
    trip, where capture's ``begin_nested()`` costs two more).

    The class that defines ``write_in_transaction`` must itself declare
    ``write_in_transaction_is_isolated`` (an attribute or property, True): a subclass that
    overrides the method without declaring it again is protected by capture's savepoint, as
    any other provider.
    """
    cls = type(provider)
    declared = _ISOLATION.get(cls)
    if declared is None:
        declared = False
        for klass in cls.__mro__:
            if "write_in_transaction" in vars(klass):
                declared = "write_in_transaction_is_isolated" in vars(klass)
                break
        _ISOLATION[cls] = declared
    # The declaration may be a property (DatabaseProvider: only on PostgreSQL).
    return declared and getattr(provider, "write_in_transaction_is_isolated", False) is True


# -- configuration -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CRUDHookConfig:
    """Which operations ``register_crud_hooks`` turns into events.

    The four switches may be given by position; the rest by keyword only.
    """

    #: ``create`` events for inserted rows.
    enable_create: bool = True
    #: ``read`` events for rows loaded by queries (high volume: off by default).
    enable_read: bool = False
    #: ``update`` events for rows whose columns changed.
    enable_update: bool = True
    #: ``delete`` events for deleted rows.
    enable_delete: bool = True
    _: KW_ONLY
    #: Capture only these tables (names, or ``schema.name``); ``None`` captures every table.
    include: frozenset[str] | None = None
    #: Never capture these tables (names, or ``schema.name``).
    exclude: frozenset[str] = frozenset()
    #: Capture ORM bulk ``insert``/``update``/``delete`` statements run through the session.
    capture_bulk: bool = True
    #: Wrap each outbox write in a SAVEPOINT so a failing write never aborts the user's
    #: transaction. Turn off only for a provider whose writes cannot fail (saves two
    #: round trips per flush). Providers that declare ``write_in_transaction_is_isolated``
    #: (``DatabaseProvider``) protect the write themselves, more cheaply; capture then adds
    #: no savepoint of its own.
    outbox_savepoint: bool = True

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                raise TypeError(f"CRUDHookConfig.{name}: expected a collection of table "
                                f"names, got the string {value!r}")
            object.__setattr__(self, name, frozenset(value))

    def captures(self, table: Table) -> bool:
        """Whether events are built for rows of ``table``."""
        names = (table.name, table.fullname)
        if self.include is not None and not any(n in self.include for n in names):
            return False
        return not any(n in self.exclude for n in names)


# -- who did it: event_context -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventContext:
    """Who and why, attached to every event built while it is current."""

    user_id: int | None = None
    session_id: str = ""
    metadata: Mapping[str, JSON] = field(default_factory=dict)


_current: contextvars.ContextVar[EventContext | None] = contextvars.ContextVar(
    "sqlalchemy_eventbroker_event_context", default=None
)


@contextlib.contextmanager
def event_context(
    user_id: int | None = None,
    session_id: str = "",
    metadata: Mapping[str, object] | None = None,
) -> Iterator[EventContext]:
    """Fill ``user_id``, ``session_id`` and ``metadata`` of the events captured inside.

    A ``contextvars`` variable carries it, so each thread and each asyncio task sees its own
    (a task started inside inherits a copy). Contexts nest: an inner one overrides the
    ``user_id``/``session_id`` it gives and adds its metadata keys to the outer ones.
    Values are read when a flush builds the events, so keep the commit inside the block.
    Without a context, ``session.info["user_id"]`` and ``session.info["session_id"]`` are used.

    Raises:
        PayloadError: ``metadata`` holds something JSON cannot represent.
    """
    outer = _current.get()
    meta: dict[str, JSON] = dict(outer.metadata) if outer is not None else {}
    if metadata:
        meta.update(_json.to_jsonable(dict(metadata), "metadata"))  # type: ignore[arg-type]
    ctx = EventContext(
        user_id if user_id is not None else (outer.user_id if outer is not None else None),
        session_id or (outer.session_id if outer is not None else ""),
        meta,
    )
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def _who(session: Session) -> tuple[int | None, str, Mapping[str, JSON]]:
    ctx = _current.get()
    user_id: Any = None
    session_id = ""
    meta: Mapping[str, JSON] = {}
    if ctx is not None:
        user_id, session_id, meta = ctx.user_id, ctx.session_id, ctx.metadata
    if user_id is None or not session_id:
        info = session.info
        if user_id is None:
            user_id = info.get("user_id")
        if not session_id:
            session_id = str(info.get("session_id") or "")
    if user_id is not None and (type(user_id) is not int):
        try:
            user_id = int(user_id)
        except (TypeError, ValueError):
            log.warning("eventbroker: user_id %r is not an int; events carry none", user_id)
            user_id = None
    return user_id, session_id, meta


# -- per-mapper and per-table facts, computed once -----------------------------------------


class _Target:
    """What events of one mapper (or plain table) need: names, columns, order."""

    __slots__ = ("captured", "cols", "entity", "mapper", "null_on_create", "rank", "schema",
                 "table", "types")

    def __init__(self, table: Table, mapper: Mapper[Any] | None, config: CRUDHookConfig) -> None:
        self.table = table
        self.mapper = mapper
        self.entity = table.name
        self.schema = table.schema
        self.captured = config.captures(table)
        #: ``(attribute key, payload key)`` for every column attribute (all tables of an
        #: inheritance hierarchy), payload key = the column key.
        if mapper is not None:
            self.cols: tuple[tuple[str, str], ...] = tuple(
                (prop.key, prop.columns[0].key) for prop in mapper.column_attrs
            )
        else:
            self.cols = tuple((c.key, c.key) for c in table.columns)
        #: Columns an INSERT that did not mention them leaves NULL (no server-side value), so
        #: a new instance without the attribute loaded holds NULL there: no need to fetch.
        if mapper is not None:
            self.null_on_create = frozenset(
                prop.columns[0].key for prop in mapper.column_attrs
                if all(_plain_nullable(c) for c in prop.columns)
            )
        else:
            self.null_on_create = frozenset(c.key for c in table.columns if _plain_nullable(c))
        self.rank = _table_rank(table)
        #: ``{default schema: {operation: (schema, type)}}``.
        self.types: dict[str | None, dict[str, tuple[str, str]]] = {}

    def type_for(self, dialect: Dialect, operation: str) -> tuple[str, str]:
        default = dialect.default_schema_name
        by_op = self.types.get(default)
        if by_op is None:
            schema = self.schema or default or _DEFAULT_SCHEMAS.get(dialect.name, "") or "default"
            by_op = self.types[default] = {
                op: (schema, f"{schema}.{self.entity}.{op}")
                for op in ("create", "read", "update", "delete")
            }
        return by_op[operation]


def _plain_nullable(col: Any) -> bool:
    return bool(isinstance(col, Column) and col.nullable and not col.primary_key
            and col.server_default is None and col.server_onupdate is None
            and col.computed is None and col.identity is None)


_ranks_lock = threading.Lock()
_ranks: dict[int, tuple[int, dict[Table, int]]] = {}


def _table_rank(table: Table) -> int:
    """Position of ``table`` in its MetaData's dependency order (parents first)."""
    md = table.metadata
    with _ranks_lock:
        cached = _ranks.get(id(md))
        if cached is None or cached[0] != len(md.tables):
            try:
                order = {t: i for i, t in enumerate(md.sorted_tables)}
            except Exception:  # noqa: BLE001 - a dependency cycle: keep declaration order
                order = {t: i for i, t in enumerate(md.tables.values())}
            cached = _ranks[id(md)] = (len(md.tables), order)
    return cached[1].get(table, 0)


# -- value encoding ------------------------------------------------------------------------


def _jsonable(value: object) -> JSON:
    if type(value) in _SCALARS:
        if type(value) is float and not math.isfinite(value):  # JSON cannot hold it
            return None
        return value  # type: ignore[return-value]
    try:
        return _json.to_jsonable(value)
    except PayloadError:
        if isinstance(value, bytes | bytearray | memoryview):
            return base64.b64encode(bytes(value)).decode("ascii")
        return str(value)


# -- per-session state ---------------------------------------------------------------------


class _Batch:
    """Events of one flush or bulk statement; ``stored`` when the outbox wrote them."""

    __slots__ = ("events", "stored")

    def __init__(self, events: list[Event], stored: bool) -> None:
        self.events = events
        self.stored = stored


class _TxState:
    """What capture keeps on one session for its current root transaction."""

    __slots__ = ("broker", "buckets", "outbox", "released")

    def __init__(self) -> None:
        #: Pending batches per root transaction or savepoint, each in flush order.
        self.buckets: dict[SessionTransaction, list[_Batch]] = {}
        #: Savepoints released (committed) but not yet ended.
        self.released: set[SessionTransaction] = set()
        #: Whether the provider writes in this transaction; ``None`` until asked.
        self.outbox: bool | None = None
        self.broker: Broker | None = None


class _DMLResult(IteratorResult[Any]):
    """What a captured bulk statement without RETURNING gives back: no rows, a rowcount."""

    def __init__(self, rowcount: int) -> None:
        super().__init__(SimpleResultMetaData([]), iter(()))
        #: Number of rows the statement affected.
        self.rowcount = rowcount


# -- registration --------------------------------------------------------------------------


class CaptureHandle:
    """What ``register_crud_hooks`` returns; ``remove()`` stops capturing.

    Also a context manager: ``with register_crud_hooks(...):`` removes on exit.
    """

    def __init__(self, capture: _Capture, listeners: list[tuple[Any, str, Callable[..., Any]]],
                 restore: Callable[[], None] | None) -> None:
        self._capture = capture
        #: Each ``(target, identifier, fn)`` given to ``sqlalchemy.event.listen``.
        self.listeners = listeners
        self._restore = restore
        self._lock = threading.Lock()

    @property
    def is_active(self) -> bool:
        return bool(self.listeners)

    @property
    def session_class(self) -> type[Session]:
        """The (sync) session class whose sessions are captured."""
        return self._capture.session_class

    def remove(self) -> None:
        """Detach every listener this handle added. Idempotent.

        Events waiting in open transactions are dropped: their commit no longer reaches us.
        """
        with self._lock:
            listeners, self.listeners = self.listeners, []
            restore, self._restore = self._restore, None
        for target, identifier, fn in listeners:
            if sa_event.contains(target, identifier, fn):
                sa_event.remove(target, identifier, fn)
        if restore is not None:
            restore()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.is_active else "removed"
        return f"CaptureHandle({self._capture.session_class.__name__}, {state})"


def register_crud_hooks(
    session_factory: Any,
    config: CRUDHookConfig | None = None,
    *,
    broker: Broker | None = None,
) -> CaptureHandle:
    """Turn every create/read/update/delete made through ``session_factory`` into events.

    Args:
        session_factory: a ``sessionmaker``, ``scoped_session``, ``async_sessionmaker``,
            ``async_scoped_session``, or a ``Session`` subclass (its subclasses are captured
            too). A ``sessionmaker`` owns a private Session subclass, so only its sessions are
            captured. An ``async_sessionmaker`` is hooked through its ``sync_session_class``;
            when it has none of its own, capture gives it a private subclass of ``Session``
            (undone by ``remove()``) rather than hooking every ``Session`` of the process.
        config: which operations to capture; ``CRUDHookConfig()`` by default.
        broker: where events go; the default broker (``get_default_broker()``), looked up at
            each flush and commit, when omitted.

    Returns:
        A :class:`CaptureHandle`; ``handle.remove()`` detaches exactly what was attached.
        Registering twice captures twice (two handles, independent state).

    Raises:
        TypeError: ``session_factory`` is none of the above.
    """
    config = config if config is not None else CRUDHookConfig()
    session_class, restore = _session_class_of(session_factory)
    capture = _Capture(session_class, config, broker)
    listeners: list[tuple[Any, str, Callable[..., Any]]] = []
    if config.enable_create or config.enable_update or config.enable_delete:
        listeners += [
            (session_class, "after_flush", capture.after_flush),
            (session_class, "after_commit", capture.after_commit),
            (session_class, "after_transaction_end", capture.after_transaction_end),
        ]
        if config.capture_bulk:
            listeners.append((session_class, "do_orm_execute", capture.do_orm_execute))
    if config.enable_read:
        listeners.append((Mapper, "load", capture.on_load))
    try:
        for target, identifier, fn in listeners:
            sa_event.listen(target, identifier, fn)
    except BaseException:
        CaptureHandle(capture, listeners, restore).remove()
        raise
    return CaptureHandle(capture, listeners, restore)


class _NoAsyncio:
    """Stands in for SQLAlchemy's asyncio classes when they cannot be imported."""

    sync_session_class: type[Session] = Session


def _asyncio_classes() -> tuple[type[Any], type[Any], type[Any]]:
    # SQLAlchemy's asyncio extension needs greenlet, which a plain install of SQLAlchemy 2.1
    # (and of this package) does not bring: without it no async factory can exist either.
    try:
        from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
    except ImportError:
        return _NoAsyncio, _NoAsyncio, _NoAsyncio
    return AsyncSession, async_scoped_session, async_sessionmaker


def _session_class_of(factory: Any) -> tuple[type[Session], Callable[[], None] | None]:
    AsyncSession, async_scoped_session, async_sessionmaker = _asyncio_classes()  # noqa: N806

    if isinstance(factory, scoped_session | async_scoped_session):
        factory = factory.session_factory
    if isinstance(factory, sessionmaker):
        return factory.class_, None
    if isinstance(factory, async_sessionmaker):
        sync_class = factory.kw.get("sync_session_class") or factory.class_.sync_session_class
        if sync_class is not Session:
            return sync_class, None
        private = type("CapturedSession", (Session,), {"__module__": __name__})
        had = "sync_session_class" in factory.kw
        previous = factory.kw.get("sync_session_class")
        factory.configure(sync_session_class=private)

        def restore() -> None:
            if factory.kw.get("sync_session_class") is private:
                if had:
                    factory.configure(sync_session_class=previous)
                else:
                    factory.kw.pop("sync_session_class", None)

        return private, restore
    if isinstance(factory, type):
        if issubclass(factory, Session):
            return factory, None
        if issubclass(factory, AsyncSession):
            own_sync: type[Session] = factory.sync_session_class  # type: ignore[attr-defined]
            if own_sync is Session:
                raise TypeError(
                    f"register_crud_hooks: {factory.__name__}.sync_session_class is Session "
                    "itself; give it a Session subclass of its own, or pass an async_sessionmaker"
                )
            return own_sync, None
    raise TypeError(
        "register_crud_hooks: expected a sessionmaker, scoped_session, async_sessionmaker or "
        f"Session subclass, got {type(factory).__name__}"
    )


# -- the listeners -------------------------------------------------------------------------


class _Capture:
    """The listeners of one ``register_crud_hooks`` call and their shared facts."""

    def __init__(self, session_class: type[Session], config: CRUDHookConfig,
                 broker: Broker | None) -> None:
        self.session_class = session_class
        self.config = config
        self._broker = broker
        self._key = ("sqlalchemy_eventbroker.capture", id(self))
        self._targets: dict[Any, _Target] = {}
        self._targets_lock = threading.Lock()

    # -- helpers -------------------------------------------------------------------------

    def broker(self) -> Broker:
        if self._broker is not None:
            return self._broker
        from .default import get_default_broker

        return get_default_broker()

    def _broker_or_none(self) -> Broker | None:
        try:
            return self.broker()
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            log.warning("eventbroker: no broker for captured events: %s", exc)
            return None

    def error(self, exc: BaseException, where: str, broker: Broker | None = None) -> None:
        """Log and count a capture failure; never raises."""
        try:
            broker = broker or self._broker_or_none()
            if broker is not None:
                broker.count_capture_error(exc)
            else:
                log.error("eventbroker: capture failed in %s: %s", where, exc, exc_info=exc)
        except Exception:
            log.exception("eventbroker: capture failed in %s", where)

    def target(self, mapper: Mapper[Any] | None, table: Table) -> _Target:
        key = mapper if mapper is not None else table
        t = self._targets.get(key)
        if t is None:
            with self._targets_lock:
                t = self._targets.get(key)
                if t is None:
                    t = self._targets[key] = _Target(table, mapper, self.config)
        return t

    def target_of(self, mapper: Mapper[Any]) -> _Target:
        t = self._targets.get(mapper)
        if t is None:
            table = mapper.local_table
            assert isinstance(table, Table)
            t = self.target(mapper, table)
        return t

    def _state(self, session: Session) -> _TxState:
        st: _TxState | None = session.info.get(self._key)
        if st is None:
            st = session.info[self._key] = _TxState()
        return st

    def _make(self, target: _Target, dialect: Dialect, operation: str, payload: dict[str, JSON],
              who: tuple[int | None, str, Mapping[str, JSON]], instance_id: str,
              extra: dict[str, JSON] | None = None,
              created_at: dt.datetime | None = None) -> Event:
        schema, etype = target.type_for(dialect, operation)
        meta = dict(who[2]) if who[2] else {}
        if extra:
            meta.update(extra)
        return Event(uuid7(), _DATABASE, etype, _PENDING, 0, "", payload, who[0], who[1],
                     instance_id, schema, target.entity, operation,
                     created_at or dt.datetime.now(UTC), None, None, meta)

    # -- unit of work ----------------------------------------------------------------------

    def after_flush(self, session: Session, flush_context: Any) -> None:
        """``after_flush``: statements ran, history is still pre-flush: build the events."""
        try:
            events = self._flush_events(session)
            if events:
                self._stash(session, events)
        except Exception as exc:  # noqa: BLE001 - never fail the user's flush
            self.error(exc, "after_flush")

    def _flush_events(self, session: Session) -> list[Event]:
        cfg = self.config
        items: list[tuple[int, int, int, str, InstanceState[Any], _Target]] = []
        seq = 0
        if cfg.enable_create:
            for obj in session.new:
                state = instance_state(obj)
                t = self.target_of(state.mapper)
                if t.captured:
                    items.append((0, t.rank, seq, "create", state, t))
                    seq += 1
        if cfg.enable_update:
            for obj in session.dirty:
                state = instance_state(obj)
                if not state.committed_state:
                    continue
                t = self.target_of(state.mapper)
                if t.captured:
                    items.append((0, t.rank, seq, "update", state, t))
                    seq += 1
        if cfg.enable_delete:
            for obj in session.deleted:
                state = instance_state(obj)
                t = self.target_of(state.mapper)
                if t.captured:
                    items.append((1, -t.rank, seq, "delete", state, t))
                    seq += 1
        if not items:
            return []
        items.sort(key=lambda i: i[:3])
        who = _who(session)
        broker = self._broker_or_none()
        instance_id = broker.instance_id if broker is not None else ""
        dialects: dict[Mapper[Any], Dialect] = {}
        events: list[Event] = []
        now = dt.datetime.now(UTC)  # one flush, one moment: the events of a flush share it
        for _, _, _, op, state, t in items:
            mapper = state.mapper
            dialect = dialects.get(mapper)
            if dialect is None:
                dialect = dialects[mapper] = session.get_bind(mapper=mapper).dialect
            d = state.dict
            extra: dict[str, JSON] | None = None
            if op == "create":
                payload = {}
                for ak, pk in t.cols:
                    v = d.get(ak, _MISSING)
                    if v is not _MISSING:
                        payload[pk] = _jsonable(v)
                    elif pk in t.null_on_create:
                        payload[pk] = None
            elif op == "update":
                # committed_state is where attribute history keeps each modified attribute's
                # value from before the flush (NO_VALUE when it was never loaded).
                committed = state.committed_state
                changes: dict[str, JSON] = {}
                payload = {}
                for ak, pk in t.cols:
                    v = d.get(ak, _MISSING)
                    if v is not _MISSING:
                        payload[pk] = _jsonable(v)
                    if ak in committed:
                        old = committed[ak]
                        if old is v:
                            continue
                        known = _is_value(old)
                        try:
                            if known and old == v:
                                continue
                        except Exception:  # noqa: BLE001, S110 - incomparable: a change
                            pass
                        changes[pk] = {"old": _jsonable(old) if known else None,
                                       "new": payload.get(pk)}
                if not changes:
                    continue
                extra = {"changes": changes}
            else:
                committed = state.committed_state
                payload = {}
                for ak, pk in t.cols:
                    v = committed.get(ak, _MISSING) if committed else _MISSING
                    if v is _MISSING or not _is_value(v):
                        v = d.get(ak, _MISSING)
                    if v is not _MISSING:
                        payload[pk] = _jsonable(v)
                if state.key is not None and t.mapper is not None:
                    for col, value in zip(t.mapper.primary_key, state.key[1], strict=False):
                        if col.key is not None and col.key not in payload:
                            payload[col.key] = _jsonable(value)
            events.append(self._make(t, dialect, op, payload, who, instance_id, extra, now))
        return events

    def _stash(self, session: Session, events: list[Event]) -> None:
        """Keep ``events`` on the current transaction; hand them to the outbox if there is one."""
        st = self._state(session)
        stored = self._write_outbox(session, st, events)
        key = session.get_nested_transaction() or session.get_transaction()
        bucket = st.buckets.get(key)  # type: ignore[arg-type]
        if bucket is None:
            bucket = st.buckets[key] = []  # type: ignore[index]
        bucket.append(_Batch(events, stored))

    def _write_outbox(self, session: Session, st: _TxState, events: list[Event]) -> bool:
        if st.outbox is False:
            return False
        broker = st.broker
        if st.outbox is None:
            st.outbox = False
            broker = self._broker_or_none()
            provider = getattr(broker, "provider", None)
            if broker is None or not isinstance(provider, TransactionalProvider):
                return False
            try:
                st.outbox = bool(provider.shares_transaction(session.connection()))
            except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
                self.error(exc, "shares_transaction", broker)
                return False
            st.broker = broker
            if not st.outbox:
                return False
        assert broker is not None
        writer: Any = broker.provider
        conn: Connection = session.connection()
        ids = [e.id for e in events]
        try:
            broker.note_own(ids)
            if self.config.outbox_savepoint and not _isolates_itself(writer):
                with conn.begin_nested():
                    writer.write_in_transaction(conn, events)
            else:
                writer.write_in_transaction(conn, events)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            # The savepoint (the provider's own, or ours) rolled the failed write back; the
            # broker stores these events (and the rest of this transaction's) after commit.
            st.outbox = False
            broker.forget_own(ids)
            self.error(exc, "write_in_transaction", broker)
            return False
        return True

    def after_commit(self, session: Session) -> None:
        """``after_commit``: publish, in flush order (a savepoint release only marks it)."""
        st: _TxState | None = session.info.get(self._key)
        if st is None:
            return
        if session.in_nested_transaction():
            # after_commit fires for RELEASE SAVEPOINT too; after_transaction_end moves it.
            nested = session.get_nested_transaction()
            if nested is not None:
                st.released.add(nested)
            return
        batches = [b for bucket in st.buckets.values() for b in bucket]
        st.buckets.clear()
        if not batches:
            return
        broker = st.broker or self._broker_or_none()
        if broker is None:
            log.error("eventbroker: %d captured events lost: no broker",
                      sum(len(b.events) for b in batches))
            return
        # Consecutive batches with the same ``stored`` flag go out together, keeping order.
        run: list[Event] = []
        stored = batches[0].stored
        for b in batches:
            if b.stored != stored:
                self._publish(broker, run, stored)
                run, stored = [], b.stored
            run.extend(b.events)
        self._publish(broker, run, stored)

    def _publish(self, broker: Broker, events: list[Event], stored: bool) -> None:
        try:
            broker.publish_captured(events, stored=stored)
        except Exception as exc:  # noqa: BLE001 - publish_captured never raises; be sure
            self.error(exc, "publish_captured", broker)

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        """``after_transaction_end``: keep a released savepoint's events, drop the rest."""
        st: _TxState | None = session.info.get(self._key)
        if st is None:
            return
        if transaction.nested:
            batches = st.buckets.pop(transaction, None)
            released = transaction in st.released
            st.released.discard(transaction)
            if not batches:
                return
            if released:
                parent = transaction.parent
                while parent is not None and not parent.nested and parent.parent is not None:
                    parent = parent.parent
                if parent is not None:
                    st.buckets.setdefault(parent, []).extend(batches)
                    return
            self._forget(st, batches)
        elif transaction.parent is None:
            session.info.pop(self._key, None)
            leftovers = [b for bucket in st.buckets.values() for b in bucket]
            if leftovers:  # rolled back or closed without commit
                self._forget(st, leftovers)

    def _forget(self, st: _TxState, batches: Iterable[_Batch]) -> None:
        ids = [e.id for b in batches if b.stored for e in b.events]
        if ids and st.broker is not None:
            try:
                st.broker.forget_own(ids)
            except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
                self.error(exc, "forget_own", st.broker)

    # -- bulk statements -------------------------------------------------------------------

    def do_orm_execute(self, orm_state: ORMExecuteState) -> Any:
        """``do_orm_execute``: one event per row of ORM bulk INSERT/UPDATE/DELETE statements."""
        if not (orm_state.is_insert or orm_state.is_update or orm_state.is_delete):
            return None
        try:
            plan = _BulkPlan.make(self, orm_state)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            self.error(exc, "do_orm_execute")
            return None
        if plan is None:
            return None
        return plan.run(orm_state)

    # -- reads -----------------------------------------------------------------------------

    def on_load(self, target: object, context: Any) -> None:
        """``load`` (instance event): a row became an object in a captured session."""
        session = getattr(context, "session", None)
        if not isinstance(session, self.session_class):
            return
        try:
            state = instance_state(target)
            t = self.target_of(state.mapper)
            if not t.captured:
                return
            d = state.dict
            payload = {pk: _jsonable(v) for ak, pk in t.cols
                       if (v := d.get(ak, _MISSING)) is not _MISSING}
            broker = self.broker()
            dialect = session.get_bind(mapper=state.mapper).dialect
            event = self._make(t, dialect, "read", payload, _who(session), broker.instance_id)
            broker.publish_captured([event], stored=False)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            self.error(exc, "load")


def _is_value(v: object) -> bool:
    # NO_VALUE / NEVER_SET are symbols of sqlalchemy.orm.base; compare by identity cheaply.
    return v is not _NO_VALUE and v is not _NEVER_SET


# -- bulk statement plans ------------------------------------------------------------------


class _BulkPlan:
    """How one bulk statement is captured: RETURNING, parameters, or a SELECT first."""

    def __init__(self, capture: _Capture, target: _Target, operation: str, dialect: Dialect,
                 statement: Any, how: str, columns: list[Column[Any]]) -> None:
        self.capture = capture
        self.target = target
        self.operation = operation
        self.dialect = dialect
        self.statement = statement
        self.how = how  # "returning" | "user_returning" | "params" | "preselect"
        self.columns = columns

    @classmethod
    def make(cls, capture: _Capture, orm_state: ORMExecuteState) -> _BulkPlan | None:
        cfg = capture.config
        stmt: Any = orm_state.statement
        if orm_state.is_insert:
            operation, enabled = "create", cfg.enable_create
        elif orm_state.is_update:
            operation, enabled = "update", cfg.enable_update
        else:
            operation, enabled = "delete", cfg.enable_delete
        if not enabled:
            return None
        table = getattr(stmt, "table", None)
        if not isinstance(table, Table):
            return None
        mapper = orm_state.bind_mapper
        target = capture.target(mapper, table) if mapper is None else capture.target_of(mapper)
        if not target.captured:
            return None
        session = orm_state.session
        dialect = session.get_bind(mapper=mapper, clause=stmt).dialect
        params = orm_state.parameters
        executemany = isinstance(params, list)
        if getattr(stmt, "_returning", ()) or getattr(stmt, "_return_defaults", False):
            return cls(capture, target, operation, dialect, stmt, "user_returning", [])
        joined = mapper is not None and len(mapper.tables) > 1
        if orm_state.is_insert:
            can_return = (dialect.insert_executemany_returning if executemany
                          else dialect.insert_returning)
            if can_return and not joined and not getattr(stmt, "_select_names", None):
                cols = list(table.columns)
                return cls(capture, target, operation, dialect, stmt.returning(*cols),
                           "returning", cols)
            return cls(capture, target, operation, dialect, stmt, "params", [])
        if executemany:  # ORM "bulk UPDATE by primary key": no RETURNING there
            return cls(capture, target, operation, dialect, stmt, "params", [])
        can_return = dialect.update_returning if orm_state.is_update else dialect.delete_returning
        cols = list(table.columns)
        if can_return and not joined:
            return cls(capture, target, operation, dialect, stmt.returning(*cols), "returning",
                       cols)
        return cls(capture, target, operation, dialect, stmt, "preselect", cols)

    def run(self, orm_state: ORMExecuteState) -> Any:
        """Execute the statement (errors are the user's), then capture its rows."""
        capture = self.capture
        session = orm_state.session
        if self.how == "returning":
            result = orm_state.invoke_statement(statement=self.statement)
            rows = result.all()
            self._capture(session, [self._row_payload(r) for r in rows], orm_state)
            return _DMLResult(len(rows))
        if self.how == "user_returning":
            frozen = orm_state.invoke_statement().freeze()
            try:
                payloads = [self._user_row_payload(r) for r in frozen.data]
                self._capture(session, payloads, orm_state)
            except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
                capture.error(exc, "do_orm_execute")
            return frozen()
        if self.how == "preselect":
            before: list[dict[str, JSON]] = []
            try:
                before = self._preselect(session, orm_state)
            except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
                capture.error(exc, "do_orm_execute")
            result = orm_state.invoke_statement()
            if self.operation == "update":
                values = self._set_values(orm_state)
                payloads = [{**row, **{k: v for k, v in values.items() if v is not _MISSING}}
                            for row in before]
                self._capture(session, payloads, orm_state, before=before)
            else:
                self._capture(session, before, orm_state)
            return result
        result = orm_state.invoke_statement()
        params: Any = orm_state.parameters
        given: list[Mapping[Any, Any]] = params if isinstance(params, list) else [params or {}]
        try:
            payloads = [self._param_payload(p) for p in given]
            if self.operation == "create" and not isinstance(params, list):
                # One row: the generated key is known without RETURNING.
                pk = getattr(result, "inserted_primary_key", None)
                if pk is not None:
                    for col, v in zip(self.target.table.primary_key, pk, strict=False):
                        if v is not None:
                            payloads[0].setdefault(col.key, _jsonable(v))
            self._capture(session, payloads, orm_state)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            capture.error(exc, "do_orm_execute")
        return result

    def _row_payload(self, row: Any) -> dict[str, JSON]:
        return {c.key: _jsonable(v) for c, v in zip(self.columns, row, strict=False)}

    def _user_row_payload(self, row: Any) -> dict[str, JSON]:
        payload: dict[str, JSON] = {}
        mapper = self.target.mapper
        keys = {pk for _, pk in self.target.cols}
        for key, value in row._mapping.items():
            if mapper is not None and isinstance(value, mapper.class_):
                d = instance_state(value).dict
                for ak, pk in self.target.cols:
                    v = d.get(ak, _MISSING)
                    if v is not _MISSING:
                        payload[pk] = _jsonable(v)
            elif isinstance(key, str) and key in keys:
                payload[key] = _jsonable(value)
        return payload

    def _param_payload(self, params: Mapping[Any, Any]) -> dict[str, JSON]:
        payload: dict[str, JSON] = {}
        for key, v in params.items():
            k = self._column_key(key)
            if k is not None:
                payload[k] = _jsonable(v)
        return payload

    def _column_key(self, key: Any) -> str | None:
        """The payload key of a SET/parameter key: attribute name, column or ORM attribute."""
        if isinstance(key, Column):
            return str(key.key)
        mapper = self.target.mapper
        if isinstance(key, str):
            if mapper is not None:
                cols = getattr(mapper.attrs.get(key), "columns", None)
                if cols:
                    return str(cols[0].key)
            return key if key in self.target.table.c else None
        cols = getattr(getattr(key, "property", None), "columns", None)  # ORM attribute
        if cols:
            return str(cols[0].key)
        return None

    def _set_values(self, orm_state: ORMExecuteState) -> dict[str, Any]:
        """Column key → literal new value (``_MISSING`` for SQL expressions) of an UPDATE."""
        out: dict[str, Any] = {}
        stmt: Any = orm_state.statement
        values = getattr(stmt, "_values", None) or {}
        items = list(values.items()) + list(getattr(stmt, "_ordered_values", None) or ())
        for key, value in items:
            k = self._column_key(key)
            if k is None:
                continue
            lit = getattr(value, "value", _MISSING) if type(value).__name__ == "BindParameter" \
                else _MISSING
            out[k] = _jsonable(lit) if lit is not _MISSING else _MISSING
        params = orm_state.parameters
        if isinstance(params, Mapping):
            for key, value in params.items():
                k = self._column_key(key)
                if k is not None:
                    out[k] = _jsonable(value)
        return out

    def _preselect(self, session: Session, orm_state: ORMExecuteState) -> list[dict[str, JSON]]:
        stmt: Any = orm_state.statement
        sel = select(*self.columns)
        if stmt.whereclause is not None:
            sel = sel.where(stmt.whereclause)
        if self.dialect.name != "sqlite":
            sel = sel.with_for_update()
        conn = session.connection(bind_arguments={"mapper": orm_state.bind_mapper})
        rows = conn.execute(sel).all()
        return [self._row_payload(r) for r in rows]

    def _capture(self, session: Session, payloads: Sequence[dict[str, JSON]],
                 orm_state: ORMExecuteState, before: Sequence[dict[str, JSON]] = ()) -> None:
        try:
            if not payloads:
                return
            capture = self.capture
            who = _who(session)
            broker = capture._broker_or_none()
            instance_id = broker.instance_id if broker is not None else ""
            set_values = self._set_values(orm_state) if self.operation == "update" else {}
            pk_keys = {c.key for c in self.target.table.primary_key}
            events = []
            for i, payload in enumerate(payloads):
                extra: dict[str, JSON] = {"bulk": True}
                if self.operation == "update":
                    if self.how == "params":
                        changes = {k: {"new": v} for k, v in payload.items() if k not in pk_keys}
                    elif before:
                        old = before[i]
                        changes = {k: ({"old": old.get(k), "new": payload[k]}
                                       if v is not _MISSING else {"old": old.get(k)})
                                   for k, v in set_values.items() if k in payload}
                        changes = {k: c for k, c in changes.items()
                                   if "new" not in c or c["old"] != c["new"]}
                    else:
                        changes = {k: {"new": payload.get(k)} for k in set_values
                                   if k in payload}
                    extra["changes"] = changes  # type: ignore[assignment]
                events.append(capture._make(self.target, self.dialect, self.operation, payload,
                                            who, instance_id, extra))
            capture._stash(session, events)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            self.capture.error(exc, "do_orm_execute")
