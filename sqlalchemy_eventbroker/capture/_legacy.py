"""The legacy bulk methods: ``bulk_save_objects``, ``bulk_insert_mappings`` and
``bulk_update_mappings``, one event per row.

They bypass both the unit of work and ``do_orm_execute``; all three go through
``Session._bulk_save_mappings`` (one call per mapper and kind), which capture wraps on the
captured session class (undone by ``CaptureHandle.remove()``). Around the call, as for bulk
statements, never per row:

- inserted rows (mappings, and new objects of ``bulk_save_objects``) are passed as copies
  with ``return_defaults=True`` where the dialect returns keys from an executemany in
  parameter order in one statement (PostgreSQL), so the generated keys are known and the
  caller's dicts and objects stay exactly as SQLAlchemy leaves them; on SQLite (which would
  then insert row by row) the rows are read back by rowid in one ``SELECT``. Server defaults
  are read back by primary key in one ``SELECT``.
- updates read the rows' old values by primary key in one ``SELECT`` before the call, so
  ``metadata["changes"]`` has ``old`` and ``new``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect, select, tuple_
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.schema import Table

from .._types import JSON
from ._bulk import sqlite_inserted
from ._context import who
from ._targets import MISSING, Target, is_value, jsonable

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper, Session

    from ..event import Event
    from ._unit_of_work import UnitOfWork

__all__ = ["LegacyBulk"]

_CHUNK = 500

#: The one method all three legacy bulk methods call (SQLAlchemy 2.x).
_ENTRY = "_bulk_save_mappings"

Payload = dict[str, JSON]
Key = tuple[Any, ...]


class LegacyBulk:
    """Wraps ``_bulk_save_mappings`` of one captured session class."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow
        self.capture = uow.capture
        self.active = True

    def install(self, session_class: type[Session]) -> Callable[[], None] | None:
        """Wrap the session class's bulk entry point; returns the undo, or ``None`` when this
        SQLAlchemy has no such entry point (legacy bulk methods are then not captured)."""
        original = getattr(session_class, _ENTRY, None)
        if original is None:
            return None
        own = _ENTRY in session_class.__dict__
        legacy = self

        @functools.wraps(original)
        def _bulk_save_mappings(session: Session, mapper: Any, mappings: Any, **kw: Any) -> None:
            if not legacy.active:
                return original(session, mapper, mappings, **kw)  # type: ignore[no-any-return]
            return legacy.run(original, session, mapper, mappings, **kw)

        setattr(session_class, _ENTRY, _bulk_save_mappings)

        def restore() -> None:
            legacy.active = False
            if session_class.__dict__.get(_ENTRY) is _bulk_save_mappings:
                if own:
                    setattr(session_class, _ENTRY, original)
                else:
                    delattr(session_class, _ENTRY)
            # Else another wrapper sits on top of ours: ours stays, inactive (passes through).

        return restore

    # -- one call --------------------------------------------------------------------------

    def run(self, original: Callable[..., None], session: Session, mapper: Any, mappings: Any,
            **kw: Any) -> None:
        """Run the bulk call (its errors are the caller's) and capture its rows."""
        rows = list(mappings)
        plan: _Call | None = None
        try:
            plan = _Call.make(self, session, mapper, rows, kw)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            self.capture.error(exc, "bulk_save_mappings")
        if plan is None:
            original(session, mapper, rows, **kw)
            return
        original(session, mapper, plan.passed, **plan.kw)
        try:
            plan.emit(session)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            self.capture.error(exc, "bulk_save_mappings")


