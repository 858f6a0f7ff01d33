"""Per-table facts computed once (names, columns, dependency order) and value encoding."""

from __future__ import annotations

import base64
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Mapper
from sqlalchemy.orm.base import NEVER_SET as _NEVER_SET
from sqlalchemy.orm.base import NO_VALUE as _NO_VALUE
from sqlalchemy.sql.schema import Column, Table

from .. import _json
from .._types import JSON
from ..errors import PayloadError
from ._columns import class_rules, payload_keys

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

    from ._config import CRUDHookConfig

__all__ = ["MISSING", "Target", "is_value", "jsonable"]

#: "No such key" for ``dict.get``: distinct from every value a column can hold.
MISSING: Any = object()

_SCALARS = frozenset((str, int, bool, float, type(None)))
_DEFAULT_SCHEMAS = {"postgresql": "public", "sqlite": "main"}
_OPERATIONS = ("create", "read", "update", "delete")


class Target:
    """What events of one mapper (or plain table) need: names, columns, order."""

    __slots__ = ("captured", "cols", "entity", "excluded", "mapper", "null_on_create",
                 "pk_hidden", "pk_keys", "rank", "redacted", "schema", "table", "types")

    def __init__(self, table: Table, mapper: Mapper[Any] | None, config: CRUDHookConfig,
                 mappers: Sequence[Mapper[Any]] = ()) -> None:
        """``mappers``: for a plain table (``mapper`` is ``None``), the classes mapped to it,
        whose ``__eventbroker__`` applies to its rows too."""
        self.table = table
        self.mapper = mapper
        # Plain str: SQLAlchemy's quoted_name is a str subclass, which every event would then
        # carry (and Event.validate would take its slow path for).
        self.entity = str(table.name)
        self.schema = str(table.schema) if table.schema is not None else None
        self.captured = config.captures(table)
        #: ``(attribute key, payload key)`` for every column attribute (all tables of an
        #: inheritance hierarchy), payload key = the column key.
        if mapper is not None:
            self.cols: tuple[tuple[str, str], ...] = tuple(
                (prop.key, str(prop.columns[0].key)) for prop in mapper.column_attrs
            )
        else:
            self.cols = tuple((str(c.key), str(c.key)) for c in table.columns)
        #: Columns an INSERT that did not mention them leaves NULL (no server-side value), so
        #: a new instance without the attribute loaded holds NULL there: no need to fetch.
        if mapper is not None:
            self.null_on_create = frozenset(
                str(prop.columns[0].key) for prop in mapper.column_attrs
                if all(_plain_nullable(c) for c in prop.columns)
            )
        else:
            self.null_on_create = frozenset(
                str(c.key) for c in table.columns if _plain_nullable(c))
        #: Payload keys of the primary key columns, in primary-key column order (``key``).
        self.pk_keys: tuple[str, ...] = _pk_keys(table, mapper)
        # Column control: payload keys left out, and shown as "[redacted]".
        tables = [t for t in mapper.tables if isinstance(t, Table)] if mapper else [table]
        excluded: set[str] = set()
        redacted: set[str] = set()
        for t in tables:
            ex, red = config.columns_of(t)
            excluded |= ex
            redacted |= red
        classes = [mapper.class_] if mapper is not None else [m.class_ for m in mappers]
        for cls in classes:
            rules = class_rules(cls)
            self.captured = self.captured and rules.capture
            excluded |= rules.exclude
            redacted |= rules.redact
        names = payload_keys(table, mapper if mapper is not None else
                             (mappers[0] if mappers else None))
        #: Payload keys that appear nowhere in the events.
        self.excluded = frozenset(names[n] for n in excluded if n in names)
        #: Payload keys whose values the events show as "[redacted]".
        self.redacted = frozenset(names[n] for n in redacted if n in names) - self.excluded
        #: A key column is hidden: the event ``key`` would show it, so it stays "".
        self.pk_hidden = any(k in self.excluded or k in self.redacted for k in self.pk_keys)
        self.rank = _table_rank(table)
        #: ``{default schema: {operation: (schema, type)}}``.
        self.types: dict[str | None, dict[str, tuple[str, str]]] = {}

    def type_for(self, dialect: Dialect, operation: str) -> tuple[str, str]:
        """``(schema, event type)`` of ``operation`` on this table through ``dialect``."""
        default = dialect.default_schema_name
        by_op = self.types.get(default)
        if by_op is None:
            schema = str(self.schema or default or _DEFAULT_SCHEMAS.get(dialect.name, "") or "default")
            by_op = self.types[default] = {
                op: (schema, f"{schema}.{self.entity}.{op}") for op in _OPERATIONS
            }
        return by_op[operation]

    def key_of(self, schema: str, payload: dict[str, JSON]) -> str:
        """The event ``key`` of a row: ``schema.entity:`` and its primary key values in their
        payload form (strings unquoted), joined by ``,``; ``""`` without a primary key or when
        the payload lacks one of its values."""
        pk = self.pk_keys
        if not pk or self.pk_hidden:
            return ""
        parts: list[str] = []
        for k in pk:
            v = payload.get(k)
            if v is None:
                return ""
            if isinstance(v, str):
                parts.append(v)
            else:  # an int's JSON form is its str(), without the encoder call
                parts.append(str(v) if v.__class__ is int else _json.dumps(v))
        return f"{schema}.{self.entity}:{','.join(parts)}"


def _pk_keys(table: Table, mapper: Mapper[Any] | None) -> tuple[str, ...]:
    if mapper is None:
        return tuple(str(c.key) for c in table.primary_key.columns)
    keys: list[str] = []
    for col in mapper.primary_key:
        prop = mapper.get_property_by_column(col)
        keys.append(str(prop.columns[0].key))
    return tuple(keys)


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


def jsonable(value: object) -> JSON:
    """``value`` as the payload holds it: JSON as ``Event.set_payload`` encodes it, bytes as
    base64 text, anything else JSON cannot hold as its ``str``.

    Strings pass through untouched (the common case, kept cheap); whether a backend can
    store them is ``Event.validate``'s question, asked once per built event.
    """
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


def is_value(v: object) -> bool:
    """Whether an attribute-history entry is a value, not NO_VALUE / NEVER_SET."""
    # Symbols of sqlalchemy.orm.base: compare by identity, cheaply.
    return v is not _NO_VALUE and v is not _NEVER_SET
