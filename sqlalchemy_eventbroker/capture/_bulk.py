"""Statements run through the session (``do_orm_execute``): one event per affected row.

ORM bulk statements (``session.execute(update(Model)...)``, ``delete(...)``, ``insert(Model)``
with a list of dicts) and Core DML on plain tables never reach the unit of work. Capture sees
them here, and **the application gets back exactly the result SQLAlchemy gives it**: the
statement runs as written, and its result object is handed back untouched
(``inserted_primary_key``, ``returned_defaults``, ``lastrowid``, ``rowcount``, the rows of its
own ``returning()``). Capture reads the rows it needs around the statement, never per row:

- UPDATE / DELETE: one ``SELECT`` of the rows the statement's WHERE clause matches, just before
  it (``FOR UPDATE`` where the dialect has it, so the rows cannot change in between); an UPDATE
  whose new values are not all literal values (``score=User.score + 1``, a server-side
  ``onupdate``, an executemany with bound WHERE values) reads the rows again by primary key
  just after. Events carry the whole row and ``metadata["changes"]`` with ``old`` and ``new``
  of the columns that changed, also for statements with their own ``returning()``.
- INSERT: the inserted values are the statement's parameters as SQLAlchemy executed them
  (Python-side defaults included); the generated key comes from ``inserted_primary_key``; when
  the table has server-side defaults the statement did not set, the rows are read back by
  primary key in one ``SELECT``. An ORM bulk INSERT without ``returning()`` (whose result
  SQLAlchemy returns empty anyway) gets ``RETURNING`` of the table's columns instead, so its
  generated keys are known in the same round trip (never ``sort_by_parameter_order``, which
  SQLite serves one row per statement). On SQLite the rows of a multi-row INSERT are read
  back by rowid: the consecutive rowids ending at ``last_insert_rowid()``.

Bulk events have ``metadata["bulk"] = True``. Known limits (documented in the README): on
PostgreSQL a Core executemany INSERT whose keys the database generates gives events with the
given values only (no generated key, empty ``key``); ``insert().from_select()`` and statements
on joins are not captured.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, literal_column, or_, select, tuple_
from sqlalchemy.engine import CursorResult
from sqlalchemy.engine.cursor import (
    CursorFetchStrategy,
    FullyBufferedCursorFetchStrategy,
    null_dml_result,
)
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.schema import Column, Table

from .._types import JSON
from ._context import who
from ._targets import MISSING, Target, jsonable

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Dialect, Result
    from sqlalchemy.orm import ORMExecuteState, Session
    from sqlalchemy.sql.elements import ColumnElement

    from ..event import Event
    from ._unit_of_work import UnitOfWork

__all__ = ["BulkStatements"]

#: Rows per ``SELECT ... WHERE pk IN (...)``: well under every backend's parameter limit.
_CHUNK = 500

Payload = dict[str, JSON]


class BulkStatements:
    """The ``do_orm_execute`` listener of one registration."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    def do_orm_execute(self, orm_state: ORMExecuteState) -> Any:
        """``do_orm_execute``: one event per row of INSERT/UPDATE/DELETE statements.

        Returns ``None`` (SQLAlchemy runs the statement as usual) for anything else, or the
        result of the statement it ran itself: SQLAlchemy's own result object.
        """
        if not (orm_state.is_insert or orm_state.is_update or orm_state.is_delete):
            return None
        try:
            plan = _Plan.make(self.uow, orm_state)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            self.uow.capture.error(exc, "do_orm_execute")
            return None
        if plan is None:
            return None
        return plan.run(orm_state)


