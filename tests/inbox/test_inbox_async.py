"""Inbox with ``async_sessionmaker`` (aiosqlite, psycopg async): the same guarantees as the
sync inbox, with an ``async def`` handler, also when the broker runs it on its own loop."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from sqlalchemy_eventbroker import (
    Broker,
    ConfigError,
    Event,
    EventSource,
    Inbox,
    MemoryProvider,
    RetryPolicy,
    new_event,
)

from .conftest import count_effects, effects, inbox_rows

Factory = async_sessionmaker[AsyncSession]


def _event() -> Event:
    return new_event(EventSource.INTERNAL, "shop.orders.create", payload={"id": 1})


async def _add_effect(event: Event, session: AsyncSession) -> None:
    await session.execute(effects.insert().values(event_id=event.id))


@pytest.fixture
def inbox(async_factory: Factory) -> Inbox:
    box = Inbox(async_factory, consumer="billing")
    asyncio.run(box.acreate_schema())
    return box


def test_async__duplicate_skipped(inbox: Inbox, engine: sa.Engine) -> None:
    """The wrapped handler is a coroutine function; a second delivery does not call the
    function; the work and the record commit together."""
    calls: list[str] = []

    @inbox.handler
    async def on_order(event: Event, session: AsyncSession) -> None:
        calls.append(event.id)
        assert session.in_transaction()
        await _add_effect(event, session)

    e = _event()

    async def deliver() -> None:
        await on_order(e)
        await on_order(e.clone())

    assert asyncio.iscoroutinefunction(on_order)
    asyncio.run(deliver())
    assert calls == [e.id]
    assert count_effects(engine, e.id) == 1 and inbox_rows(engine) == [("billing", e.id)]


def test_async__raise_rolls_back_both_and_retry_succeeds_once(inbox: Inbox,
                                                               engine: sa.Engine) -> None:
    """A raise after writing leaves no effect and no record; the retry commits once."""
    attempts: list[int] = []

    @inbox.handler
    async def flaky(event: Event, session: AsyncSession) -> None:
        await _add_effect(event, session)
        await session.flush()
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("down")

    e = _event()
    with pytest.raises(RuntimeError, match="down"):
        asyncio.run(flaky(e))
    assert count_effects(engine) == 0 and inbox_rows(engine) == []
    asyncio.run(flaky(e))
    asyncio.run(flaky(e))
    assert len(attempts) == 2 and count_effects(engine, e.id) == 1


def test_async__plain_function_with_an_async_session(inbox: Inbox, engine: sa.Engine) -> None:
    """A plain function that only ``session.add``s (no await) also works on an async inbox."""
    e = _event()

    def on_order(event: Event, session: AsyncSession) -> None:
        session.add_all([])  # nothing to await; the record alone is the effect

    asyncio.run(inbox.handler(on_order)(e))  # type: ignore[arg-type]
    assert inbox_rows(engine) == [("billing", e.id)]


def test_async__broker_runs_it_on_its_loop_with_one_effect(inbox: Inbox, engine: sa.Engine) -> None:
    """Subscribed to a broker: the first attempt fails and is retried by the broker; the same
    event published again is skipped."""
    attempts: list[int] = []

    @inbox.handler
    async def on_order(event: Event, session: AsyncSession) -> None:
        attempts.append(1)
        await _add_effect(event, session)
        if len(attempts) == 1:
            raise RuntimeError("first try fails")

    with Broker(provider=MemoryProvider(), mode="sync", registry=CollectorRegistry(),
                retry_policy=RetryPolicy(max_retries=2, initial_delay=0.01, max_delay=0.02)) as b:
        b.subscribe("shop.orders.*", on_order)
        e = _event()
        b.publish(e)
        b.publish(e.clone())
    assert len(attempts) == 2 and count_effects(engine, e.id) == 1


def test_async__apurge_and_sync_methods_refused(inbox: Inbox, engine: sa.Engine) -> None:
    """``apurge`` deletes old rows and counts them; the sync ``purge``/``create_schema`` of an
    async inbox say which coroutine to await instead."""
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        conn.execute(inbox.table.insert(), [
            {"consumer": "billing", "event_id": "old", "processed_at": now - dt.timedelta(days=9)},
            {"consumer": "billing", "event_id": "new", "processed_at": now},
        ])
    assert asyncio.run(inbox.apurge(dt.timedelta(days=1))) == 1
    assert inbox_rows(engine) == [("billing", "new")]
    with pytest.raises(ConfigError, match="apurge"):
        inbox.purge(1)
    with pytest.raises(ConfigError, match="acreate_schema"):
        inbox.create_schema()


def test_async__a_methods_refused_on_a_sync_inbox(engine: sa.Engine) -> None:
    """The twins are exact: ``acreate_schema`` on a sync inbox names ``create_schema``."""
    from sqlalchemy.orm import sessionmaker

    box = Inbox(sessionmaker(engine), consumer="c")
    coro: Any = box.acreate_schema()
    with pytest.raises(ConfigError, match=r"inbox\.create_schema\(\)"):
        asyncio.run(coro)
