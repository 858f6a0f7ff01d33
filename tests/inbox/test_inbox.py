"""Inbox with sync sessions on SQLite and PostgreSQL: one effect per event and consumer, a
raise rolls back both, purge, create_schema, and clear refusals of bad input."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_eventbroker import (
    Broker,
    ConfigError,
    Event,
    EventSource,
    Inbox,
    MemoryProvider,
    ProviderError,
    RetryPolicy,
    new_event,
)

from .conftest import add_effect, count_effects, inbox_rows, wait_for


def _event() -> Event:
    return new_event(EventSource.INTERNAL, "shop.orders.create", payload={"id": 1})


@pytest.fixture
def inbox(session_factory: sessionmaker[Session]) -> Inbox:
    box = Inbox(session_factory, consumer="billing")
    box.create_schema()
    return box


def test_handler__records_and_does_the_work_in_one_commit(inbox: Inbox,
                                                          engine: sa.Engine) -> None:
    """One delivery: the function runs once with an open session; the effect and the inbox row
    are both committed."""
    seen: list[bool] = []

    @inbox.handler
    def on_order(event: Event, session: Session) -> None:
        seen.append(session.in_transaction())
        add_effect(event, session)

    e = _event()
    assert on_order(e) is None
    assert seen == [True]
    assert count_effects(engine, e.id) == 1
    assert inbox_rows(engine) == [("billing", e.id)]


def test_duplicate__skipped_without_calling_the_function(inbox: Inbox, engine: sa.Engine) -> None:
    """A redelivery of a recorded event does not call the function again: still one effect."""
    calls: list[str] = []

    @inbox.handler
    def on_order(event: Event, session: Session) -> None:
        calls.append(event.id)
        add_effect(event, session)

    e, other = _event(), _event()
    on_order(e)
    on_order(e.clone())
    on_order(other)
    on_order(e)
    assert calls == [e.id, other.id]
    assert count_effects(engine, e.id) == 1 and count_effects(engine) == 2


def test_consumers__each_consumer_handles_an_event_once(session_factory: sessionmaker[Session],
                                                       inbox: Inbox, engine: sa.Engine) -> None:
    """Two consumers sharing the table are independent: one effect each."""
    shipping = Inbox(session_factory, consumer="shipping")
    a, b = inbox.handler(add_effect), shipping.handler(add_effect)
    e = _event()
    for handler in (a, b, a, b):
        handler(e)
    assert count_effects(engine, e.id) == 2
    assert inbox_rows(engine) == [("billing", e.id), ("shipping", e.id)]


def test_raise__rolls_back_both_and_a_retry_succeeds_once(inbox: Inbox, engine: sa.Engine) -> None:
    """A function that raises (after writing) leaves neither its effect nor the inbox row; the
    exception propagates; the retry runs it again, once, and later deliveries are skipped."""
    attempts: list[int] = []

    @inbox.handler
    def flaky(event: Event, session: Session) -> None:
        add_effect(event, session)
        session.flush()
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("payment service down")

    e = _event()
    with pytest.raises(RuntimeError, match="payment service down"):
        flaky(e)
    assert count_effects(engine) == 0 and inbox_rows(engine) == []
    flaky(e)
    flaky(e)
    assert len(attempts) == 2
    assert count_effects(engine, e.id) == 1 and inbox_rows(engine) == [("billing", e.id)]


def test_broker__retry_through_the_broker_has_one_effect(inbox: Inbox, engine: sa.Engine) -> None:
    """Subscribed to a broker: a first failure is retried by the broker, the retry commits, and
    publishing the same event again is skipped."""
    attempts: list[int] = []

    @inbox.handler
    def on_order(event: Event, session: Session) -> None:
        attempts.append(1)
        add_effect(event, session)
        if len(attempts) == 1:
            raise RuntimeError("first try fails")

    with Broker(provider=MemoryProvider(), mode="sync", registry=CollectorRegistry(),
                retry_policy=RetryPolicy(max_retries=2, initial_delay=0.01, max_delay=0.02)) as b:
        b.subscribe("shop.orders.*", on_order)
        e = _event()
        b.publish(e)
        b.publish(e.clone())
    assert len(attempts) == 2
    assert count_effects(engine, e.id) == 1


def test_purge__deletes_this_consumers_old_rows_and_returns_the_count(
        inbox: Inbox, session_factory: sessionmaker[Session], engine: sa.Engine) -> None:
    """Rows older than ``older_than`` go (seconds or timedelta), newer rows and other
    consumers' rows stay; the count is returned."""
    now = dt.datetime.now(dt.UTC)
    t = inbox.table
    with engine.begin() as conn:
        conn.execute(t.insert(), [
            {"consumer": "billing", "event_id": "old-1", "processed_at": now - dt.timedelta(days=3)},
            {"consumer": "billing", "event_id": "old-2", "processed_at": now - dt.timedelta(days=2)},
            {"consumer": "billing", "event_id": "new", "processed_at": now},
            {"consumer": "shipping", "event_id": "old-3", "processed_at": now - dt.timedelta(days=3)},
        ])
    assert inbox.purge(dt.timedelta(days=2, hours=12)) == 1
    assert inbox.purge(86400) == 1
    assert inbox.purge(86400.0) == 0
    assert inbox_rows(engine) == [("billing", "new"), ("shipping", "old-3")]
    assert Inbox(session_factory, consumer="shipping").purge(0) == 1


