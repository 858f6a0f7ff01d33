"""Group members take deliveries in batches, bounded per worker, each handled once.

Runs on MemoryProvider and on a SQLite DatabaseProvider, so neither needs a server (the
section-4 adapter, one delivery per call, is covered by the conformance suite).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sqlalchemy_eventbroker import Broker, Event, EventSource, MemoryProvider, new_event
from sqlalchemy_eventbroker._bus import IN_FLIGHT_PER_WORKER
from sqlalchemy_eventbroker.providers.base import BatchGroupStream, BusProvider
from sqlalchemy_eventbroker.providers.database import DatabaseProvider

from .conftest import Waiter

MakeBroker = Callable[..., Broker]


@pytest.fixture(params=["memory", "sqlite"])
def provider_factory(request: pytest.FixtureRequest,
                     tmp_path: Path) -> Iterator[Callable[[], BusProvider]]:
    """Providers sharing one backend (closed by ``make_broker`` at teardown)."""
    if request.param == "memory":
        shared = MemoryProvider()
        yield lambda: shared
        return
    url = f"sqlite:///{tmp_path / 'events.db'}"
    DatabaseProvider(url).create_schema()

    def make() -> BusProvider:
        return DatabaseProvider(url, poll_interval=0.05, backstop_interval=0.1)

    yield make


def _events(n: int) -> list[Event]:
    return [new_event(EventSource.INTERNAL, "job.run", {"n": i}) for i in range(n)]


def test_group__in_flight_deliveries_are_bounded_per_worker(
    make_broker: MakeBroker, provider_factory: Callable[[], BusProvider], wait_for: Waiter
) -> None:
    """With its one worker blocked, a member holds exactly ``IN_FLIGHT_PER_WORKER``
    deliveries in flight (one running, the rest queued), never more, and then handles every
    event once."""
    provider = provider_factory()
    broker = make_broker(mode="async", provider=provider, worker_count=1)
    gate = threading.Event()
    seen: list[str] = []
    peak = [0]
    lock = threading.Lock()

    def handler(event: Event) -> None:
        with lock:
            peak[0] = max(peak[0], len(broker._bus._inflight))
        gate.wait(10)
        with lock:
            seen.append(event.id)

    broker.subscribe("job.*", handler, group="g", lease=5.0)
    events = _events(3 * IN_FLIGHT_PER_WORKER)
    for e in events:
        broker.publish(e)
    wait_for(lambda: len(broker._bus._inflight) == IN_FLIGHT_PER_WORKER)
    gate.set()
    wait_for(lambda: len(seen) == len(events), timeout=15)
    assert sorted(seen) == sorted(e.id for e in events)
    assert peak[0] <= IN_FLIGHT_PER_WORKER


def test_group__two_members_share_a_backlog_each_event_once(
    make_broker: MakeBroker, provider_factory: Callable[[], BusProvider], wait_for: Waiter
) -> None:
    """Two members (brokers) drain a backlog published before they started: every event
    handled exactly once between them, and both took part."""
    publisher = make_broker(mode="sync", provider=provider_factory())
    counts: collections.Counter[str] = collections.Counter()
    by_member: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def handler_for(name: str) -> Callable[[Event], None]:
        def handler(event: Event) -> None:
            with lock:
                counts[event.id] += 1
                by_member[name] += 1
        return handler

    members = [make_broker(mode="async", provider=provider_factory(), worker_count=2,
                           start=False) for _ in range(2)]
    for i, m in enumerate(members):
        m.subscribe("job.*", handler_for(f"m{i}"), group="g", lease=5.0)
    # The group exists (created at its first opening) before the backlog is published.
    members[0].start()
    events = _events(400)
    publisher.publish_many(events)
    members[1].start()
    wait_for(lambda: sum(counts.values()) >= len(events), timeout=20)
    for m in members:
        m.stop(timeout=5)
    assert set(counts) == {e.id for e in events}
    assert max(counts.values()) == 1
    assert sum(by_member.values()) == len(events)


def test_database_group_stream__receive_many_hands_out_a_batch(tmp_path: Path) -> None:
    """``receive_many(limit)`` returns up to ``limit`` deliveries from one claim, and what it
    did not hand out comes with the next call, each once."""
    url = f"sqlite:///{tmp_path / 'events.db'}"
    with DatabaseProvider(url) as p:
        p.create_schema()
        stream = p.group_stream("job.*", "g", lease=5.0)
        assert isinstance(stream, BatchGroupStream)
        events = _events(7)
        p.store_and_publish_many(events)
        first = stream.receive_many(5, timeout=5)
        second = stream.receive_many(5, timeout=5)
        assert len(first) == 5 and len(second) == 2
        assert [d.event.id for d in first + second] == [e.id for e in events]
        for d in first + second:
            d.ack()
        assert stream.receive_many(5, timeout=0.1) == []
        stream.close()
