"""The unit of work: events built in ``after_flush``, kept per transaction and savepoint,
handed to the outbox before commit and to the broker after it.

1. ``after_flush`` reads the unit of work it just executed: ``session.new`` → ``create``,
   ``session.dirty`` with changed columns → ``update``, ``session.deleted`` → ``delete``.
   The statements have run (generated keys and RETURNING-fetched server defaults are on the
   instances) while attribute history still holds the values from before the flush, which
   gives ``update`` its ``metadata["changes"]`` and ``delete`` the row as it was, without
   any extra SELECT.
2. The events wait on the session, in a bucket per transaction: the root transaction or
   the innermost savepoint (``begin_nested``). Releasing a savepoint moves its events to
   the enclosing bucket; rolling it back drops them (``after_commit`` fires for a savepoint
   release too, which is how a release is told from a rollback in
   ``after_transaction_end``).
3. Outbox seam: when ``broker.provider`` implements ``TransactionalProvider`` and
   ``shares_transaction(session.connection())`` (asked once per transaction), each flush's
   events go to ``write_in_transaction(connection, events, origin=broker.origin)`` before
   commit. The provider isolates its own write; when it raises, the user's transaction goes
   on, the failure is counted, and this transaction's events are stored by the broker after
   commit instead.
4. ``after_commit`` of the root transaction hands everything, in flush order, to
   ``broker.publish_captured(events, written=...)``; a rollback publishes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import PASSIVE_NO_INITIALIZE
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.schema import Table

from .._types import JSON
from ..providers.base import TransactionalProvider
from ._context import who
from ._targets import MISSING, Target, is_value, jsonable

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.orm import Mapper, Session, SessionTransaction

    from ..broker import Broker
    from ..event import Event
    from ._capture import Capture

__all__ = ["UnitOfWork"]

log = logging.getLogger("sqlalchemy_eventbroker.capture")

UTC = dt.UTC


class _Batch:
    """Events of one flush or bulk statement; ``written`` when the outbox wrote them."""

    __slots__ = ("events", "written")

    def __init__(self, events: list[Event], written: bool) -> None:
        self.events = events
        self.written = written


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
        #: The broker the outbox writes went through (it publishes them after commit).
        self.broker: Broker | None = None


class UnitOfWork:
    """The session listeners of one registration: flush, commit, end of transaction."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self._key = ("sqlalchemy_eventbroker.capture", id(self))

    def _state(self, session: Session) -> _TxState:
        st: _TxState | None = session.info.get(self._key)
        if st is None:
            st = session.info[self._key] = _TxState()
        return st

    # -- flush -----------------------------------------------------------------------------

    def after_flush(self, session: Session, flush_context: Any) -> None:
        """``after_flush``: statements ran, history is still pre-flush: build the events."""
        try:
            events = self._flush_events(session, flush_context)
            if events:
                self.stash(session, events)
        except Exception as exc:  # noqa: BLE001 - never fail the user's flush
            self.capture.error(exc, "after_flush")

    def _flush_events(self, session: Session, flush_context: Any = None) -> list[Event]:
        capture = self.capture
        cfg = capture.config
        target_of = capture.target_of
        items: list[tuple[int, int, int, str, Any, Target]] = []
        seq = 0
        if cfg.enable_create:
            for obj in session.new:
                state = instance_state(obj)
                t = target_of(state.mapper)
                if t.captured:
                    items.append((0, t.rank, seq, "create", state, t))
                    seq += 1
        if cfg.enable_update:
            for obj in session.dirty:
                state = instance_state(obj)
                if not state.committed_state:
                    continue
                t = target_of(state.mapper)
                if t.captured:
                    items.append((0, t.rank, seq, "update", state, t))
                    seq += 1
        if cfg.enable_delete:
            for obj in session.deleted:
                state = instance_state(obj)
                t = target_of(state.mapper)
                if t.captured:
                    items.append((1, -t.rank, seq, "delete", state, t))
                    seq += 1
        if cfg.enable_create or cfg.enable_delete:
            for op, row, t, state in self._association_rows(session, flush_context):
                # The unit of work inserts link rows after both ends exist and deletes them
                # before either end goes: creates after the entities', deletes before theirs.
                if op == "create":
                    items.append((0, t.rank, seq, op, (row, state), t))
                else:
                    items.append((1, -t.rank, seq, op, (row, state), t))
                seq += 1
        if not items:
            return []
        items.sort(key=lambda i: i[:3])
        by = who(session)
        broker = capture.broker_or_none()
        make = capture.make
        dialects: dict[Mapper[Any], Dialect] = {}
        events: list[Event] = []
        now = dt.datetime.now(UTC)  # one flush, one moment: the events of a flush share it
        for _, _, _, op, item, t in items:
            if isinstance(item, tuple):  # an association row: (payload, the owner's state)
                row, owner = item
                mapper = owner.mapper
                dialect = dialects.get(mapper)
                if dialect is None:
                    dialect = dialects[mapper] = session.get_bind(mapper=mapper).dialect
                event = make(t, dialect, op, row, by, broker, None, now)
                if event is not None:
                    events.append(event)
                continue
            state = item
            mapper = state.mapper
            dialect = dialects.get(mapper)
            if dialect is None:
                dialect = dialects[mapper] = session.get_bind(mapper=mapper).dialect
            d = state.dict
            extra: dict[str, JSON] | None = None
            if op == "create":
                payload = {}
                for ak, pk in t.cols:
                    v = d.get(ak, MISSING)
                    if v is not MISSING:
                        payload[pk] = jsonable(v)
                    elif pk in t.null_on_create:
                        payload[pk] = None
            elif op == "update":
                # committed_state is where attribute history keeps each modified attribute's
                # value from before the flush (NO_VALUE when it was never loaded).
                committed = state.committed_state
                changes: dict[str, JSON] = {}
                payload = {}
                for ak, pk in t.cols:
                    v = d.get(ak, MISSING)
                    if v is not MISSING:
                        payload[pk] = jsonable(v)
                    if ak in committed:
                        old = committed[ak]
                        if old is v:
                            continue
                        known = is_value(old)
                        try:
                            if known and old == v:
                                continue
                        except Exception:  # noqa: BLE001, S110 - incomparable: a change
                            pass
                        changes[pk] = {"old": jsonable(old) if known else None,
                                       "new": payload.get(pk)}
                if not changes:
                    continue
                extra = {"changes": changes}
            else:
                committed = state.committed_state
                payload = {}
                for ak, pk in t.cols:
                    v = committed.get(ak, MISSING) if committed else MISSING
                    if v is MISSING or not is_value(v):
                        v = d.get(ak, MISSING)
                    if v is not MISSING:
                        payload[pk] = jsonable(v)
                if state.key is not None and t.mapper is not None:
                    for col, value in zip(t.mapper.primary_key, state.key[1], strict=False):
                        if col.key is not None and col.key not in payload:
                            payload[col.key] = jsonable(value)
            event = make(t, dialect, op, payload, by, broker, extra, now)
            if event is not None:
                events.append(event)
        return events

    def _association_rows(self, session: Session, flush_context: Any
                          ) -> list[tuple[str, dict[str, JSON], Target, InstanceState[Any]]]:
        """Rows of ``relationship(secondary=...)`` tables this flush wrote, read from the
        same attribute history the unit of work used (no statement)."""
        cfg = self.capture.config
        out: list[tuple[str, dict[str, JSON], Target, InstanceState[Any]]] = []
        seen: set[tuple[str, Any, tuple[tuple[str, Any], ...]]] = set()
        groups = ((session.new, False), (session.dirty, False), (session.deleted, True))
        for objs, deleted in groups:
            for obj in objs:
                state = instance_state(obj)
                for prop in _secondary_relationships(state.mapper):
                    history = _history(flush_context, state, prop.key)
                    if history is None:
                        continue
                    secondary: Any = prop.secondary
                    t = self.capture.target(None, secondary)
                    if not t.captured:
                        continue
                    if deleted:
                        removed = list(history.unchanged or ()) + list(history.deleted or ())
                        added: list[Any] = []
                    else:
                        removed = list(history.deleted or ())
                        added = list(history.added or ())
                    for op, children, enabled in (("delete", removed, cfg.enable_delete),
                                                  ("create", added, cfg.enable_create)):
                        if not enabled:
                            continue
                        for child in children:
                            if child is None:
                                continue
                            child_state = (child if isinstance(child, InstanceState)
                                           else instance_state(child))
                            row = _association_row(prop, state, child_state)
                            mark = (op, secondary, tuple(row.items()))
                            if mark in seen:  # both sides of a two-way relationship
                                continue
                            seen.add(mark)
                            out.append((op, row, t, state))
        return out

    def stash(self, session: Session, events: list[Event]) -> None:
        """Keep ``events`` (built and checked) on the current transaction or savepoint, after
        handing them to the outbox if there is one."""
        st = self._state(session)
        written = self._write_outbox(session, st, events)
        key = session.get_nested_transaction() or session.get_transaction()
        bucket = st.buckets.get(key)  # type: ignore[arg-type]
        if bucket is None:
            bucket = st.buckets[key] = []  # type: ignore[index]
        bucket.append(_Batch(events, written))

    def _write_outbox(self, session: Session, st: _TxState, events: list[Event]) -> bool:
        if st.outbox is False:
            return False
        broker = st.broker
        if st.outbox is None:
            st.outbox = False
            broker = self.capture.broker_or_none()
            if broker is None:
                return False
            provider = broker.provider
            if not isinstance(provider, TransactionalProvider):
                return False
            try:
                st.outbox = bool(provider.shares_transaction(session.connection()))
            except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
                self.capture.error(exc, "shares_transaction", broker)
                return False
            st.broker = broker
            if not st.outbox:
                return False
        assert broker is not None
        writer: TransactionalProvider = broker.provider  # type: ignore[assignment]
        try:
            writer.write_in_transaction(session.connection(), events, origin=broker.origin)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            # The provider rolled its own write back and left the transaction usable; the
            # broker stores these events (and the rest of this transaction's) after commit.
            st.outbox = False
            self.capture.error(exc, "write_in_transaction", broker)
            return False
        return True

    # -- end of transaction ----------------------------------------------------------------

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
        broker = st.broker or self.capture.broker_or_none()
        if broker is None:
            log.error("eventbroker: %d captured events lost: no broker",
                      sum(len(b.events) for b in batches))
            return
        # Consecutive batches with the same ``written`` flag go out together, keeping order.
        run: list[Event] = []
        written = batches[0].written
        for b in batches:
            if b.written != written:
                self._publish(broker, run, written)
                run, written = [], b.written
            run.extend(b.events)
        self._publish(broker, run, written)

    def _publish(self, broker: Broker, events: list[Event], written: bool) -> None:
        try:
            broker.publish_captured(events, written=written)
        except Exception as exc:  # noqa: BLE001 - publish_captured never raises; be sure
            self.capture.error(exc, "publish_captured", broker)

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        """``after_transaction_end``: keep a released savepoint's events, drop the rest."""
        st: _TxState | None = session.info.get(self._key)
        if st is None:
            return
        if transaction.nested:
            batches = st.buckets.pop(transaction, None)
            released = transaction in st.released
            st.released.discard(transaction)
            if batches and released:
                parent = transaction.parent
                while parent is not None and not parent.nested and parent.parent is not None:
                    parent = parent.parent
                if parent is not None:
                    st.buckets.setdefault(parent, []).extend(batches)
            # Rolled back: its events (and any outbox rows, undone with it) are gone.
        elif transaction.parent is None:
            # Committed (published already), rolled back or closed: nothing survives.
            session.info.pop(self._key, None)