class _Plan:
    """How one statement is captured: what is read before and after it."""

    def __init__(self, uow: UnitOfWork, target: Target, operation: str, dialect: Dialect,
                 orm_state: ORMExecuteState) -> None:
        self.uow = uow
        self.capture = uow.capture
        self.target = target
        self.operation = operation
        self.dialect = dialect
        self.table: Table = target.table
        self.columns: list[Column[Any]] = list(self.table.columns)
        #: Payload keys of ``columns`` (plain ``str``: a column's key is a ``str`` subclass).
        self.keys = [str(c.key) for c in self.columns]
        self.pk_cols: list[Column[Any]] = list(self.table.primary_key.columns)
        stmt: Any = orm_state.statement
        self.statement = stmt
        params: Any = orm_state.parameters
        self.executemany = isinstance(params, list)
        self.param_sets: list[Mapping[Any, Any]] = (
            list(params) if isinstance(params, list) else [params] if params else [])
        self.user_returning = bool(getattr(stmt, "_returning", ()))

    @classmethod
    def make(cls, uow: UnitOfWork, orm_state: ORMExecuteState) -> _Plan | None:
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
        if operation == "create" and getattr(stmt, "_select_names", None):
            return None  # insert().from_select(): the rows are not known here
        mapper = orm_state.bind_mapper
        # ORM statements hold an annotated copy of the table: compare by name.
        local = mapper.local_table if mapper is not None else None
        if isinstance(local, Table) and local.fullname == table.fullname:
            assert mapper is not None
            target = capture.target_of(mapper)
        else:  # Core DML on a table (or an ORM statement on another table of a hierarchy)
            target = capture.target(None, table)
        if not target.captured:
            return None
        dialect = orm_state.session.get_bind(mapper=mapper, clause=stmt).dialect
        return cls(uow, target, operation, dialect, orm_state)

    # -- running ---------------------------------------------------------------------------

    def run(self, orm_state: ORMExecuteState) -> Any:
        """Execute the statement (its errors are the user's) and capture its rows."""
        session = orm_state.session
        before: list[Payload] | None = None
        if self.operation != "create":
            try:
                before = self._select_before(session, orm_state)
            except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
                self.capture.error(exc, "do_orm_execute")
        elif self._orm_bulk_insert_can_return(orm_state):
            return self._run_orm_bulk_insert(orm_state)
        result = orm_state.invoke_statement()
        returned: list[Payload] = []
        if self.operation == "create" and self.user_returning:
            try:
                result, returned = self._returned(result)
            except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
                self.capture.error(exc, "do_orm_execute")
        try:
            if self.operation == "create":
                payloads = self._inserted(session, orm_state, result, returned)
                self._emit(session, payloads)
            elif before is not None:
                if self.operation == "delete":
                    self._emit(session, before)
                else:
                    self._emit(session, self._updated(session, orm_state, before), before)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            self.capture.error(exc, "do_orm_execute")
        return result

    def _orm_bulk_insert_can_return(self, orm_state: ORMExecuteState) -> bool:
        """An ORM bulk INSERT (a mapped class with parameter sets) without ``returning()``:
        SQLAlchemy hands back an empty result for it whatever ran, so RETURNING is free."""
        if self.user_returning or not self.param_sets or orm_state.bind_mapper is None:
            return False
        if getattr(self.statement, "_return_defaults", False):
            return False
        mapper = orm_state.bind_mapper
        if len(mapper.tables) > 1 or self.target.mapper is not mapper:
            return False
        opts = orm_state.execution_options.get("_sa_orm_insert_options")
        if getattr(opts, "_dml_strategy", None) != "bulk":
            return False
        d = self.dialect
        # Not sort_by_parameter_order: SQLite would get one INSERT per row for it.
        return bool(d.insert_executemany_returning if self.executemany else d.insert_returning)

    def _run_orm_bulk_insert(self, orm_state: ORMExecuteState) -> Any:
        stmt = self.statement.returning(*self.columns)
        result = orm_state.invoke_statement(statement=stmt)
        try:
            payloads = [self._row(r) for r in result.all()]
            if len(self.pk_cols) == 1:
                # Insertion order (RETURNING's row order is the database's choice).
                pk = self.keys[self.columns.index(self.pk_cols[0])]
                if all(isinstance(p.get(pk), int) for p in payloads):
                    payloads.sort(key=lambda p: p[pk])  # type: ignore[arg-type,return-value]
            self._emit(orm_state.session, payloads)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            self.capture.error(exc, "do_orm_execute")
        # What SQLAlchemy returns for an ORM bulk INSERT without returning().
        return null_dml_result()

    # -- reading rows ----------------------------------------------------------------------

    def _row(self, row: Sequence[Any]) -> Payload:
        return {k: jsonable(v) for k, v in zip(self.keys, row, strict=False)}

    def _connection(self, session: Session, orm_state: ORMExecuteState) -> Connection:
        return session.connection(bind_arguments={"mapper": orm_state.bind_mapper,
                                                  "clause": self.statement})

    def _select_before(self, session: Session, orm_state: ORMExecuteState) -> list[Payload]:
        """The rows an UPDATE/DELETE is about to change, in one SELECT."""
        where = self._where(orm_state)
        if where is False:
            return []
        sel = select(*self.columns)
        if where is not None and where is not True:
            sel = sel.where(where)
        if self.dialect.name != "sqlite":
            sel = sel.with_for_update(of=self.table)
        rows = self._connection(session, orm_state).execute(sel).all()
        return [self._row(r) for r in rows]

    def _where(self, orm_state: ORMExecuteState) -> ColumnElement[bool] | bool | None:
        """The statement's WHERE clause with its bound values; ``False`` for no row."""
        where = self.statement.whereclause
        if self.executemany:
            if where is None:
                # The ORM "bulk UPDATE by primary key": each parameter set names its row.
                keys = [self._pk_of(self._params_payload(p)) for p in self.param_sets]
                known = [k for k in keys if k is not None]
                return self._pk_in(known) if known else False
            return or_(*(_bound(where, p) for p in self.param_sets))
        if where is not None and self.param_sets:
            where = _bound(where, self.param_sets[0])
        return where  # type: ignore[no-any-return]

    def _select_by_pk(self, session: Session, orm_state: ORMExecuteState,
                      keys: Sequence[tuple[Any, ...]]) -> dict[tuple[Any, ...], Payload]:
        """Rows by primary key (payload form of the key → payload), ``_CHUNK`` at a time."""
        conn = self._connection(session, orm_state)
        found: dict[tuple[Any, ...], Payload] = {}
        for i in range(0, len(keys), _CHUNK):
            rows = conn.execute(select(*self.columns).where(self._pk_in(keys[i:i + _CHUNK])))
            for r in rows:
                payload = self._row(r)
                key = self._pk_of(payload)
                if key is not None:
                    found[key] = payload
        return found

    def _pk_in(self, keys: Sequence[tuple[Any, ...]]) -> ColumnElement[bool]:
        if len(self.pk_cols) == 1:
            return self.pk_cols[0].in_([k[0] for k in keys])
        return tuple_(*self.pk_cols).in_(keys)

    def _pk_of(self, payload: Mapping[str, Any]) -> tuple[Any, ...] | None:
        if not self.pk_cols:
            return None
        key = tuple(payload.get(str(c.key)) for c in self.pk_cols)
        return None if any(v is None for v in key) else key

    # -- inserts ---------------------------------------------------------------------------

    def _inserted(self, session: Session, orm_state: ORMExecuteState, result: Result[Any],
                  returned: list[Any]) -> list[Payload]:
        """The inserted rows: parameters as executed, generated keys, server defaults."""
        given: list[Payload]
        multi = getattr(self.statement, "_multi_values", ())
        if multi:
            # insert().values([{...}, {...}]): one statement, several rows.
            given = [self._params_payload(_literals(row)) for row in multi[0]]
        elif isinstance(result, CursorResult) and result.context.compiled is not None:
            executed = result.last_inserted_params()
            sets = executed if isinstance(executed, list) else [executed]
            given = [self._params_payload(p) for p in sets]
        else:
            given = [self._params_payload(p) for p in self.param_sets] or [
                self._params_payload(self._values())]
        if returned and len(returned) == len(given):
            for payload, row in zip(given, returned, strict=True):
                payload.update(row)
        if (isinstance(result, CursorResult) and not self.user_returning and not multi
                and self.pk_cols and result.context.compiled is not None):
            try:
                pk_rows = result.inserted_primary_key_rows
            except Exception:  # noqa: BLE001 - no keys from this dialect/statement
                pk_rows = []
            if len(pk_rows) == len(given):
                for payload, pk in zip(given, pk_rows, strict=True):
                    for col, v in zip(self.pk_cols, pk or (), strict=False):
                        if v is not None:
                            payload.setdefault(str(col.key), jsonable(v))
        for payload in given:
            for key in self.target.null_on_create:
                if key in self.table.c:
                    payload.setdefault(key, None)
        unknown = any(k not in p for p in given for k in self.keys)
        keys = [self._pk_of(p) for p in given]
        if unknown and keys and all(k is not None for k in keys):
            rows = self._select_by_pk(session, orm_state, keys)  # type: ignore[arg-type]
            given = [rows.get(k, p) for k, p in zip(keys, given, strict=True)]  # type: ignore[arg-type]
        elif (unknown and self.dialect.name == "sqlite" and not any(keys)
              and (self.executemany or len(given) > 1 or multi) and not self.user_returning):
            # SQLite: the rows of one INSERT get consecutive rowids ending at the
            # connection's last_insert_rowid() (no one else can insert meanwhile).
            inserted = sqlite_inserted(self._connection(session, orm_state), self.table,
                                       self.columns, given)
            if inserted is not None:
                given = [self._row(r) for r in inserted]
        elif (unknown and len(given) == 1 and isinstance(result, CursorResult)
              and self.dialect.name == "sqlite" and not self.executemany):
            # SQLite: the row just inserted is the connection's last rowid (a pure read of
            # the cursor, which the application's RETURNING rows leave alone).
            rowid = result.lastrowid
            if rowid:
                rowid_col: ColumnElement[Any] = literal_column("_rowid_")
                row = self._connection(session, orm_state).execute(
                    select(*self.columns).where(rowid_col == rowid)).first()
                if row is not None:
                    given = [self._row(row)]
        return given

    def _values(self) -> Mapping[Any, Any]:
        """The literal values of ``.values(...)`` (single-row form)."""
        out: dict[Any, Any] = {}
        for key, value in (getattr(self.statement, "_values", None) or {}).items():
            lit = getattr(value, "value", MISSING) if _is_bind(value) else MISSING
            if lit is not MISSING:
                out[key] = lit
        return out

    def _returned(self, result: Result[Any]) -> tuple[Result[Any], list[Payload]]:
        """The rows of the application's own ``returning()`` as payloads, and the result to
        give back, which still has every row for the application.

        A ``CursorResult`` is never read through: its rows are looked at where they already
        are (SQLAlchemy's buffer, the asyncio adapter's prefetched rows, or a client-side
        cursor that scrolls back), because reading it changes what some drivers report as
        ``rowcount``. ORM results (built from rows already) are frozen and thawed.
        """
        if isinstance(result, CursorResult):
            raw = _peek(result, self.dialect)
            if raw is None:
                return result, []
            keys = list(result.keys())
            return result, [self._returned_payload(dict(zip(keys, r, strict=False)))
                            for r in raw]
        frozen = result.freeze()
        rows = frozen().all()
        return frozen(), [self._returned_payload(dict(r._mapping)) for r in rows]

    def _returned_payload(self, mapping: Mapping[Any, Any]) -> Payload:
        payload: Payload = {}
        mapper = self.target.mapper
        by_attr = dict(self.target.cols)
        keys = {pk for _, pk in self.target.cols} | set(self.table.c.keys())
        for key, value in mapping.items():
            if mapper is not None and isinstance(value, mapper.class_):
                from sqlalchemy.orm.attributes import instance_state

                d = instance_state(value).dict
                for ak, pk in self.target.cols:
                    v = d.get(ak, MISSING)
                    if v is not MISSING:
                        payload[pk] = jsonable(v)
            elif isinstance(key, str) and (key in keys or key in by_attr):
                payload[by_attr.get(key, key)] = jsonable(value)
        return payload

    # -- updates ---------------------------------------------------------------------------

    def _updated(self, session: Session, orm_state: ORMExecuteState,
                 before: list[Payload]) -> list[Payload]:
        """The rows after an UPDATE: the old rows with the literal new values merged in, or
        read again by primary key when a new value is not known here."""
        if not before:
            return []
        merged: list[Payload]
        exact = not self._has_server_onupdate()
        if self.executemany and self.statement.whereclause is None:
            by_key = {self._pk_of(self._params_payload(p)): self._params_payload(p)
                      for p in self.param_sets}
            merged = [{**row, **by_key.get(self._pk_of(row), {})} for row in before]
        elif self.executemany:
            merged, exact = [dict(row) for row in before], False
        else:
            values = self._set_values(orm_state)
            exact = exact and all(v is not MISSING for v in values.values())
            merged = [{**row, **{k: v for k, v in values.items() if v is not MISSING}}
                      for row in before]
        if exact:
            return merged
        keys = [self._pk_of(row) for row in merged]
        if not all(k is not None for k in keys):
            return merged
        rows = self._select_by_pk(session, orm_state, keys)  # type: ignore[arg-type]
        return [rows.get(k, m) for k, m in zip(keys, merged, strict=True)]  # type: ignore[arg-type]

    def _has_server_onupdate(self) -> bool:
        return any(c.server_onupdate is not None or c.computed is not None
                   for c in self.columns)

    def _set_values(self, orm_state: ORMExecuteState) -> dict[str, Any]:
        """Column key → literal new value (``MISSING`` for SQL expressions) of an UPDATE."""
        out: dict[str, Any] = {}
        stmt: Any = self.statement
        values = getattr(stmt, "_values", None) or {}
        items = list(values.items()) + list(getattr(stmt, "_ordered_values", None) or ())
        params = self.param_sets[0] if self.param_sets else {}
        for key, value in items:
            k = self._column_key(key)
            if k is None:
                continue
            if _is_bind(value):
                lit = value.value
                if value.key in params:
                    lit = params[value.key]
                elif getattr(value, "callable", None) is not None or (
                        lit is None and value.required):
                    lit = MISSING
                out[k] = jsonable(lit) if lit is not MISSING else MISSING
            else:
                out[k] = MISSING
        if not values:
            # update(t) executed with parameters: the parameters are the SET clause.
            for key, value in params.items():
                k = self._column_key(key)
                if k is not None:
                    out[k] = jsonable(value)
        return out

    # -- parameters ------------------------------------------------------------------------

    def _params_payload(self, params: Mapping[Any, Any]) -> Payload:
        payload: Payload = {}
        for key, v in params.items():
            k = self._column_key(key)
            if k is not None:
                payload[k] = jsonable(v)
        return payload

    def _column_key(self, key: Any) -> str | None:
        """The payload key of a SET/parameter key: attribute name, column or ORM attribute."""
        if isinstance(key, Column):
            # ORM statements hold annotated copies of the table's columns: compare by name.
            same = key.key in self.table.c and getattr(key.table, "fullname", None) == \
                self.table.fullname
            return str(key.key) if same else None
        mapper = self.target.mapper
        if isinstance(key, str):
            if mapper is not None:
                cols = getattr(mapper.attrs.get(key), "columns", None)
                if cols:
                    return str(cols[0].key)
            return key if key in self.table.c else None
        cols = getattr(getattr(key, "property", None), "columns", None)  # ORM attribute
        if cols:
            return str(cols[0].key)
        return None

    # -- events ----------------------------------------------------------------------------

    def _emit(self, session: Session, payloads: Sequence[Payload],
              before: Sequence[Payload] = ()) -> None:
        if not payloads:
            return
        capture = self.capture
        by = who(session)
        broker = capture.broker_or_none()
        events: list[Event] = []
        order = self.keys
        for i, unordered in enumerate(payloads):
            # Column order, whichever way the values were found.
            payload = {k: unordered[k] for k in order if k in unordered}
            extra: dict[str, JSON] = {"bulk": True}
            if self.operation == "update":
                old = before[i] if i < len(before) else {}
                changes: dict[str, JSON] = {
                    k: {"old": old.get(k), "new": v} for k, v in payload.items()
                    if k in old and old[k] != v}
                extra["changes"] = changes
            event = capture.make(self.target, self.dialect, self.operation, payload, by,
                                 broker, extra)
            if event is not None:
                events.append(event)
        if events:
            self.uow.stash(session, events)


