"""The capture harness: one test body over SQLite and PostgreSQL, sync and async sessions.

``h.tx(fn)`` runs ``fn(session)`` (a sync ``Session``) in one transaction and commits it: for
the async variants the transaction is begun and committed through ``AsyncSession`` and ``fn``
runs through ``run_sync``, so the hooks are exercised on the async session's sync class.
Brokers are in sync mode, so events have been dispatched when ``tx`` returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_eventbroker import Broker, Event, MemoryProvider, RetryPolicy
from sqlalchemy_eventbroker.capture import CaptureHandle, CRUDHookConfig, register_crud_hooks
from sqlalchemy_eventbroker.testing import EventRecorder

from .models import AUDIT_SCHEMA, Base

#: Put in the refused value; must appear in no log message and no exception text.
MARKER = "do-not-log-7c1f"


def assert_marker_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    """No record of ours, its message or exception, says what the refused value held.

    (Drivers' own DEBUG logs, aiosqlite's say, do print parameters; they are not ours.)
    """
    ours = [r for r in caplog.records if r.name.startswith("sqlalchemy_eventbroker")]
    assert ours
    for record in ours:
        assert MARKER not in caplog.handler.format(record)
        assert MARKER not in record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            assert MARKER not in repr(record.exc_info[1])


def _attach_audit(path: str) -> Callable[..., None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"ATTACH DATABASE '{path}' AS {AUDIT_SCHEMA}")
        cur.close()

    return on_connect


class Harness:
    """An engine, a session factory, a sync-mode broker with a recorder on ``*``."""

    def __init__(self, dialect: str, is_async: bool, url: str, tmp: str) -> None:
        self.dialect = dialect
        self.is_async = is_async
        self.schema = "public" if dialect == "postgresql" else "main"
        self.runner = asyncio.Runner() if is_async else None
        self.url = url
        sync_url = sa.make_url(url)
        if dialect == "sqlite":
            self.sync_engine = sa.create_engine(sync_url)
            sa.event.listen(self.sync_engine, "connect",
                            _attach_audit(os.path.join(tmp, "audit.db")))
        else:
            self.sync_engine = sa.create_engine(sync_url)
            with self.sync_engine.begin() as conn:  # a clean database, faster than a new one
                conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
                conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {AUDIT_SCHEMA} CASCADE")
                conn.exec_driver_sql("CREATE SCHEMA public")
                conn.exec_driver_sql(f"CREATE SCHEMA {AUDIT_SCHEMA}")
        Base.metadata.create_all(self.sync_engine)
        if is_async:
            from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

            aurl = sync_url.set(drivername="sqlite+aiosqlite" if dialect == "sqlite"
                                else "postgresql+psycopg")
            self.engine: Any = create_async_engine(aurl)
            if dialect == "sqlite":
                sa.event.listen(self.engine.sync_engine, "connect",
                                _attach_audit(os.path.join(tmp, "audit.db")))
            self.factory: Any = async_sessionmaker(self.engine, expire_on_commit=False)
        else:
            self.engine = self.sync_engine
            self.factory = sessionmaker(self.engine, expire_on_commit=False)
        self.registry = CollectorRegistry()
        self.broker = Broker(MemoryProvider(), mode="sync", instance_id="capture-test",
                             retry_policy=RetryPolicy(max_retries=0),
                             registry=self.registry).start()
        self.recorder = EventRecorder()
        self.broker.subscribe("*", self.recorder)
        self.handles: list[CaptureHandle] = []

    # -- capture ----------------------------------------------------------------------------

    def capture(self, config: CRUDHookConfig | None = None, factory: Any = None,
                broker: Broker | None = None) -> CaptureHandle:
        handle = register_crud_hooks(factory if factory is not None else self.factory, config,
                                     broker=broker or self.broker)
        self.handles.append(handle)
        return handle

    @property
    def events(self) -> list[Event]:
        return self.recorder.events

    def summary(self) -> list[tuple[str, Any]]:
        """``(type, payload)`` of every event received, in order."""
        return [(e.type, e.payload) for e in self.events]

    def t(self, entity: str, op: str, schema: str | None = None) -> str:
        return f"{schema or self.schema}.{entity}.{op}"

    # -- running work -----------------------------------------------------------------------

    def tx(self, fn: Callable[[Session], Any], *, commit: bool = True) -> Any:
        """Run ``fn(session)`` in one transaction; commit it (or roll it back)."""
        if not self.is_async:
            with self.factory() as session:
                session.begin()
                out = fn(session)
                session.commit() if commit else session.rollback()
                return out

        async def main() -> Any:
            async with self.factory() as session:
                await session.begin()
                out = await session.run_sync(fn)
                await (session.commit() if commit else session.rollback())
                return out

        return self.run(main())

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on this harness's loop, in the caller's current context."""
        assert self.runner is not None
        return self.runner.run(coro, context=contextvars.copy_context())

    def capture_errors(self) -> float:
        """How many failures capture kept away from the user (the broker's counter)."""
        value = self.registry.get_sample_value("eventbroker_errors_total", {"kind": "capture"})
        return value or 0.0

    def count_statements(self) -> list[str]:
        """A list that fills with every statement the engine sends from now on."""
        seen: list[str] = []

        def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            seen.append(statement)

        sa.event.listen(self.sync_engine if not self.is_async else self.engine.sync_engine,
                        "before_cursor_execute", on_execute)
        return seen

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.broker.stop()
        if self.is_async:
            self.run(self.engine.dispose())
            assert self.runner is not None
            self.runner.close()
        self.sync_engine.dispose()


@pytest.fixture(scope="session")
def capture_pg_url(postgres_server_url: str) -> Iterator[str]:
    """One PostgreSQL database for the capture tests; each harness empties it first.

    Creating a database per test costs ~0.5 s here; dropping and recreating the schemas
    costs a few milliseconds and leaves the same clean slate.
    """
    name = f"ebcapture_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(postgres_server_url).set(database=name).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _harness(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Harness]:
    dialect, kind = request.param.split("-")
    url = (request.getfixturevalue("capture_pg_url") if dialect == "postgresql"
           else request.getfixturevalue("sqlite_url"))
    harness = Harness(dialect, kind == "async", url, os.fspath(tmp_path))
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(params=["sqlite-sync", "sqlite-async", "postgresql-sync", "postgresql-async"])
def h(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Harness]:
    """The harness for one (database, session kind) combination."""
    yield from _harness(request, tmp_path)


@pytest.fixture(params=["sqlite-sync", "postgresql-sync"])
def h_sync(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Harness]:
    """The harness with plain (threaded) sessions only, on both databases."""
    yield from _harness(request, tmp_path)


@pytest.fixture(params=["sqlite-async", "postgresql-async"])
def h_async(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Harness]:
    """The harness with AsyncSession only, on both databases."""
    yield from _harness(request, tmp_path)


@pytest.fixture
def hs(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Harness]:
    """A sync SQLite harness, for tests about registration rather than databases."""
    harness = Harness("sqlite", False, request.getfixturevalue("sqlite_url"),
                      os.fspath(tmp_path))
    try:
        yield harness
    finally:
        harness.close()
