"""SQLite with SQLAlchemy's documented savepoint recipe for pysqlite (``isolation_level =
None`` on connect, our own ``BEGIN`` on begin): the session's transaction begins, and takes a
read lock, at its first SELECT. The outbox writes through the session's connection, read
events wait for the transaction's end, so nothing meets "database is locked"; savepoints work.
Sync and async (aiosqlite) sessions, a provider on the same file."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_eventbroker import Broker, EventFilter, RetryPolicy
from sqlalchemy_eventbroker.capture import CRUDHookConfig, register_crud_hooks
from sqlalchemy_eventbroker.testing import EventRecorder

from .models import User

database = pytest.importorskip("sqlalchemy_eventbroker.providers.database")


def _recipe(engine: sa.Engine) -> None:
    """https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#serializable-isolation-savepoints-transactional-ddl"""
    @sa.event.listens_for(engine, "connect")
    def do_connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN of its own

    @sa.event.listens_for(engine, "begin")
    def do_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN")


class _App:
    def __init__(self, path: Path, is_async: bool, read: bool) -> None:
        self.is_async = is_async
        url = f"sqlite:///{path}"
        if is_async:
            from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

            self.engine: Any = create_async_engine(f"sqlite+aiosqlite:///{path}")
            self.sync_engine = self.engine.sync_engine
            self.factory: Any = async_sessionmaker(self.engine, expire_on_commit=False)
        else:
            self.engine = self.sync_engine = sa.create_engine(url)
            self.factory = sessionmaker(self.engine, expire_on_commit=False)
        _recipe(self.sync_engine)
        plain = sa.create_engine(url)
        User.__table__.create(plain)
        plain.dispose()
        self.provider = database.DatabaseProvider(url)  # its own engine, same file
        self.provider.create_schema()
        self.registry = CollectorRegistry()
        self.broker = Broker(self.provider, mode="sync", instance_id="recipe",
                             retry_policy=RetryPolicy(max_retries=0),
                             registry=self.registry).start()
        self.recorder = EventRecorder()
        self.broker.subscribe("*", self.recorder)
        self.handle = register_crud_hooks(self.factory, CRUDHookConfig(enable_read=read),
                                          broker=self.broker)

    def tx(self, fn: Callable[[Session], Any], *, commit: bool = True) -> Any:
        if not self.is_async:
            with self.factory() as s:
                out = fn(s)
                s.commit() if commit else s.rollback()
                return out

        async def main() -> Any:
            async with self.factory() as s:
                out = await s.run_sync(fn)
                await (s.commit() if commit else s.rollback())
                return out

        return asyncio.run(main())

    def errors(self) -> float:
        return self.registry.get_sample_value("eventbroker_errors_total",
                                              {"kind": "capture"}) or 0.0

    def stored(self, operation: str) -> list[str]:
        return [e.payload["name"] for e in self.provider.list(EventFilter(entity="users"))
                if e.operation == operation]

    def close(self) -> None:
        self.handle.remove()
        self.broker.stop()
        self.provider.close()
        if self.is_async:
            asyncio.run(self.engine.dispose())
        else:
            self.engine.dispose()


@pytest.fixture(params=["sync", "async"])
def app_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., _App]]:
    made: list[_App] = []

    def make(read: bool = False) -> _App:
        made.append(_App(tmp_path / "app.db", request.param == "async", read))
        return made[-1]

    yield make
    for app in made:
        app.close()


def test_recipe__select_then_write_commits_data_and_events_together(
        app_factory: Callable[..., _App]) -> None:
    """A transaction that reads first, then writes: the event rows go in through the
    session's connection and commit with the data; no lock error, no capture error."""
    app = app_factory()
    started = time.monotonic()
    app.tx(lambda s: (s.scalars(sa.select(User)).all(), s.add(User(name="a"))))
    assert time.monotonic() - started < 3  # no wait for a lock
    assert app.stored("create") == ["a"]
    assert [e.payload["name"] for e in app.recorder.events] == ["a"]
    assert app.errors() == 0
    app.tx(lambda s: (s.scalars(sa.select(User)).all(), s.add(User(name="b"))), commit=False)
    assert app.stored("create") == ["a"]


def test_recipe__savepoints_release_and_roll_back(app_factory: Callable[..., _App]) -> None:
    """With the recipe ``begin_nested()`` works: a rolled-back savepoint takes its rows and
    event rows with it, a released one keeps them."""
    app = app_factory()

    def work(s: Session) -> None:
        s.scalars(sa.select(User)).all()
        s.add(User(name="kept"))
        s.flush()
        with s.begin_nested():
            s.add(User(name="released"))
        sp = s.begin_nested()
        s.add(User(name="undone"))
        s.flush()
        sp.rollback()

    app.tx(work)
    assert app.stored("create") == ["kept", "released"]
    assert app.errors() == 0


def test_recipe__read_events_wait_for_the_end_of_the_transaction(
        app_factory: Callable[..., _App], caplog: pytest.LogCaptureFixture) -> None:
    """Read events (written by the provider on its own connection) are published when the
    transaction ends, after its lock is gone: never "database is locked"; a rollback still
    publishes the reads, and none of the writes."""
    app = app_factory()
    app.tx(lambda s: s.add_all([User(name="a"), User(name="b")]))
    app.handle.remove()
    app.handle = register_crud_hooks(app.factory, CRUDHookConfig(enable_read=True),
                                     broker=app.broker)
    app.recorder.clear()
    caplog.set_level(logging.ERROR)

    def work(s: Session) -> None:
        s.scalars(sa.select(User)).all()
        assert app.recorder.events == []  # waiting for the transaction's end
        s.add(User(name="c"))

    started = time.monotonic()
    app.tx(work)
    assert time.monotonic() - started < 3
    assert sorted((e.operation, e.payload["name"]) for e in app.recorder.events) == [
        ("create", "c"), ("read", "a"), ("read", "b")]
    assert app.stored("read") == ["a", "b"]
    assert "database is locked" not in caplog.text and app.errors() == 0
    app.recorder.clear()
    app.tx(lambda s: (s.scalars(sa.select(User).where(User.name == "c")).all(),
                      s.add(User(name="d"))), commit=False)
    assert [(e.operation, e.payload["name"]) for e in app.recorder.events] == [("read", "c")]
