"""MemoryProvider specifics: LRU eviction, the age sweep, stats."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import pytest

from sqlalchemy_eventbroker import (
    Broker,
    Event,
    EventSource,
    EventStatus,
    MemoryProvider,
    ProviderError,
    new_event,
)

from .conftest import Waiter

MakeBroker = Callable[..., Broker]
UTC = dt.UTC


@pytest.fixture
def small() -> Iterator[MemoryProvider]:
    with MemoryProvider(max_events=3) as provider:
        yield provider


def _e(type_: str = "m.e") -> Event:
    return new_event(EventSource.INTERNAL, type_)


def _ids(provider: MemoryProvider) -> set[str]:
    return {e.id for e in provider.list()}


def test_lru__evicts_least_recently_stored_past_max_events(small: MemoryProvider) -> None:
    """Storing a fourth event into max_events=3 evicts the oldest untouched one."""
    a, b, c, d = _e(), _e(), _e(), _e()
    for e in (a, b, c, d):
        small.store(e)
    assert _ids(small) == {b.id, c.id, d.id}
    assert small.get(a.id) is None
    stats = small.stats()
    assert stats.total_events == 3 and stats.provider_specific["evicted_events"] == 1


def test_lru__get_makes_an_event_recent(small: MemoryProvider) -> None:
    """An event read with get() is kept; the least recently used other one goes instead."""
    a, b, c, d = _e(), _e(), _e(), _e()
    for e in (a, b, c):
        small.store(e)
    assert small.get(a.id) is not None
    small.store(d)
    assert _ids(small) == {a.id, c.id, d.id}
    assert small.get(c.id) is not None and small.get(a.id) is not None
    e = _e()
    small.store(e)  # d is now the least recently used
    assert _ids(small) == {a.id, c.id, e.id}


def test_lru__storing_again_makes_an_event_recent(small: MemoryProvider) -> None:
    """Storing an existing id again replaces it and counts as a use."""
    a, b, c, d = _e(), _e(), _e(), _e()
    for e in (a, b, c):
        small.store(e)
    a.payload = {"v": 2}
    small.store(a)
    small.store(d)
    assert _ids(small) == {a.id, c.id, d.id}
    assert small.get(a.id).payload == {"v": 2}  # type: ignore[union-attr]
    assert small.stats().total_events == 3


def test_lru__broker_publishing_past_max_events_keeps_the_newest(make_broker: MakeBroker) -> None:
    """A broker publishing 50 events into max_events=10 leaves the 10 newest stored."""
    provider = MemoryProvider(max_events=10)
    broker = make_broker(mode="sync", provider=provider)
    events = [_e() for _ in range(50)]
    for e in events:
        broker.publish(e)
    assert [e.id for e in provider.list()] == [e.id for e in events[-10:]]
    assert provider.stats().provider_specific["evicted_events"] == 40


def _completed(minutes_ago: float, created_minutes_ago: float | None = None) -> Event:
    e = _e()
    now = dt.datetime.now(UTC)
    e.created_at = now - dt.timedelta(minutes=created_minutes_ago or minutes_ago)
    e.status = EventStatus.COMPLETED
    e.processed_at = e.completed_at = now - dt.timedelta(minutes=minutes_ago)
    return e


def test_cleanup__sweeps_completed_events_older_than_max_age(wait_for: Waiter) -> None:
    """The background sweep drops completed events whose completed_at is past max_age."""
    with MemoryProvider(cleanup_interval=0.05, max_age=600) as provider:
        old = _completed(minutes_ago=60)
        fresh = _completed(minutes_ago=1)
        created_long_ago = _completed(minutes_ago=1, created_minutes_ago=600)
        old_pending, old_failed = _e(), _e()
        old_pending.created_at = old_failed.created_at = old.created_at
        old_failed.status = EventStatus.FAILED
        old_failed.completed_at = old.completed_at
        for e in (old, fresh, created_long_ago, old_pending, old_failed):
            provider.store(e)
        wait_for(lambda: provider.get(old.id) is None, timeout=5, message="the sweep")
        assert _ids(provider) == {fresh.id, created_long_ago.id, old_pending.id, old_failed.id}


def test_cleanup__counts_from_completed_at_of_update_status(wait_for: Waiter) -> None:
    """An event completed through update_status is swept once max_age has passed."""
    with MemoryProvider(cleanup_interval=0.05, max_age=0.2) as provider:
        done, waiting = _e(), _e()
        provider.store(done)
        provider.store(waiting)
        provider.update_status(done.id, EventStatus.COMPLETED)
        completed_at = provider.get(done.id).completed_at  # type: ignore[union-attr]
        wait_for(lambda: provider.get(done.id) is None, timeout=5, message="the sweep")
        assert dt.datetime.now(UTC) - completed_at >= dt.timedelta(seconds=0.2)
        assert provider.get(waiting.id) is not None


def test_cleanup__direct_call_returns_count() -> None:
    """cleanup() removes what is due at once and says how many it removed."""
    with MemoryProvider(max_age=600) as provider:
        for e in (_completed(60), _completed(61), _completed(1), _e()):
            provider.store(e)
        assert provider.cleanup() == 2
        assert provider.cleanup() == 0
        assert provider.stats().total_events == 2


def test_stats__counts_statuses_publishing_and_subscribers() -> None:
    """stats() reports counts by status, published/consumed totals and open subscribers."""
    with MemoryProvider(max_events=100) as provider:
        events = [_e("s.a") for _ in range(5)]
        for e in events:
            provider.store(e)
        stream = provider.stream("s.*")
        group = provider.group_stream("s.*", "g")
        # publish() stores what it is given (replacing the stored copy), so statuses after.
        provider.publish(events[0])
        provider.publish(events[1])
        provider.update_status(events[0].id, EventStatus.PROCESSING)
        provider.update_status(events[1].id, EventStatus.COMPLETED)
        provider.update_status(events[2].id, EventStatus.COMPLETED)
        provider.update_status(events[3].id, EventStatus.FAILED, "x")
        assert stream.receive(timeout=1) is not None
        delivery = group.receive(timeout=1)
        assert delivery is not None
        delivery.ack()
        s = provider.stats()
        assert s.provider_type == "memory"
        assert (s.total_events, s.pending_events, s.processing_events) == (5, 1, 1)
        assert (s.completed_events, s.failed_events) == (2, 1)
        assert s.events_published == 2
        assert s.events_consumed == 2
        assert s.active_subscribers == 2
        assert s.provider_specific["max_events"] == 100
        assert s.provider_specific["group_backlog"] == 1  # the second event, not yet taken
        stream.close()
        group.close()
        assert provider.stats().active_subscribers == 0


def test_closed__operations_raise_provider_error() -> None:
    """After close(), store/get/list raise ProviderError; close() again is harmless."""
    provider = MemoryProvider()
    provider.close()
    provider.close()
    for call in (lambda: provider.store(_e()), lambda: provider.get("x"), provider.list):
        with pytest.raises(ProviderError):
            call()


@pytest.mark.parametrize(
    "kwargs",
    [{"max_events": 0}, {"max_events": True}, {"cleanup_interval": 0}, {"max_age": -1}],
)
def test_constructor__rejects_bad_values(kwargs: dict[str, object]) -> None:
    """Nonsensical limits are refused with ValueError naming the argument."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MemoryProvider(**kwargs)  # type: ignore[arg-type]