def _secondary_relationships(mapper: Mapper[Any]) -> list[Any]:
    """The writable ``relationship(secondary=<Table>)`` properties of ``mapper``."""
    cached = _secondaries.get(mapper)
    if cached is None:
        cached = _secondaries[mapper] = [
            p for p in mapper.relationships if isinstance(p.secondary, Table) and not p.viewonly]
    return cached


#: Per mapper, computed once (mappers are configured before their first flush).
_secondaries: weakref.WeakKeyDictionary[Mapper[Any], list[Any]] = weakref.WeakKeyDictionary()


def _history(flush_context: Any, state: InstanceState[Any], key: str) -> Any:
    """The attribute history the flush used (cached on the flush context, collections it
    loaded for a deleted parent included); never loads anything itself."""
    if flush_context is not None:
        try:
            return flush_context.get_attribute_history(state, key, PASSIVE_NO_INITIALIZE)
        except Exception:  # noqa: BLE001, S110 - fall back to the state's own history
            pass
    return state.get_history(key, PASSIVE_NO_INITIALIZE)


def _association_row(prop: Any, parent: InstanceState[Any], child: InstanceState[Any]
                     ) -> dict[str, JSON]:
    """The secondary row linking ``parent`` and ``child``, in the table's column order."""
    values: dict[Any, Any] = {}
    for pairs, state in ((prop.synchronize_pairs, parent),
                         (prop.secondary_synchronize_pairs, child)):
        mapper = state.mapper
        for source, dest in pairs:
            attr = mapper.get_property_by_column(source).key
            committed = state.committed_state
            v = committed.get(attr, MISSING) if committed else MISSING
            if v is MISSING or not is_value(v):
                v = state.dict.get(attr, MISSING)
            values[dest] = None if v is MISSING else jsonable(v)
    return {str(c.key): values[c] for c in prop.secondary.columns if c in values}
