"""ORM bulk statements (``do_orm_execute``): one event per affected row.

ORM bulk statements (``session.execute(update(Model)...)``, ``delete(...)``, ``insert(Model)``
with a list of dicts) never reach the unit of work. With ``update_returning`` /
``delete_returning`` / ``insert_executemany_returning`` (PostgreSQL, SQLite ≥ 3.35) the
statement gets ``RETURNING`` of every column of its table, which yields one event per
affected row in the same round trip; the caller gets back a result without rows whose
``rowcount`` is the number of affected rows. Bulk events have ``metadata["bulk"] = True``.
A bulk ``update`` carries the new row and ``metadata["changes"]`` with ``{"new": ...}`` for
the columns it sets (an UPDATE does not read the old values; use the unit of work when you
need them). Without RETURNING (other dialects, joined inheritance, the ORM "bulk UPDATE by
primary key" form with a list of dicts), events are built from the statement's parameters:
the values you passed, keys included only if you passed them. An UPDATE/DELETE with a WHERE
clause on a dialect without RETURNING is run first as a ``SELECT ... FOR UPDATE`` of the
affected rows (one extra statement per bulk statement). A statement that already has
``RETURNING`` is left alone; its rows are read (the result is buffered) and the events hold
what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql.schema import Column, Table

from .._types import JSON
from ._context import who
from ._targets import MISSING, Target, jsonable

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.orm import ORMExecuteState, Session

    from ..event import Event
    from ._unit_of_work import UnitOfWork

__all__ = ["BulkStatements"]


class BulkStatements:
    """The ``do_orm_execute`` listener of one registration."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    def do_orm_execute(self, orm_state: ORMExecuteState) -> Any:
        """``do_orm_execute``: one event per row of ORM bulk INSERT/UPDATE/DELETE statements.

        Returns ``None`` (SQLAlchemy runs the statement as usual) for anything else, or the
        result of the statement it ran itself, which behaves as the caller's own would.
        """
        if not (orm_state.is_insert or orm_state.is_update or orm_state.is_delete):
            return None
        try:
            plan = _BulkPlan.make(self.uow, orm_state)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            self.uow.capture.error(exc, "do_orm_execute")
            return None
        if plan is None:
            return None
        return plan.run(orm_state)


class _DMLResult(IteratorResult[Any]):
    """What a captured bulk statement without RETURNING gives back: no rows, a rowcount."""

    def __init__(self, rowcount: int) -> None:
        super().__init__(SimpleResultMetaData([]), iter(()))
        #: Number of rows the statement affected.
        self.rowcount = rowcount


class _BulkPlan:
    """How one bulk statement is captured: RETURNING, parameters, or a SELECT first."""

    def __init__(self, uow: UnitOfWork, target: Target, operation: str, dialect: Dialect,
                 statement: Any, how: str, columns: list[Column[Any]]) -> None:
        self.uow = uow
        self.capture = uow.capture
        self.target = target
        self.operation = operation
        self.dialect = dialect
        self.statement = statement
        self.how = how  # "returning" | "user_returning" | "params" | "preselect"
        self.columns = columns

    @classmethod
    def make(cls, uow: UnitOfWork, orm_state: ORMExecuteState) -> _BulkPlan | None:
        capture = uow.capture
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
            return cls(uow, target, operation, dialect, stmt, "user_returning", [])
        joined = mapper is not None and len(mapper.tables) > 1
        if orm_state.is_insert:
            can_return = (dialect.insert_executemany_returning if executemany
                          else dialect.insert_returning)
            if can_return and not joined and not getattr(stmt, "_select_names", None):
                cols = list(table.columns)
                return cls(uow, target, operation, dialect, stmt.returning(*cols),
                           "returning", cols)
            return cls(uow, target, operation, dialect, stmt, "params", [])
        if executemany:  # ORM "bulk UPDATE by primary key": no RETURNING there
            return cls(uow, target, operation, dialect, stmt, "params", [])
        can_return = dialect.update_returning if orm_state.is_update else dialect.delete_returning
        cols = list(table.columns)
        if can_return and not joined:
            return cls(uow, target, operation, dialect, stmt.returning(*cols), "returning",
                       cols)
        return cls(uow, target, operation, dialect, stmt, "preselect", cols)

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
                payloads = [{**row, **{k: v for k, v in values.items() if v is not MISSING}}
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
                            payloads[0].setdefault(col.key, jsonable(v))
            self._capture(session, payloads, orm_state)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            capture.error(exc, "do_orm_execute")
        return result

    def _row_payload(self, row: Any) -> dict[str, JSON]:
        return {c.key: jsonable(v) for c, v in zip(self.columns, row, strict=False)}

    def _user_row_payload(self, row: Any) -> dict[str, JSON]:
        payload: dict[str, JSON] = {}
        mapper = self.target.mapper
        keys = {pk for _, pk in self.target.cols}
        for key, value in row._mapping.items():
            if mapper is not None and isinstance(value, mapper.class_):
                d = instance_state(value).dict
                for ak, pk in self.target.cols:
                    v = d.get(ak, MISSING)
                    if v is not MISSING:
                        payload[pk] = jsonable(v)
            elif isinstance(key, str) and key in keys:
                payload[key] = jsonable(value)
        return payload

    def _param_payload(self, params: Mapping[Any, Any]) -> dict[str, JSON]:
        payload: dict[str, JSON] = {}
        for key, v in params.items():
            k = self._column_key(key)
            if k is not None:
                payload[k] = jsonable(v)
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
        """Column key → literal new value (``MISSING`` for SQL expressions) of an UPDATE."""
        out: dict[str, Any] = {}
        stmt: Any = orm_state.statement
        values = getattr(stmt, "_values", None) or {}
        items = list(values.items()) + list(getattr(stmt, "_ordered_values", None) or ())
        for key, value in items:
            k = self._column_key(key)
            if k is None:
                continue
            lit = getattr(value, "value", MISSING) if type(value).__name__ == "BindParameter" \
                else MISSING
            out[k] = jsonable(lit) if lit is not MISSING else MISSING
        params = orm_state.parameters
        if isinstance(params, Mapping):
            for key, value in params.items():
                k = self._column_key(key)
                if k is not None:
                    out[k] = jsonable(value)
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
        capture = self.capture
        try:
            if not payloads:
                return
            by = who(session)
            broker = capture.broker_or_none()
            set_values = self._set_values(orm_state) if self.operation == "update" else {}
            pk_keys = {c.key for c in self.target.table.primary_key}
            events: list[Event] = []
            for i, payload in enumerate(payloads):
                extra: dict[str, JSON] = {"bulk": True}
                if self.operation == "update":
                    if self.how == "params":
                        changes = {k: {"new": v} for k, v in payload.items() if k not in pk_keys}
                    elif before:
                        old = before[i]
                        changes = {k: ({"old": old.get(k), "new": payload[k]}
                                       if v is not MISSING else {"old": old.get(k)})
                                   for k, v in set_values.items() if k in payload}
                        changes = {k: c for k, c in changes.items()
                                   if "new" not in c or c["old"] != c["new"]}
                    else:
                        changes = {k: {"new": payload.get(k)} for k in set_values
                                   if k in payload}
                    extra["changes"] = changes  # type: ignore[assignment]
                event = capture.make(self.target, self.dialect, self.operation, payload, by,
                                     broker, extra)
                if event is not None:
                    events.append(event)
            if events:
                self.uow.stash(session, events)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            capture.error(exc, "do_orm_execute")
