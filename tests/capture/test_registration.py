"""register_crud_hooks targets, handles and the default broker (SQLite, sync unless noted)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from sqlalchemy_eventbroker import default
from sqlalchemy_eventbroker.capture import CRUDHookConfig, register_crud_hooks

from .conftest import Harness
from .models import User


def test_target__sessionmaker_captures_only_its_own_sessions(hs: Harness) -> None:
    """Hooking one sessionmaker leaves other sessionmakers and plain Sessions alone."""
    hs.capture()
    other = sessionmaker(hs.engine)
    with other.begin() as s:
        s.add(User(name="other"))
    with Session(hs.engine) as s, s.begin():
        s.add(User(name="plain"))
    hs.tx(lambda s: s.add(User(name="mine")))
    assert [e.payload["name"] for e in hs.events] == ["mine"]


def test_target__scoped_session(hs: Harness) -> None:
    """A scoped_session is hooked through its session factory."""
    scoped = scoped_session(sessionmaker(hs.engine))
    hs.capture(factory=scoped)
    with scoped.begin():
        scoped.add(User(name="scoped"))
    scoped.remove()
    assert [e.payload["name"] for e in hs.events] == ["scoped"]


def test_target__session_subclass(hs: Harness) -> None:
    """A Session subclass is captured, its subclasses too."""
    class AppSession(Session):
        pass

    class Child(AppSession):
        pass

    hs.capture(factory=AppSession)
    for cls in (AppSession, Child, Session):
        with cls(hs.engine) as s, s.begin():
            s.add(User(name=cls.__name__))
    assert [e.payload["name"] for e in hs.events] == ["AppSession", "Child"]


def test_target__async_sessionmaker_gets_a_private_class_undone_by_remove(
        tmp_path: object, sqlite_url: str) -> None:
    """An async_sessionmaker without its own sync class gets a private one, restored on remove."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    engine = create_async_engine(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"))
    factory = async_sessionmaker(engine)
    handle = register_crud_hooks(factory, broker=_broker())
    try:
        assert factory.kw["sync_session_class"] is handle.session_class
        assert handle.session_class is not Session and issubclass(handle.session_class, Session)
    finally:
        handle.remove()
        asyncio.run(engine.dispose())
    assert "sync_session_class" not in factory.kw


def test_target__wrong_object_is_a_type_error() -> None:
    """Anything but a session factory or Session class is refused."""
    with pytest.raises(TypeError, match="sessionmaker"):
        register_crud_hooks(object(), broker=_broker())


def test_handles__two_registrations_capture_twice_and_remove_separately(hs: Harness) -> None:
    """Two handles on one factory are independent."""
    first = hs.capture()
    hs.capture()
    hs.tx(lambda s: s.add(User(name="a")))
    first.remove()
    hs.tx(lambda s: s.add(User(name="b")))
    assert [e.payload["name"] for e in hs.events] == ["a", "a", "b"]


def test_default_broker__resolved_at_publish_time(hs: Harness) -> None:
    """Without broker=, the default broker in place at commit time gets the events."""
    handle = register_crud_hooks(hs.factory, CRUDHookConfig())
    previous = default.set_default_broker(hs.broker)
    try:
        hs.tx(lambda s: s.add(User(name="via-default")))
    finally:
        default.set_default_broker(previous)
        handle.remove()
    assert [e.payload["name"] for e in hs.events] == ["via-default"]


def test_default_broker__missing_never_fails_the_commit(hs: Harness) -> None:
    """With no default broker, the commit succeeds and the events are logged as lost."""
    handle = register_crud_hooks(hs.factory)
    previous = default.set_default_broker(None)
    try:
        hs.tx(lambda s: s.add(User(name="lost")))
    finally:
        default.set_default_broker(previous)
        handle.remove()
    with Session(hs.engine) as s:
        assert s.scalar(sa.select(User.name)) == "lost"


def _broker():
    from prometheus_client import CollectorRegistry

    from sqlalchemy_eventbroker import Broker

    return Broker(mode="sync", registry=CollectorRegistry())
