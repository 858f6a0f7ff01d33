"""Publishing: both modes, lifecycle errors, the bounded queue, validation, handler copies."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from sqlalchemy_eventbroker import (
    Broker,
    BrokerStopped,
    Event,
    EventSource,
    EventStatus,
    EventValidationError,
    MemoryProvider,
    QueueFull,
    SubscriptionNotFound,
    new_event,
)

from .conftest import Waiter

MakeBroker = Callable[..., Broker]


def _event(type_: str = "public.users.create", **payload: object) -> Event:
    return new_event(EventSource.DATABASE, type_, dict(payload) or None)


def test_publish__sync_mode_runs_handlers_in_caller_thread(make_broker: MakeBroker) -> None:
    """In sync mode, publish runs every matching handler before it returns, in the caller's thread."""
    broker = make_broker(mode="sync")
    seen: list[tuple[str, threading.Thread]] = []
    broker.subscribe("public.users.*", lambda e: seen.append((e.id, threading.current_thread())))
    event = _event()
    broker.publish(event)
    assert seen == [(event.id, threading.current_thread())]
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.COMPLETED


def test_publish__async_mode_runs_handlers_in_workers(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """In async mode, publish returns at once and a worker thread runs the handler."""
    broker = make_broker(mode="async")
    seen: list[tuple[str, threading.Thread]] = []
    broker.subscribe("public.users.*", lambda e: seen.append((e.id, threading.current_thread())))
    event = _event()
    broker.publish(event)
    wait_for(lambda: broker.stats().total_processed == 1)
    assert [eid for eid, _ in seen] == [event.id]
    assert seen[0][1] is not threading.current_thread()
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.COMPLETED


def test_publish__sync_mode_keeps_order_per_caller(make_broker: MakeBroker) -> None:
    """Sync mode hands events to a handler in the order one caller published them."""
    broker = make_broker(mode="sync")
    seen: list[int] = []
    broker.subscribe("*", lambda e: seen.append(e.payload["n"]))
    for n in range(50):
        broker.publish(_event(n=n))
    assert seen == list(range(50))


def test_publish__only_matching_subscriptions(mode: str, make_broker: MakeBroker) -> None:
    """A handler sees the events its pattern matches and no others."""
    broker = make_broker(mode=mode)
    users: list[str] = []
    deletes: list[str] = []
    broker.subscribe("public.users.*", lambda e: users.append(e.type))
    broker.subscribe("*.*.delete", lambda e: deletes.append(e.type))
    for t in ("public.users.create", "public.orders.delete", "public.users.delete", "other"):
        broker.publish(_event(t))
    broker.stop()
    assert sorted(users) == ["public.users.create", "public.users.delete"]
    assert sorted(deletes) == ["public.orders.delete", "public.users.delete"]


@pytest.mark.parametrize("method", ["publish", "publish_sync", "publish_async"])
def test_publish__before_start_raises_broker_stopped(make_broker: MakeBroker, method: str) -> None:
    """Publishing on a broker that was never started raises BrokerStopped and stores nothing."""
    broker = make_broker(start=False)
    event = _event()
    with pytest.raises(BrokerStopped) as info:
        getattr(broker, method)(event)
    assert info.value.code == "worker_pool_stopped"
    assert broker.provider.get(event.id) is None


@pytest.mark.parametrize("method", ["publish", "publish_sync", "publish_async"])
def test_publish__after_stop_raises_broker_stopped(make_broker: MakeBroker, method: str) -> None:
    """Publishing on a stopped broker raises BrokerStopped."""
    provider = MemoryProvider()
    broker = make_broker(provider=provider)
    broker.stop()
    event = _event()
    with pytest.raises(BrokerStopped):
        getattr(broker, method)(event)
    assert provider.get(event.id) is None
    provider.close()


def test_start__after_stop_raises_broker_stopped(make_broker: MakeBroker) -> None:
    """A stopped broker cannot be started again."""
    broker = make_broker()
    broker.stop()
    with pytest.raises(BrokerStopped):
        broker.start()


def test_publish_async__queue_full_raises_at_once_and_changes_nothing(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """A full queue raises QueueFull at once; the refused event is neither stored nor counted."""
    broker = make_broker(mode="async", worker_count=1, buffer_size=3)
    release = threading.Event()
    entered = threading.Event()

    def blocker(e: Event) -> None:
        entered.set()
        release.wait(10)

    broker.subscribe("*", blocker)
    try:
        broker.publish_async(_event())  # taken by the only worker, which blocks
        assert entered.wait(5)
        accepted = [_event() for _ in range(3)]
        for e in accepted:
            broker.publish_async(e)  # fills the three queue places
        assert broker.stats().queue_size == 3
        refused = _event()
        before = broker.stats()
        with pytest.raises(QueueFull) as info:
            broker.publish_async(refused)
        assert info.value.code == "queue_full"
        after = broker.stats()
        assert broker.provider.get(refused.id) is None
        assert after.total_published == before.total_published == 4
        assert after.provider_stats.total_events == before.provider_stats.total_events == 4
        assert after.provider_stats.events_published == before.provider_stats.events_published
    finally:
        release.set()
    wait_for(lambda: broker.stats().total_processed == 4)
    broker.publish_async(_event())  # room again: the broker keeps working
    wait_for(lambda: broker.stats().total_processed == 5)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": ""}, "id"),
        ({"source": "nowhere"}, "source"),
        ({"type": ""}, "type"),
        ({"status": "weird"}, "status"),
    ],
)
def test_publish__invalid_event_names_the_field(
    mode: str, make_broker: MakeBroker, change: dict[str, object], field: str
) -> None:
    """An invalid event raises EventValidationError naming the field; nothing is stored."""
    broker = make_broker(mode=mode)
    calls: list[Event] = []
    broker.subscribe("*", calls.append)
    event = _event()
    for k, v in change.items():
        setattr(event, k, v)
    with pytest.raises(EventValidationError) as info:
        broker.publish(event)
    assert info.value.field == field
    assert field in str(info.value)
    assert broker.provider.stats().total_events == 0
    assert broker.stats().total_published == 0
    good = _event()
    broker.publish(good)  # the broker keeps working afterwards
    broker.stop()
    assert [e.id for e in calls] == [good.id]


