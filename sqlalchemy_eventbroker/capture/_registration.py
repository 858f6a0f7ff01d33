"""``register_crud_hooks``: which session class to hook, the listeners, and the handle."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Mapper, Session, scoped_session, sessionmaker

from ._bulk import BulkStatements
from ._capture import Capture
from ._columns import known_tables, validate
from ._config import CRUDHookConfig
from ._legacy import LegacyBulk
from ._reads import Reads
from ._unit_of_work import UnitOfWork

if TYPE_CHECKING:
    from ..broker import Broker

__all__ = ["CaptureHandle", "register_crud_hooks"]

#: ``(target, identifier, fn)`` as given to ``sqlalchemy.event.listen``.
Listener = tuple[Any, str, Callable[..., Any]]


class CaptureHandle:
    """What ``register_crud_hooks`` returns; ``remove()`` stops capturing.

    Also a context manager: ``with register_crud_hooks(...):`` removes on exit.
    """

    def __init__(self, capture: Capture, listeners: list[Listener],
                 restore: Callable[[], None] | None) -> None:
        self._capture = capture
        #: Each ``(target, identifier, fn)`` given to ``sqlalchemy.event.listen``.
        self.listeners = listeners
        self._restore = restore
        self._lock = threading.Lock()

    @property
    def is_active(self) -> bool:
        """Whether the listeners are still attached (``remove()`` was not called)."""
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
        ConfigError: a table or column named in ``config.exclude_columns`` /
            ``redact_columns``, or in a mapped class's ``__eventbroker__``, matches nothing
            among the classes mapped now (their tables and the tables of their MetaData).
    """
    config = config if config is not None else CRUDHookConfig()
    by_table, tables = known_tables()
    validate(config, by_table, tables)
    session_class, restore = _session_class_of(session_factory)
    capture = Capture(session_class, config, broker, by_table)
    listeners: list[Listener] = []
    if config.enable_create or config.enable_update or config.enable_delete:
        uow = UnitOfWork(capture)
        listeners += [
            (session_class, "after_flush", uow.after_flush),
            (session_class, "after_commit", uow.after_commit),
            (session_class, "after_transaction_end", uow.after_transaction_end),
        ]
        if config.capture_bulk:
            listeners.append((session_class, "do_orm_execute",
                              BulkStatements(uow).do_orm_execute))
            # The legacy bulk methods have no event: their one entry point is wrapped.
            unwrap = LegacyBulk(uow).install(session_class)
            if unwrap is not None:
                restore = _both(unwrap, restore)
    if config.enable_read:
        reads = Reads(capture)
        listeners += [
            (Mapper, "load", reads.on_load),
            (session_class, "after_transaction_end", reads.after_transaction_end),
        ]
    try:
        for target, identifier, fn in listeners:
            sa_event.listen(target, identifier, fn)
    except BaseException:
        CaptureHandle(capture, listeners, restore).remove()
        raise
    return CaptureHandle(capture, listeners, restore)


def _both(first: Callable[[], None], then: Callable[[], None] | None) -> Callable[[], None]:
    def restore() -> None:
        try:
            first()
        finally:
            if then is not None:
                then()

    return restore


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
        private = type("CapturedSession", (Session,), {"__module__": __package__})
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
