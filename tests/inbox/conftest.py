"""Fixtures for the inbox tests: a fresh database of each kind with an ``effects`` table (the
handler's work, one row per call, no unique constraint so a double effect shows), sync and
async session factories, and a deadline poll."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_eventbroker import Event

metadata = sa.MetaData()
#: What a handler does: one row per call (a duplicate effect is a second row).
effects = sa.Table(
    "effects", metadata,
    sa.Column("n", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(255), nullable=False),
)


def add_effect(event: Event, session: Session) -> None:
    """The handler's work: one INSERT in the inbox's transaction."""
    session.execute(effects.insert().values(event_id=event.id))


def count_effects(engine: sa.Engine, event_id: str | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(effects)
    if event_id is not None:
        query = query.where(effects.c.event_id == event_id)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def inbox_rows(engine: sa.Engine, table: str = "eventbroker_inbox") -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT consumer, event_id FROM {table} ORDER BY 1, 2"))
        return [(r[0], r[1]) for r in rows]


def wait_for(condition: Callable[[], object], timeout: float = 15.0,
             message: str = "condition") -> None:
    """Poll ``condition`` until true; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.01)


def async_url(url: str) -> str:
    """The async driver's URL for a sync test URL (aiosqlite, psycopg async)."""
    u = sa.make_url(url)
    driver = "sqlite+aiosqlite" if u.get_backend_name() == "sqlite" else "postgresql+psycopg"
    return u.set(drivername=driver).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of each kind (dropped afterwards)."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """A sync engine on ``db_url`` with the ``effects`` table."""
    e = sa.create_engine(db_url)
    metadata.create_all(e)
    yield e
    e.dispose()


@pytest.fixture
def session_factory(engine: sa.Engine) -> sessionmaker[Session]:
    return sessionmaker(engine)


@pytest.fixture
def async_engine(db_url: str, engine: sa.Engine) -> Iterator[AsyncEngine]:
    """An async engine on the same database. NullPool: each test's ``asyncio.run`` and the
    broker's loop get their own connections (a pooled one is bound to its loop)."""
    e = create_async_engine(async_url(db_url), poolclass=sa.pool.NullPool)
    yield e
    e.sync_engine.dispose()


@pytest.fixture
def async_factory(async_engine: AsyncEngine) -> async_sessionmaker:  # type: ignore[type-arg]
    return async_sessionmaker(async_engine)