def test_publish__fills_empty_instance_id(mode: str, make_broker: MakeBroker) -> None:
    """An event without instance_id gets the broker's; one that has it keeps it."""
    broker = make_broker(mode=mode, instance_id="api-7")
    seen: list[str] = []
    broker.subscribe("*", lambda e: seen.append(e.instance_id))
    blank, named = _event(), _event()
    named.instance_id = "elsewhere"
    broker.publish(blank)
    broker.publish(named)
    broker.stop()
    assert blank.instance_id == "api-7"
    assert sorted(seen) == ["api-7", "elsewhere"]
    assert broker.provider.get(blank.id).instance_id == "api-7"  # type: ignore[union-attr]
    assert broker.provider.get(named.id).instance_id == "elsewhere"  # type: ignore[union-attr]


def test_publish__instance_id_defaults_to_host_name(make_broker: MakeBroker) -> None:
    """Without instance_id the broker uses the host name."""
    import socket

    assert make_broker(start=False).instance_id == socket.gethostname()


def test_publish__each_handler_gets_its_own_copy(mode: str, make_broker: MakeBroker) -> None:
    """A handler's changes to its event reach neither other handlers, the publisher nor the store."""
    broker = make_broker(mode=mode, worker_count=1)
    seen: list[Event] = []

    def mutate(e: Event) -> None:
        e.payload["n"] = 99  # type: ignore[index]
        e.metadata["touched"] = True
        e.type = "changed"
        seen.append(e)

    def observe(e: Event) -> None:
        seen.append(e)

    broker.subscribe("*", mutate)
    broker.subscribe("*", observe)
    event = _event(n=1)
    broker.publish(event)
    broker.stop()
    assert len(seen) == 2
    assert seen[0] is not seen[1] and seen[0] is not event and seen[1] is not event
    observed = seen[1]
    assert observed.payload == {"n": 1} and observed.metadata == {}
    assert observed.type == "public.users.create"
    assert event.payload == {"n": 1}
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.payload == {"n": 1} and stored.metadata == {}


