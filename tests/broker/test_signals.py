"""blinker signals: event_published, event_processed, event_failed, sent by the broker."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sqlalchemy_eventbroker import (
    Broker,
    Event,
    EventSource,
    EventStatus,
    EventValidationError,
    HandlerError,
    new_event,
    signals,
)

from .conftest import Waiter

MakeBroker = Callable[..., Broker]


class Received:
    """Every (signal name, sender, event) a receiver got, thread-safe."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, Event]] = []
        self.lock = threading.Lock()

    def of(self, name: str, sender: Any) -> list[Event]:
        with self.lock:
            return [e for n, s, e in self.items if n == name and s is sender]


@pytest.fixture
def received() -> Iterator[Received]:
    """Connect a recorder to the three signals for the test's duration."""
    rec = Received()
    receivers = {}
    for name in ("event_published", "event_processed", "event_failed"):
        def receiver(sender: Any, *, event: Event, _name: str = name, **kw: Any) -> None:
            with rec.lock:
                rec.items.append((_name, sender, event))

        receivers[name] = receiver
        getattr(signals, name).connect(receiver, weak=False)
    yield rec
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


def test_signals__importable_from_package() -> None:
    """The three signals are blinker signals reachable as sqlalchemy_eventbroker.signals."""
    import sqlalchemy_eventbroker

    for name in ("event_published", "event_processed", "event_failed"):
        signal = getattr(sqlalchemy_eventbroker.signals, name)
        assert callable(signal.connect) and callable(signal.send)


def test_event_published__sent_with_broker_as_sender(
    mode: str, make_broker: MakeBroker, received: Received
) -> None:
    """event_published is sent once per accepted event, sender = the broker, even unhandled."""
    broker = make_broker(mode=mode)
    other = make_broker(mode=mode)
    events = [new_event(EventSource.SYSTEM, "sig.pub") for _ in range(3)]
    for e in events:
        broker.publish(e)
    got = received.of("event_published", broker)
    assert [e.id for e in got] == [e.id for e in events]
    assert received.of("event_published", other) == []


def test_event_published__not_sent_for_refused_event(
    make_broker: MakeBroker, received: Received
) -> None:
    """An invalid event is not announced as published."""
    broker = make_broker(mode="sync")
    bad = new_event(EventSource.SYSTEM, "sig.bad")
    bad.type = ""
    with pytest.raises(EventValidationError):
        broker.publish(bad)
    assert received.of("event_published", broker) == []


def test_event_processed__sent_when_all_handlers_succeed(
    mode: str, make_broker: MakeBroker, received: Received, wait_for: Waiter
) -> None:
    """event_processed is sent once when every handler finished, with the completed event."""
    broker = make_broker(mode=mode)
    broker.subscribe("sig.*", lambda e: None)
    broker.subscribe("sig.*", lambda e: None)
    event = new_event(EventSource.SYSTEM, "sig.ok")
    broker.publish(event)
    wait_for(lambda: received.of("event_processed", broker))
    broker.stop()
    got = received.of("event_processed", broker)
    assert [e.id for e in got] == [event.id]
    assert got[0].status is EventStatus.COMPLETED
    assert received.of("event_failed", broker) == []


def test_event_failed__sent_when_retries_are_exhausted(
    mode: str, make_broker: MakeBroker, received: Received, wait_for: Waiter
) -> None:
    """event_failed is sent once after the retries, with the failed event and its error."""
    broker = make_broker(mode=mode)

    def broken(e: Event) -> None:
        raise RuntimeError("kaput")

    broker.subscribe("sig.*", broken)
    event = new_event(EventSource.SYSTEM, "sig.fail")
    try:
        broker.publish(event)
    except HandlerError:
        assert mode == "sync"
    wait_for(lambda: received.of("event_failed", broker))
    broker.stop()
    got = received.of("event_failed", broker)
    assert [e.id for e in got] == [event.id]
    assert got[0].status is EventStatus.FAILED and "kaput" in got[0].error
    assert got[0].retry_count == 2
    assert received.of("event_processed", broker) == []


def test_signals__raising_receiver_does_not_affect_delivery(
    mode: str, make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """A receiver that raises is logged; publishing and handling go on."""
    broker = make_broker(mode=mode)
    seen: list[str] = []
    broker.subscribe("*", lambda e: seen.append(e.id))

    def bad_receiver(sender: Any, **kw: Any) -> None:
        raise RuntimeError("receiver bug")

    signals.event_published.connect(bad_receiver, weak=False)
    signals.event_processed.connect(bad_receiver, weak=False)
    try:
        event = new_event(EventSource.SYSTEM, "sig.x")
        broker.publish(event)
        broker.stop()
    finally:
        signals.event_published.disconnect(bad_receiver)
        signals.event_processed.disconnect(bad_receiver)
    assert seen == [event.id]
    assert broker.provider.get(event.id).status is EventStatus.COMPLETED  # type: ignore[union-attr]


def test_signals__sender_filter_connects_to_one_broker(
    make_broker: MakeBroker,
) -> None:
    """connect(receiver, sender=broker) receives only that broker's events."""
    a = make_broker(mode="sync")
    b = make_broker(mode="sync")
    got: list[str] = []

    def on_published(sender: Any, *, event: Event, **kw: Any) -> None:
        got.append(event.id)

    signals.event_published.connect(on_published, sender=a, weak=False)
    try:
        ea = new_event(EventSource.SYSTEM, "s.a")
        a.publish(ea)
        b.publish(new_event(EventSource.SYSTEM, "s.b"))
    finally:
        signals.event_published.disconnect(on_published, sender=a)
    assert got == [ea.id]
