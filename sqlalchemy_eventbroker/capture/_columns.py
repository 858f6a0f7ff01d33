"""Column control: which columns events leave out (``exclude``) or show as
``"[redacted]"`` (``redact``), from ``CRUDHookConfig`` and ``__eventbroker__`` on mapped
classes, checked against what is mapped when ``register_crud_hooks`` is called."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.sql.schema import Table

from ..errors import ConfigError
from ._config import CRUDHookConfig, table_names

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper


__all__ = ["REDACTED", "ClassRules", "class_rules", "known_tables", "payload_keys",
           "validate"]

#: What a redacted column's value is replaced by, in the payload and in ``changes``.
REDACTED = "[redacted]"

_CLASS_KEYS = frozenset({"exclude", "redact", "capture"})


@dataclass(frozen=True, slots=True)
class ClassRules:
    """A mapped class's ``__eventbroker__``, checked."""

    exclude: frozenset[str] = frozenset()
    redact: frozenset[str] = frozenset()
    capture: bool = True


def class_rules(cls: type) -> ClassRules:
    """The ``__eventbroker__`` of ``cls`` (inherited ones too).

    Raises:
        ConfigError: not a dict, an unknown key, or a value of the wrong kind; names it.
    """
    spec = getattr(cls, "__eventbroker__", None)
    if spec is None:
        return ClassRules()
    where = f"{cls.__name__}.__eventbroker__"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a dict, got {type(spec).__name__}", path=where)
    unknown = set(spec) - _CLASS_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected exclude, "
                          "redact, capture)", path=f"{where}.{sorted(unknown)[0]}")
    lists: dict[str, frozenset[str]] = {}
    for key in ("exclude", "redact"):
        value = spec.get(key, ())
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigError(f"{where}.{key}: expected a list of column names, got {value!r}",
                              path=f"{where}.{key}")
        lists[key] = frozenset(str(v) for v in value)
    capture = spec.get("capture", True)
    if not isinstance(capture, bool):
        raise ConfigError(f"{where}.capture: expected true or false, got {capture!r}",
                          path=f"{where}.capture")
    return ClassRules(lists["exclude"], lists["redact"], capture)


def payload_keys(table: Table, mapper: Mapper[Any] | None) -> dict[str, str]:
    """Every name a user may give a column (attribute key, column key, column name) → its
    payload key."""
    names: dict[str, str] = {}
    if mapper is not None:
        for prop in mapper.column_attrs:
            key = str(prop.columns[0].key)
            for col in prop.columns:
                names.setdefault(str(col.name), key)
                names.setdefault(str(col.key), key)
            names[prop.key] = key
    else:
        for col in table.columns:
            names[str(col.name)] = str(col.key)
            names[str(col.key)] = str(col.key)
    return names


def known_tables() -> tuple[dict[Table, list[Mapper[Any]]], set[Table]]:
    """``(mappers by their own tables, every table of their MetaData collections)``: what
    is mapped now, association and plain tables declared alongside included."""
    from sqlalchemy.orm import mapperlib

    by_table: dict[Table, list[Mapper[Any]]] = {}
    tables: set[Table] = set()
    seen_md: set[int] = set()
    for reg in list(mapperlib._all_registries()):
        for mapper in list(reg.mappers):
            for t in mapper.tables:
                if not isinstance(t, Table):
                    continue
                by_table.setdefault(t, []).append(mapper)
                if id(t.metadata) not in seen_md:
                    seen_md.add(id(t.metadata))
                    tables.update(t.metadata.tables.values())
                tables.add(t)
    return by_table, tables


def validate(config: CRUDHookConfig, by_table: Mapping[Table, list[Mapper[Any]]],
             tables: Iterable[Table]) -> None:
    """Check every table and column name of ``config`` and of each mapped class's
    ``__eventbroker__`` against what is mapped.

    Raises:
        ConfigError: naming the table or column that matches nothing.
    """
    all_tables = list(tables)
    for field in ("exclude_columns", "redact_columns"):
        spec: Mapping[str, frozenset[str]] = getattr(config, field)
        for name, columns in spec.items():
            matching = [t for t in all_tables if name in table_names(t)]
            path = f"CRUDHookConfig.{field}[{name!r}]"
            if not matching:
                raise ConfigError(f"{path}: no mapped table is named {name!r}", path=path)
            known: set[str] = set()
            for t in matching:
                owners: list[Mapper[Any] | None] = [*by_table.get(t, [])] or [None]
                for owner in owners:
                    known |= set(payload_keys(t, owner))
            for column in sorted(columns):
                if column not in known:
                    raise ConfigError(f"{path}: table {name!r} has no column {column!r}",
                                      path=path)
    checked: set[type] = set()
    for mappers in by_table.values():
        for mapper in mappers:
            cls = mapper.class_
            if cls in checked:
                continue
            checked.add(cls)
            rules = class_rules(cls)
            if not (rules.exclude or rules.redact):
                continue
            known = set(payload_keys(mapper.local_table, mapper))  # type: ignore[arg-type]
            for key, names in (("exclude", rules.exclude), ("redact", rules.redact)):
                for column in sorted(names):
                    if column not in known:
                        path = f"{cls.__name__}.__eventbroker__.{key}"
                        raise ConfigError(f"{path}: {cls.__name__} has no column {column!r}",
                                          path=path)
