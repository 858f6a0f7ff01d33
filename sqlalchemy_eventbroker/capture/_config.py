"""``CRUDHookConfig``: which operations and tables ``register_crud_hooks`` turns into events."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

from sqlalchemy.sql.schema import Table

__all__ = ["CRUDHookConfig"]


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