def _literals(row: Any) -> dict[Any, Any]:
    """The literal values of one row of a multi-row ``values()`` (SQL expressions left out)."""
    items = row.items() if isinstance(row, Mapping) else ()
    out: dict[Any, Any] = {}
    for key, value in items:
        if _is_bind(value):
            out[key] = value.value
        elif not hasattr(value, "__clause_element__") and not hasattr(value, "_is_clause_element"):
            out[key] = value
    return out


def _is_bind(value: object) -> bool:
    return type(value).__name__ == "BindParameter"


def _bound(where: Any, params: Mapping[Any, Any]) -> Any:
    """``where`` with the bound parameters that ``params`` names given their values, each as
    a new anonymous parameter (one WHERE per parameter set, OR-ed, must not share names)."""
    def replace(element: Any) -> Any:
        if isinstance(element, BindParameter) and element.key in params:
            return bindparam(None, params[element.key], type_=element.type, unique=True)
        return None

    return visitors.replacement_traverse(where, {}, replace)  # type: ignore[call-overload]


def _peek(result: CursorResult[Any], dialect: Dialect) -> list[Sequence[Any]] | None:
    """The raw rows of a result the application has not read yet, leaving them unread;
    ``None`` when they cannot be seen without reading them."""
    strategy = result.cursor_strategy
    if isinstance(strategy, FullyBufferedCursorFetchStrategy):
        # Rows SQLAlchemy fetched already (the "insertmanyvalues" batches of an executemany).
        return list(strategy._rowbuffer)
    if type(strategy) is not CursorFetchStrategy:
        return None
    cursor = result.cursor
    rows = getattr(cursor, "_rows", None)
    if isinstance(rows, deque):
        # SQLAlchemy's asyncio cursor adapters fetch every row at execute time.
        return list(rows)
    if dialect.name == "sqlite":
        return None  # sqlite3 cursors cannot scroll back, and fetching changes rowcount
    scroll = getattr(cursor, "scroll", None)
    if scroll is None or getattr(cursor, "rownumber", None) != 0:
        return None
    got = cursor.fetchall()
    scroll(0, mode="absolute")  # a client-side cursor (psycopg): back to the first row
    return list(got)


def sqlite_inserted(conn: Connection, table: Table, columns: Sequence[Column[Any]],
                    given: Sequence[Mapping[str, Any]]) -> list[Any] | None:
    """The rows the last INSERT on ``conn`` added to ``table`` (SQLite), in one SELECT: the
    ``len(given)`` rowids ending at ``last_insert_rowid()``; ``None`` when that cannot be
    trusted (a table without rowid, rows that are not the ones given)."""
    if not given or table.dialect_options["sqlite"].get("with_rowid", True) is False:
        return None
    rowid: ColumnElement[Any] = literal_column("_rowid_")
    last: ColumnElement[Any] = literal_column("last_insert_rowid()")
    rows = conn.execute(select(*columns).where(
        rowid.between(last - (len(given) - 1), last)).order_by(rowid)).all()
    if len(rows) != len(given):
        return None
    keys = [str(c.key) for c in columns]
    for row, values in zip(rows, given, strict=True):
        got = {k: jsonable(v) for k, v in zip(keys, row, strict=True)}
        if any(k in got and got[k] != v for k, v in values.items()):
            return None  # not our rows after all: keep what is known
    return list(rows)
