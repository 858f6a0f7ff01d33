"""broker.replay: stored events fed to a handler, oldest first, without storing them again."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from sqlalchemy_eventbroker import (
    Broker,
    Event,
    EventFilter,
    EventSource,
    EventStatus,
    MemoryProvider,
    PatternError,
    new_event,
)

MakeBroker = Callable[..., Broker]
UTC = dt.UTC


def _at(type_: str, minutes_ago: float, source: EventSource = EventSource.DATABASE) -> Event:
    e = new_event(source, type_)
    e.created_at = dt.datetime.now(UTC) - dt.timedelta(minutes=minutes_ago)
    return e


@pytest.fixture
def history(make_broker: MakeBroker) -> tuple[Broker, list[Event]]:
    """A sync broker whose provider holds six events published out of time order."""
    broker = make_broker(mode="sync", provider=MemoryProvider(max_events=10_000))
    events = [
        _at("public.users.create", 50),
        _at("public.orders.create", 40, EventSource.FRONTEND),
        _at("public.users.update", 120),  # oldest, published third
        _at("auth.sessions.create", 5, EventSource.SYSTEM),
        _at("public.users.delete", 1),
        _at("public.orders.delete", 90, EventSource.FRONTEND),
    ]
    for e in events:
        broker.publish(e)
    return broker, events


def _oldest_first(events: list[Event]) -> list[str]:
    return [e.id for e in sorted(events, key=lambda e: e.created_at)]


def test_replay__by_pattern_oldest_first_returns_count(history: tuple[Broker, list[Event]]) -> None:
    """replay(pattern) feeds the matching stored events oldest first and returns how many."""
    broker, events = history
    seen: list[Event] = []
    n = broker.replay("public.users.*", seen.append)
    expected = _oldest_first([e for e in events if e.type.startswith("public.users.")])
    assert [e.id for e in seen] == expected
    assert n == 3


def test_replay__star_feeds_everything(history: tuple[Broker, list[Event]]) -> None:
    """replay('*') feeds every stored event, oldest first."""
    broker, events = history
    seen: list[str] = []
    assert broker.replay("*", lambda e: seen.append(e.id)) == 6
    assert seen == _oldest_first(events)


def test_replay__by_event_filter(history: tuple[Broker, list[Event]]) -> None:
    """replay(EventFilter) selects by its fields, e.g. source and type pattern."""
    broker, events = history
    seen: list[str] = []
    flt = EventFilter(source=EventSource.FRONTEND)
    assert broker.replay(flt, lambda e: seen.append(e.id)) == 2
    assert seen == _oldest_first([e for e in events if e.source is EventSource.FRONTEND])
    seen.clear()
    flt = EventFilter(type_pattern="*.*.delete", entity="orders")
    assert broker.replay(flt, lambda e: seen.append(e.id)) == 1
    assert seen == [events[5].id]


def test_replay__filter_limit_is_respected(history: tuple[Broker, list[Event]]) -> None:
    """An EventFilter limit caps how many events are fed."""
    broker, events = history
    seen: list[str] = []
    assert broker.replay(EventFilter(limit=2), lambda e: seen.append(e.id)) == 2
    assert seen == _oldest_first(events)[:2]


@pytest.mark.parametrize("kind", ["timedelta", "datetime"])
def test_replay__since_selects_recent_events(
    history: tuple[Broker, list[Event]], kind: str
) -> None:
    """since= (a timedelta ago or an aware datetime) keeps only events created from then on."""
    broker, events = history
    since: dt.timedelta | dt.datetime = dt.timedelta(minutes=45)
    if kind == "datetime":
        since = dt.datetime.now(UTC) - dt.timedelta(minutes=45)
    seen: list[str] = []
    assert broker.replay("*", lambda e: seen.append(e.id), since=since) == 3
    recent = [e for e in events if e.created_at >= dt.datetime.now(UTC) - dt.timedelta(minutes=45)]
    assert seen == _oldest_first(recent)


def test_replay__since_overrides_filter_start_time(history: tuple[Broker, list[Event]]) -> None:
    """since= wins over the filter's own start_time."""
    broker, _ = history
    flt = EventFilter(start_time=dt.datetime.now(UTC) - dt.timedelta(days=1))
    assert broker.replay(flt, lambda e: None, since=dt.timedelta(minutes=10)) == 2


def test_replay__does_not_store_publish_or_dispatch(history: tuple[Broker, list[Event]]) -> None:
    """Replayed events are not stored, published, counted nor given to subscribers again."""
    broker, _ = history
    live: list[Event] = []
    broker.subscribe("*", live.append)
    before_provider = broker.provider.stats()
    before = broker.stats()
    assert broker.replay("*", lambda e: None) == 6
    after_provider = broker.provider.stats()
    after = broker.stats()
    assert live == []
    assert after_provider.total_events == before_provider.total_events == 6
    assert after_provider.events_published == before_provider.events_published
    assert after.total_published == before.total_published
    assert after.total_processed == before.total_processed


def test_replay__handler_gets_stored_state(make_broker: MakeBroker) -> None:
    """Replayed events carry their stored status, and changing them changes nothing stored."""
    broker = make_broker(mode="sync")
    broker.subscribe("*", lambda e: None)
    event = new_event(EventSource.SYSTEM, "a.b")
    broker.publish(event)
    seen: list[Event] = []

    def mutate(e: Event) -> None:
        seen.append(e)
        e.payload = {"changed": True}

    assert broker.replay("a.b", mutate) == 1
    assert seen[0].status is EventStatus.COMPLETED
    assert broker.provider.get(event.id).payload is None  # type: ignore[union-attr]


def test_replay__async_def_handler(history: tuple[Broker, list[Event]]) -> None:
    """An ``async def`` replay handler is awaited."""
    broker, _ = history
    seen: list[str] = []

    async def handler(e: Event) -> None:
        seen.append(e.type)

    assert broker.replay("auth.**", handler) == 1
    assert seen == ["auth.sessions.create"]


def test_replay__handler_error_propagates(history: tuple[Broker, list[Event]]) -> None:
    """A replay handler that raises stops the replay; the error reaches the caller."""
    broker, _ = history
    calls: list[str] = []

    def bad(e: Event) -> None:
        calls.append(e.id)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        broker.replay("*", bad)
    assert len(calls) == 1


def test_replay__invalid_pattern_raises(history: tuple[Broker, list[Event]]) -> None:
    """A malformed pattern raises PatternError before any event is fed."""
    broker, _ = history
    seen: list[Event] = []
    with pytest.raises(PatternError):
        broker.replay("public..users", seen.append)
    assert seen == []


def test_replay__more_events_than_one_page(make_broker: MakeBroker) -> None:
    """Thousands of stored events are all fed once, oldest first, across pages."""
    broker = make_broker(mode="sync", provider=MemoryProvider(max_events=5000))
    base = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    ids = []
    for i in range(2500):
        e = new_event(EventSource.INTERNAL, "bulk.item", {"i": i})
        e.created_at = base + dt.timedelta(milliseconds=i)
        broker.publish(e)
        ids.append(e.id)
    seen: list[str] = []
    assert broker.replay("bulk.*", lambda e: seen.append(e.id)) == 2500
    assert seen == ids
