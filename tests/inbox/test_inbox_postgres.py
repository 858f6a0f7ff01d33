"""The inbox on PostgreSQL under real double deliveries: a group redelivers an event to another
broker's member, a retry after the commit, and four threads delivering one event at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_eventbroker import Broker, Event, EventSource, Inbox, RetryPolicy, new_event
from sqlalchemy_eventbroker.providers.database import DatabaseProvider

from .conftest import add_effect, count_effects, inbox_rows, metadata, wait_for

QUICK = RetryPolicy(max_retries=3, initial_delay=0.01, max_delay=0.05)


@pytest.fixture
def engine(postgres_url: str) -> Iterator[sa.Engine]:
    e = sa.create_engine(postgres_url, pool_size=8)
    metadata.create_all(e)
    yield e
    e.dispose()


@pytest.fixture
def inbox(engine: sa.Engine) -> Inbox:
    box = Inbox(sessionmaker(engine), consumer="billing")
    box.create_schema()
    return box


@pytest.fixture
def make_broker(postgres_url: str) -> Iterator[Callable[[str], Broker]]:
    """Started brokers, each with its own ``DatabaseProvider`` (as separate processes would
    have); stopped and closed at teardown."""
    made: list[Broker] = []

    def make(instance_id: str) -> Broker:
        provider = DatabaseProvider(postgres_url, poll_interval=0.05, backstop_interval=0.2)
        provider.create_schema()
        broker = Broker(provider=provider, instance_id=instance_id, registry=CollectorRegistry(),
                        retry_policy=QUICK, worker_count=2)
        broker.start()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop(timeout=5)
        broker.provider.close()


class Counter:
    """Counts calls, thread-safely."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            self.n += 1
            return self.n


def _event() -> Event:
    return new_event(EventSource.INTERNAL, "shop.orders.create", payload={"id": 42})


def test_group__redelivery_to_another_member_has_one_effect(
        inbox: Inbox, engine: sa.Engine, make_broker: Callable[[str], Broker]) -> None:
    """Two brokers are members of group ``billing``; the same event travels twice (stored
    again by a third broker). Both deliveries reach a member, the function runs once."""
    deliveries, calls = Counter(), Counter()

    @inbox.handler
    def on_order(event: Event, session: Session) -> None:
        calls()
        add_effect(event, session)

    def member(event: Event) -> None:
        deliveries()
        on_order(event)

    a, b, publisher = make_broker("a"), make_broker("b"), make_broker("publisher")
    a.subscribe("shop.orders.*", member, group="billing")
    b.subscribe("shop.orders.*", member, group="billing")
    e = _event()
    publisher.publish(e)
    wait_for(lambda: deliveries.n == 1 and calls.n == 1, message="the first delivery")
    publisher.publish(e.clone())
    wait_for(lambda: deliveries.n == 2, message="the redelivery")
    for broker in (a, b, publisher):
        broker.stop(timeout=5)
    assert calls.n == 1 and deliveries.n == 2
    assert count_effects(engine, e.id) == 1 and inbox_rows(engine) == [("billing", e.id)]


def test_group__retry_after_the_commit_is_skipped(
        inbox: Inbox, engine: sa.Engine, make_broker: Callable[[str], Broker]) -> None:
    """The inbox transaction commits, then the member fails before acknowledging (as if it
    crashed): the broker's retry reaches the inbox, which skips it; the event completes."""
    deliveries, calls = Counter(), Counter()

    @inbox.handler
    def on_order(event: Event, session: Session) -> None:
        calls()
        add_effect(event, session)

    def member(event: Event) -> None:
        on_order(event)
        if deliveries() == 1:
            raise ConnectionError("lost before the acknowledgement")

    a, publisher = make_broker("a"), make_broker("publisher")
    a.subscribe("shop.orders.*", member, group="billing")
    e = _event()
    publisher.publish(e)
    wait_for(lambda: (got := publisher.provider.get(e.id)) is not None
             and got.status == "completed", message="the event to complete")
    assert deliveries.n == 2 and calls.n == 1
    assert count_effects(engine, e.id) == 1


def _lock_waiters(monitor: sa.Engine) -> int:
    """Backends of this database waiting on a lock (the losers blocked on the winner's row)."""
    with monitor.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")).scalar_one())


def _deliver_concurrently(handler: Callable[[Event], None], event: Event,
                          threads: int = 4) -> list[BaseException]:
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait(timeout=10)
        try:
            handler(event.clone())
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers)
    return errors


def test_concurrent__four_deliveries_of_one_event_have_one_effect(
        inbox: Inbox, engine: sa.Engine, postgres_url: str) -> None:
    """Four threads deliver one event at once. The winner holds its uncommitted inbox row until
    the three others are seen blocked on it; then it commits and they return without calling
    the function and without error."""
    monitor = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    calls = Counter()

    @inbox.handler
    def on_order(event: Event, session: Session) -> None:
        calls()
        add_effect(event, session)
        wait_for(lambda: _lock_waiters(monitor) == 3, message="three deliveries blocked")

    e = _event()
    try:
        errors = _deliver_concurrently(on_order, e)
    finally:
        monitor.dispose()
    assert errors == []
    assert calls.n == 1
    assert count_effects(engine, e.id) == 1 and inbox_rows(engine) == [("billing", e.id)]


def test_concurrent__winner_raises_then_exactly_one_loser_does_the_work(
        inbox: Inbox, engine: sa.Engine, postgres_url: str) -> None:
    """If the winner rolls back, its row goes with it: one blocked delivery then inserts and
    does the work, the other two skip; only the winner's exception escapes."""
    monitor = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    calls = Counter()

    @inbox.handler
    def on_order(event: Event, session: Session) -> None:
        n = calls()
        add_effect(event, session)
        wait_for(lambda: _lock_waiters(monitor) == 4 - n, message=f"{4 - n} blocked")
        if n == 1:
            raise RuntimeError("winner fails")

    e = _event()
    try:
        errors = _deliver_concurrently(on_order, e)
    finally:
        monitor.dispose()
    assert [str(x) for x in errors] == ["winner fails"]
    assert calls.n == 2
    assert count_effects(engine, e.id) == 1 and inbox_rows(engine) == [("billing", e.id)]