def test_publish__async_def_handlers_run(mode: str, make_broker: MakeBroker) -> None:
    """``async def`` handlers are awaited on the broker's loop, in both modes."""
    broker = make_broker(mode=mode)
    seen: list[str] = []
    loops: list[asyncio.AbstractEventLoop] = []

    async def handler(e: Event) -> None:
        await asyncio.sleep(0)
        loops.append(asyncio.get_running_loop())
        seen.append(e.id)

    broker.subscribe("*", handler)
    events = [_event() for _ in range(5)]
    for e in events:
        broker.publish(e)
    broker.stop()
    assert sorted(seen) == sorted(e.id for e in events)
    assert len(set(map(id, loops))) == 1  # one loop, owned by the broker
    for e in events:
        assert broker.provider.get(e.id).status is EventStatus.COMPLETED  # type: ignore[union-attr]


def test_publish__failing_async_def_handler_is_retried(make_broker: MakeBroker) -> None:
    """An ``async def`` handler that raises counts as a failure and is retried."""
    broker = make_broker(mode="sync")
    calls: list[int] = []

    async def flaky(e: Event) -> None:
        calls.append(1)
        if len(calls) < 2:
            raise RuntimeError("first try fails")

    broker.subscribe("*", flaky)
    event = _event()
    broker.publish(event)
    assert len(calls) == 2
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.COMPLETED
    assert stored.retry_count == 1


def test_on__decorator_subscribes_and_returns_function(mode: str, make_broker: MakeBroker) -> None:
    """``@broker.on(pattern)`` subscribes the function and leaves it unchanged."""
    broker = make_broker(mode=mode)
    seen: list[str] = []

    @broker.on("*.*.delete")
    def on_delete(e: Event) -> None:
        seen.append(e.type)

    assert callable(on_delete) and on_delete.__name__ == "on_delete"
    broker.publish(_event("public.users.delete"))
    broker.publish(_event("public.users.create"))
    broker.stop()
    assert seen == ["public.users.delete"]
    assert broker.stats().active_subscribers == 1


def test_subscribe__same_handler_twice_makes_two_subscriptions(make_broker: MakeBroker) -> None:
    """Subscribing one handler twice gives two distinct non-empty ids and two calls."""
    broker = make_broker(mode="sync")
    seen: list[str] = []
    a = broker.subscribe("*", seen.append)
    b = broker.subscribe("*", seen.append)
    assert a and b and a != b and isinstance(a, str)
    broker.publish(_event())
    assert len(seen) == 2
    broker.unsubscribe(a)
    broker.publish(_event())
    assert len(seen) == 3


def test_unsubscribe__unknown_id_raises(make_broker: MakeBroker) -> None:
    """Unsubscribing an unknown or already removed id raises SubscriptionNotFound."""
    broker = make_broker()
    sub = broker.subscribe("*", lambda e: None)
    broker.unsubscribe(sub)
    with pytest.raises(SubscriptionNotFound):
        broker.unsubscribe(sub)
    with pytest.raises(SubscriptionNotFound):
        broker.unsubscribe("no-such-id")


def test_publish__no_matching_handler_is_not_an_error(mode: str, make_broker: MakeBroker) -> None:
    """An event nobody subscribed to is stored, counted as published and processed, not failed."""
    broker = make_broker(mode=mode)
    event = _event()
    broker.publish(event)
    broker.stop()
    stats = broker.stats()
    assert broker.provider.get(event.id) is not None
    assert (stats.total_published, stats.total_processed, stats.total_failed) == (1, 1, 0)


def test_context_manager__starts_and_stops(wait_for: Waiter) -> None:
    """``with Broker(...)`` starts the broker and stops it (draining) on exit."""
    seen: list[str] = []
    with MemoryProvider() as provider:
        with Broker(provider=provider, mode="async", worker_count=2) as broker:
            assert broker.is_running
            broker.subscribe("*", lambda e: seen.append(e.id))
            events = [_event() for _ in range(20)]
            for e in events:
                broker.publish(e)
        assert not broker.is_running
        assert not broker.stats().is_running
        assert sorted(seen) == sorted(e.id for e in events)
        with pytest.raises(BrokerStopped):
            broker.publish(_event())