def test_purge__in_batches_until_nothing_old_is_left(inbox: Inbox, engine: sa.Engine) -> None:
    """``batch_size`` rows per transaction, repeated until a batch comes back short: 25 rows in
    batches of 10 are all deleted and counted; another consumer's rows stay."""
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(inbox.table.insert(), [
            {"consumer": c, "event_id": f"e{i}", "processed_at": old}
            for c in ("billing", "shipping") for i in range(25)])
    assert inbox.purge(60, batch_size=10) == 25
    assert inbox.purge(60, batch_size=10) == 0
    assert {c for c, _ in inbox_rows(engine)} == {"shipping"}
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            inbox.purge(60, batch_size=bad)  # type: ignore[arg-type]


def test_purge__a_purged_event_is_handled_again(inbox: Inbox, engine: sa.Engine) -> None:
    """Purging is what bounds the table; what it forgets is no longer deduplicated."""
    handler = inbox.handler(add_effect)
    e = _event()
    handler(e)
    wait_for(lambda: inbox.purge(0) == 1, message="the record to be older than now")
    handler(e)
    assert count_effects(engine, e.id) == 2


def test_create_schema__idempotent_and_custom_table_name(session_factory: sessionmaker[Session],
                                                         engine: sa.Engine) -> None:
    """``create_schema`` creates the table with its primary key and index, twice is fine, and
    ``table_name`` names it."""
    box = Inbox(session_factory, consumer="c", table_name="my_inbox")
    box.create_schema()
    box.create_schema()
    insp = sa.inspect(engine)
    assert "my_inbox" in insp.get_table_names()
    assert insp.get_pk_constraint("my_inbox")["constrained_columns"] == ["consumer", "event_id"]
    assert [i["name"] for i in insp.get_indexes("my_inbox")] == ["ix_my_inbox_processed_at"]
    e = _event()
    box.handler(add_effect)(e)
    assert inbox_rows(engine, "my_inbox") == [("c", e.id)]


def test_missing_table__provider_error_says_how_to_create_it(
        session_factory: sessionmaker[Session], engine: sa.Engine) -> None:
    """Without the table the handler raises a ``ProviderError`` naming the inbox and the fix;
    the function is not called."""
    box = Inbox(session_factory, consumer="billing")
    called: list[int] = []
    handler = box.handler(lambda e, s: called.append(1))
    with pytest.raises(ProviderError, match=r"inbox 'eventbroker_inbox'.*create_schema"):
        handler(_event())
    assert called == []


@pytest.mark.parametrize("consumer", ["", "   ", None, 7, "a\x00b", "x" * 256])
def test_consumer__refused(session_factory: sessionmaker[Session], consumer: object) -> None:
    """An empty, non-string, NUL-bearing or overlong consumer is a ``ConfigError`` naming it."""
    with pytest.raises(ConfigError, match="consumer"):
        Inbox(session_factory, consumer=consumer)  # type: ignore[arg-type]


@pytest.mark.parametrize("table_name", ["", "1inbox", "in box", "inbox;drop", "x" * 40])
def test_table_name__refused_by_the_shared_check(session_factory: sessionmaker[Session],
                                                 table_name: str) -> None:
    """The inbox table name passes the same check as the events table name."""
    with pytest.raises(ConfigError, match="table_name"):
        Inbox(session_factory, consumer="c", table_name=table_name)


def test_arguments__refused_with_clear_errors(session_factory: sessionmaker[Session]) -> None:
    """A non-callable factory or handler, an async function on a sync inbox, and a bad
    ``older_than`` are refused before touching the database."""
    with pytest.raises(ConfigError, match="session_factory"):
        Inbox("sqlite://", consumer="c")  # type: ignore[arg-type]
    box = Inbox(session_factory, consumer="c")
    with pytest.raises(ConfigError, match="handler"):
        box.handler(42)  # type: ignore[call-overload]

    async def on_async(event: Event, session: Session) -> None: ...

    with pytest.raises(ConfigError, match="async_sessionmaker"):
        box.handler(on_async)
    for bad in (-1, dt.timedelta(seconds=-1), "30d", True, float("nan")):
        with pytest.raises(ConfigError, match="older_than"):
            box.purge(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="acreate_schema"):
        Inbox(async_sessionmaker(), consumer="c").create_schema()