class _Call:
    """One ``_bulk_save_mappings`` call: what was passed, what was read before."""

    def __init__(self, legacy: LegacyBulk, session: Session, mapper: Mapper[Any],
                 target: Target, rows: list[Any], kw: dict[str, Any]) -> None:
        self.legacy = legacy
        self.capture = legacy.capture
        self.mapper = mapper
        self.target = target
        self.rows = rows
        self.kw = dict(kw)
        self.passed: list[Any] = rows
        self.isstates = bool(kw.get("isstates"))
        self.isupdate = bool(kw.get("isupdate"))
        self.dialect = session.get_bind(mapper=mapper).dialect
        self.session = session
        #: Old rows of an update, by primary key.
        self.before: dict[Key, Payload] = {}
        #: Snapshots of saved objects taken before the call (their history is reset).
        self.snapshots: list[tuple[Payload, Payload]] = []
        attr_of = dict(target.cols)
        self.pk_attrs = [mapper.get_property_by_column(c).key for c in mapper.primary_key]
        self.pk_keys = [attr_of.get(a, a) for a in self.pk_attrs]

    @classmethod
    def make(cls, legacy: LegacyBulk, session: Session, mapper: Any, rows: list[Any],
             kw: dict[str, Any]) -> _Call | None:
        cfg = legacy.capture.config
        isupdate = bool(kw.get("isupdate"))
        if not (cfg.enable_update if isupdate else cfg.enable_create) or not rows:
            return None
        m: Mapper[Any] = inspect(mapper)
        target = legacy.capture.target_of(m)
        if not target.captured:
            return None
        call = cls(legacy, session, m, target, rows, kw)
        call.prepare()
        return call

    def prepare(self) -> None:
        if self.isstates:
            for state in self.rows:
                self.snapshots.append(self._snapshot(state))
        if not self.isupdate and not self.kw.get("return_defaults") and \
                self.dialect.insert_executemany_returning_sort_by_parameter_order and \
                self.dialect.name != "sqlite":  # SQLite would insert row by row for it
            # Copies of the values (SQLAlchemy copies them too without return_defaults), so
            # the caller's dicts and objects stay exactly as they would; the copies get the
            # generated keys.
            self.passed = [dict(r.dict if self.isstates else r) for r in self.rows]
            self.kw["return_defaults"] = True
            self.kw["isstates"] = False
        if self.isupdate:
            keys = [k for k in (self._key(self._values(r)) for r in self._new_values())
                    if k is not None]
            self.before = self._select(keys)

    # -- values ----------------------------------------------------------------------------

    def _snapshot(self, state: InstanceState[Any]) -> tuple[Payload, Payload]:
        """(old, new) column values of a saved object, by payload key."""
        old: Payload = {}
        new: Payload = {}
        committed = state.committed_state
        d = state.dict
        for ak, pk in self.target.cols:
            v = d.get(ak, MISSING)
            if v is not MISSING:
                new[pk] = jsonable(v)
            c = committed.get(ak, MISSING) if committed else MISSING
            if c is not MISSING and is_value(c):
                old[pk] = jsonable(c)
        return old, new

    def _values(self, row: Any) -> Payload:
        """Payload of a mapping (attribute keys) or of an object's current state."""
        d = row.dict if isinstance(row, InstanceState) else row
        return {pk: jsonable(d[ak]) for ak, pk in self.target.cols if ak in d}

    def _new_values(self) -> list[Any]:
        return self.rows

    def _key(self, payload: Payload) -> Key | None:
        if not self.pk_keys:
            return None
        key = tuple(payload.get(k) for k in self.pk_keys)
        return None if any(v is None for v in key) else key

    def _select(self, keys: Sequence[Key]) -> dict[Key, Payload]:
        """Rows by primary key through the mapper (every table of its hierarchy)."""
        if not keys:
            return {}
        m = self.mapper
        cols = [(pk, m.columns[ak]) for ak, pk in self.target.cols if ak in m.columns]
        pk_cols = list(m.primary_key)
        conn = self.session.connection(bind_arguments={"mapper": m})
        found: dict[Key, Payload] = {}
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i:i + _CHUNK]
            cond = (pk_cols[0].in_([k[0] for k in chunk]) if len(pk_cols) == 1
                    else tuple_(*pk_cols).in_(chunk))
            sel = select(*(c for _, c in cols)).select_from(m.persist_selectable).where(cond)
            for row in conn.execute(sel):
                payload = {pk: jsonable(v) for (pk, _), v in zip(cols, row, strict=True)}
                key = self._key(payload)
                if key is not None:
                    found[key] = payload
        return found

    # -- events ----------------------------------------------------------------------------

    def emit(self, session: Session) -> None:
        order = [pk for _, pk in self.target.cols]
        payloads: list[Payload]
        extras: list[dict[str, JSON]] = []
        if self.isupdate:
            payloads = []
            for i, row in enumerate(self.rows):
                if self.isstates:
                    old_known, new = self.snapshots[i]
                else:
                    old_known, new = {}, self._values(row)
                key = self._key(new)
                old = self.before.get(key, old_known) if key is not None else old_known
                payload = {**old, **new}
                payloads.append(payload)
                changes: dict[str, JSON] = {
                    k: {"old": old.get(k), "new": v} for k, v in new.items()
                    if k in old and old[k] != v}
                extras.append({"bulk": True, "changes": changes})
        else:
            source = self.passed
            payloads = [self._values(r) for r in source]
            for p in payloads:
                for k in self.target.null_on_create:
                    p.setdefault(k, None)
            unknown = any(k not in p for p in payloads for k in order)
            keys = [self._key(p) for p in payloads]
            if unknown and all(k is not None for k in keys):
                rows = self._select(keys)  # type: ignore[arg-type]
                payloads = [{**p, **rows.get(k, {})} for k, p in  # type: ignore[arg-type]
                            zip(keys, payloads, strict=True)]
            elif unknown and self.dialect.name == "sqlite" and not any(keys) and \
                    len(self.mapper.tables) == 1 and isinstance(self.target.table, Table):
                # SQLite: consecutive rowids ending at last_insert_rowid() (see _bulk).
                table = self.target.table
                conn = self.session.connection(bind_arguments={"mapper": self.mapper})
                cols = list(table.columns)
                by_column = [{str(c.key): p[str(c.key)] for c in cols if str(c.key) in p}
                             for p in payloads]
                found = sqlite_inserted(conn, table, cols, by_column)
                if found is not None:
                    col_keys = [str(c.key) for c in cols]
                    payloads = [{**p, **{k: jsonable(v) for k, v in zip(col_keys, r,
                                                                          strict=True)}}
                                for p, r in zip(payloads, found, strict=True)]
            extras = [{"bulk": True} for _ in payloads]
        capture = self.capture
        by = who(session)
        broker = capture.broker_or_none()
        op = "update" if self.isupdate else "create"
        events: list[Event] = []
        for payload, extra in zip(payloads, extras, strict=True):
            if op == "update" and not extra.get("changes"):
                continue  # nothing changed in that row
            ordered = {k: payload[k] for k in order if k in payload}
            event = capture.make(self.target, self.dialect, op, ordered, by, broker, extra)
            if event is not None:
                events.append(event)
        if events:
            self.legacy.uow.stash(session, events)