def test_stop__drains_everything_publish_async_accepted(make_broker: MakeBroker) -> None:
    """stop() returns only after every event publish_async accepted was handled."""
    broker = make_broker(mode="async", worker_count=2, buffer_size=500)
    seen: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()

    def slow(e: Event) -> None:
        gate.wait(5)
        with lock:
            seen.append(e.id)

    broker.subscribe("*", slow)
    events = [_event() for _ in range(300)]
    for e in events:
        broker.publish_async(e)
    threading.Timer(0.05, gate.set).start()
    broker.stop(timeout=30)
    assert sorted(seen) == sorted(e.id for e in events)
    stats = broker.stats()
    assert stats.total_processed == 300 and stats.queue_size == 0 and not stats.is_running


def test_stop__drains_pending_retries(make_broker: MakeBroker) -> None:
    """stop() also waits for retries that were waiting for their delay."""
    from sqlalchemy_eventbroker import RetryPolicy

    broker = make_broker(mode="async", retry_policy=RetryPolicy(max_retries=1, initial_delay=0.2))
    calls: list[int] = []

    def fail_once(e: Event) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("once")

    broker.subscribe("*", fail_once)
    event = _event()
    broker.publish_async(event)
    broker.stop(timeout=10)
    assert len(calls) == 2
    assert broker.provider.get(event.id).status is EventStatus.COMPLETED  # type: ignore[union-attr]


def test_stop__is_idempotent(mode: str, make_broker: MakeBroker) -> None:
    """Calling stop() twice (or on a never-started broker) is harmless."""
    broker = make_broker(mode=mode)
    broker.stop()
    broker.stop()
    never = make_broker(start=False, mode=mode)
    never.stop()
    never.stop()
    assert not broker.is_running and not never.is_running


def test_stop__closes_only_a_provider_the_broker_made(make_broker: MakeBroker) -> None:
    """A provider passed in stays open after stop(); the broker's own default one is closed."""
    from sqlalchemy_eventbroker import ProviderError

    shared = MemoryProvider()
    broker = make_broker(provider=shared)
    broker.stop()
    shared.store(_event())  # still open
    shared.close()
    own = Broker(mode="sync").start()
    own.stop()
    with pytest.raises(ProviderError):
        own.provider.store(_event())


def test_publish_sync__on_async_broker_runs_now(make_broker: MakeBroker) -> None:
    """publish_sync on an async-mode broker still runs handlers before it returns."""
    broker = make_broker(mode="async")
    seen: list[str] = []
    broker.subscribe("*", lambda e: seen.append(e.id))
    event = _event()
    broker.publish_sync(event)
    assert seen == [event.id]


