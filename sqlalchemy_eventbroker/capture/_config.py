"""``CRUDHookConfig``: which operations and tables ``register_crud_hooks`` turns into events."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import KW_ONLY, dataclass, field
from types import MappingProxyType

from sqlalchemy.sql.schema import Table

__all__ = ["CRUDHookConfig", "table_names"]

#: The schema a table without one is in, per dialect: ``public.users`` names ``users`` too.
_DEFAULT_SCHEMAS = ("public", "main")


def table_names(table: Table) -> frozenset[str]:
    """The names configuration may use for ``table``: its name, ``schema.name``, and for a
    table without a schema, ``public.name`` / ``main.name`` (the default schemas)."""
    names = {table.name, table.fullname}
    if table.schema is None:
        names.update(f"{schema}.{table.name}" for schema in _DEFAULT_SCHEMAS)
    return frozenset(names)


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
    #: Capture statements run through the session (ORM bulk and Core DML) and the legacy
    #: bulk methods.
    capture_bulk: bool = True
    #: Columns that appear nowhere in events, by table name (or ``schema.table``; a table
    #: without a schema also answers to ``public.<name>`` and ``main.<name>``):
    #: ``{"users": ["password_hash"]}``. Column names or keys.
    exclude_columns: Mapping[str, Collection[str]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False)
    #: Columns whose values events show as ``"[redacted]"`` (payload, and ``old``/``new`` of
    #: a change, which stays visible), by table name (or ``schema.table``).
    redact_columns: Mapping[str, Collection[str]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                raise TypeError(f"CRUDHookConfig.{name}: expected a collection of table "
                                f"names, got the string {value!r}")
            object.__setattr__(self, name, frozenset(value))
        for name in ("exclude_columns", "redact_columns"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise TypeError(f"CRUDHookConfig.{name}: expected a mapping of table name to "
                                f"column names, got {type(value).__name__}")
            frozen: dict[str, frozenset[str]] = {}
            for table, columns in value.items():
                if isinstance(columns, str):
                    raise TypeError(f"CRUDHookConfig.{name}[{table!r}]: expected a collection "
                                    f"of column names, got the string {columns!r}")
                frozen[str(table)] = frozenset(str(c) for c in columns)
            object.__setattr__(self, name, MappingProxyType(frozen))

    def columns_of(self, table: Table) -> tuple[frozenset[str], frozenset[str]]:
        """``(excluded, redacted)`` column names given for ``table`` (by name or full name)."""
        out: list[frozenset[str]] = []
        for spec in (self.exclude_columns, self.redact_columns):
            names: frozenset[str] = frozenset()
            for key in table_names(table):
                names |= frozenset(spec.get(key, ()))
            out.append(names)
        return out[0], out[1]

    def captures(self, table: Table) -> bool:
        """Whether events are built for rows of ``table``."""
        names = (table.name, table.fullname)
        if self.include is not None and not any(n in self.include for n in names):
            return False
        return not any(n in self.exclude for n in names)