def test_publish_async__on_sync_broker_does_not_block(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """publish_async on a sync-mode broker queues the event instead of running it inline."""
    broker = make_broker(mode="sync")
    release = threading.Event()
    seen: list[threading.Thread] = []

    def handler(e: Event) -> None:
        release.wait(5)
        seen.append(threading.current_thread())

    broker.subscribe("*", handler)
    broker.publish_async(_event())  # would deadlock here if it ran inline
    release.set()
    wait_for(lambda: len(seen) == 1)
    assert seen[0] is not threading.current_thread()


def test_stats__fields(make_broker: MakeBroker) -> None:
    """stats() reports the BrokerStats fields of API.md 3."""
    broker = make_broker(mode="async", instance_id="i-1", worker_count=3)
    broker.subscribe("*", lambda e: None)
    broker.subscribe("x.*", lambda e: None)
    broker.publish(_event())
    broker.stop()
    s = broker.stats()
    assert s.instance_id == "i-1" and s.mode == "async" and s.is_running is False
    assert (s.total_published, s.total_processed, s.total_failed) == (1, 1, 0)
    assert s.active_subscribers == 2 and s.queue_size == 0 and s.active_workers == 0
    assert s.provider_stats.provider_type == "memory"


def test_stop__timeout_bounds_a_hung_handler(make_broker: MakeBroker) -> None:
    """stop(timeout) returns soon after the timeout even when a handler never finishes."""
    import time

    broker = make_broker(mode="async", worker_count=1)
    hang, entered = threading.Event(), threading.Event()
    broker.subscribe("*", lambda e: (entered.set(), hang.wait(30)))
    broker.publish(_event())
    broker.publish(_event())  # queued behind the hung one
    assert entered.wait(5)
    started = time.monotonic()
    try:
        broker.stop(timeout=0.3)
        assert time.monotonic() - started < 3
        assert not broker.is_running
    finally:
        hang.set()


def test_start__twice_is_harmless(make_broker: MakeBroker) -> None:
    """start() on a running broker changes nothing."""
    broker = make_broker(mode="async")
    assert broker.start() is broker
    seen: list[str] = []
    broker.subscribe("*", lambda e: seen.append(e.id))
    broker.publish(_event())
    broker.stop()
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "parallel"}, "mode"),
        ({"worker_count": 0}, "worker_count"),
        ({"worker_count": -3}, "worker_count"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"buffer_size": 2.5}, "buffer_size"),
    ],
)
def test_broker__bad_settings_raise_config_error(kwargs: dict[str, object], name: str) -> None:
    """Bad constructor settings raise ConfigError naming the setting."""
    from sqlalchemy_eventbroker import ConfigError

    with pytest.raises(ConfigError, match=name) as info:
        Broker(**kwargs)  # type: ignore[arg-type]
    assert info.value.path == name


def test_subscribe__bad_input_fails_there_and_broker_keeps_working(
    mode: str, make_broker: MakeBroker
) -> None:
    """An invalid pattern or handler fails at subscribe; later publishing still works."""
    from sqlalchemy_eventbroker import PatternError

    broker = make_broker(mode=mode)
    for pattern in ("", "a..b", "a.**.b", "us*rs"):
        with pytest.raises(PatternError):
            broker.subscribe(pattern, lambda e: None)
    with pytest.raises(TypeError):
        broker.subscribe("*", "not callable")  # type: ignore[arg-type]
    assert broker.stats().active_subscribers == 0
    seen: list[str] = []
    broker.subscribe("a.*", lambda e: seen.append(e.type))
    broker.publish(_event("a.b"))
    broker.stop()
    assert seen == ["a.b"]


def test_publish__non_event_raises_type_error(make_broker: MakeBroker) -> None:
    """Publishing something that is not an Event raises TypeError."""
    broker = make_broker(mode="sync")
    with pytest.raises(TypeError):
        broker.publish({"type": "a.b"})  # type: ignore[arg-type]


def test_stop__racing_publish_async_is_refused_or_handled(make_broker: MakeBroker) -> None:
    """A publish_async caught mid-way by stop() either raises BrokerStopped or is handled."""
    inside, proceed = threading.Event(), threading.Event()

    class SlowToValidate(Event):
        __slots__ = ()

        def validate(self) -> None:
            super().validate()
            inside.set()  # past the running check, before the queue place is claimed
            proceed.wait(10)

    broker = make_broker(mode="async")
    seen: list[str] = []
    broker.subscribe("*", lambda e: seen.append(e.id))
    event = SlowToValidate(source=EventSource.SYSTEM, type="race.stop")
    outcome: list[object] = []

    def publish() -> None:
        try:
            broker.publish_async(event)
            outcome.append("accepted")
        except BrokerStopped as exc:
            outcome.append(exc)

    publisher = threading.Thread(target=publish)
    publisher.start()
    assert inside.wait(5)
    stopper = threading.Thread(target=broker.stop, kwargs={"timeout": 5})
    stopper.start()
    stopper.join(10)
    proceed.set()
    publisher.join(10)
    assert len(outcome) == 1
    if outcome[0] == "accepted":
        assert seen == [event.id], "publish_async accepted the event but it was never handled"
    else:
        assert isinstance(outcome[0], BrokerStopped)
        assert broker.provider.get(event.id) is None
