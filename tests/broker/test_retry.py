"""Per-handler retries, backoff timing, stored status, dead letters and redrive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from sqlalchemy_eventbroker import (
    Broker,
    Event,
    EventSource,
    EventStatus,
    HandlerError,
    RetryPolicy,
    SubscriptionNotFound,
    new_event,
)

from .conftest import Waiter

MakeBroker = Callable[..., Broker]


def _event(type_: str = "public.orders.create") -> Event:
    return new_event(EventSource.DATABASE, type_, {"n": 1})


class Flaky:
    """A handler that fails its first ``failures`` calls and records when it was called."""

    def __init__(self, failures: int, message: str = "boom") -> None:
        self.failures = failures
        self.message = message
        self.times: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.times.append(time.monotonic())
            n = len(self.times)
        if n <= self.failures:
            raise ValueError(f"{self.message} #{n}")

    @property
    def calls(self) -> int:
        return len(self.times)


def _settle(broker: Broker, mode: str, event: Event) -> None:
    """Publish ``event``; in sync mode swallow HandlerError (tests look at the stored event)."""
    try:
        broker.publish(event)
    except HandlerError:
        assert mode == "sync"


def test_retry__only_the_failing_handler_is_retried(mode: str, make_broker: MakeBroker) -> None:
    """A failing handler is retried alone; handlers that succeeded are not called again."""
    broker = make_broker(mode=mode)
    good, flaky = Flaky(0), Flaky(2)
    broker.subscribe("*", good)
    broker.subscribe("*", flaky)
    event = _event()
    broker.publish(event)
    broker.stop()
    assert (good.calls, flaky.calls) == (1, 3)
    stored = broker.provider.get(event.id)
    assert stored is not None
    assert stored.status is EventStatus.COMPLETED and stored.retry_count == 2 and stored.error == ""


def test_retry__delays_follow_the_policy(mode: str, make_broker: MakeBroker) -> None:
    """Retry n waits at least min(initial_delay * factor**(n-1), max_delay) after attempt n."""
    policy = RetryPolicy(max_retries=3, initial_delay=0.05, max_delay=0.12, backoff_factor=2.0)
    broker = make_broker(mode=mode, retry_policy=policy)
    flaky = Flaky(3)
    broker.subscribe("*", flaky)
    broker.publish(_event())
    broker.stop()
    assert flaky.calls == 4
    gaps = [b - a for a, b in zip(flaky.times, flaky.times[1:], strict=False)]
    for gap, expected in zip(gaps, (0.05, 0.10, 0.12), strict=True):
        assert gap >= expected - 0.002, (gaps, expected)


def test_retry__max_delay_caps_backoff(make_broker: MakeBroker) -> None:
    """Delays never exceed max_delay by much, however large the backoff factor."""
    policy = RetryPolicy(max_retries=3, initial_delay=0.02, max_delay=0.03, backoff_factor=100.0)
    broker = make_broker(mode="sync", retry_policy=policy)
    flaky = Flaky(3)
    broker.subscribe("*", flaky)
    broker.publish(_event())
    gaps = [b - a for a, b in zip(flaky.times, flaky.times[1:], strict=False)]
    assert len(gaps) == 3 and all(g >= 0.018 for g in gaps)
    assert sum(gaps) < 2.0  # 2 s and 200 s would be the uncapped delays


def test_retry__waiting_retry_does_not_occupy_a_worker(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """With one worker and a 1 s retry delay pending, other events are handled meanwhile."""
    policy = RetryPolicy(max_retries=1, initial_delay=1.0, max_delay=1.0)
    broker = make_broker(mode="async", worker_count=1, retry_policy=policy)
    flaky = Flaky(1)
    others: list[float] = []
    broker.subscribe("slow.fail", flaky)
    broker.subscribe("fast.ok", lambda e: others.append(time.monotonic()))
    broker.publish(_event("slow.fail"))
    wait_for(lambda: flaky.calls == 1, message="first attempt")
    for _ in range(5):
        broker.publish(_event("fast.ok"))
    wait_for(lambda: len(others) == 5, timeout=0.8, message="other events while retry waits")
    assert flaky.calls == 1  # the retry is still waiting
    assert max(others) - flaky.times[0] < 1.0
    wait_for(lambda: flaky.calls == 2, timeout=5, message="the retry")
    assert flaky.times[1] - flaky.times[0] >= 0.998


def test_retry__retry_count_is_total_over_handlers(mode: str, make_broker: MakeBroker) -> None:
    """The stored retry_count sums the retries of every handler of the event."""
    broker = make_broker(mode=mode, retry_policy=RetryPolicy(3, 0.01, 0.02))
    a, b, c = Flaky(2), Flaky(1), Flaky(0)
    for h in (a, b, c):
        broker.subscribe("*", h)
    event = _event()
    broker.publish(event)
    broker.stop()
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.retry_count == 3
    assert (a.calls, b.calls, c.calls) == (3, 2, 1)


def test_retry__exhausted_marks_failed_with_error_naming_handler(
    mode: str, make_broker: MakeBroker
) -> None:
    """A handler out of retries leaves the event failed; the error names handler and exception."""
    broker = make_broker(mode=mode, retry_policy=RetryPolicy(2, 0.01, 0.02))

    def send_invoice(e: Event) -> None:
        raise ConnectionError("smtp down")

    ok = Flaky(0)
    sub_fail = broker.subscribe("*", send_invoice)
    broker.subscribe("*", ok)
    event = _event()
    _settle(broker, mode, event)
    broker.stop()
    stored = broker.provider.get(event.id)
    assert stored is not None
    assert stored.status is EventStatus.FAILED
    assert "send_invoice" in stored.error and "smtp down" in stored.error
    assert "ConnectionError" in stored.error and sub_fail in stored.error
    assert stored.retry_count == 2
    assert ok.calls == 1
    stats = broker.stats()
    assert (stats.total_processed, stats.total_failed) == (1, 1)


def test_retry__two_failing_handlers_both_named(mode: str, make_broker: MakeBroker) -> None:
    """When two handlers fail, the stored error names both."""
    broker = make_broker(mode=mode, retry_policy=RetryPolicy(1, 0.01, 0.01))

    def first_handler(e: Event) -> None:
        raise RuntimeError("one")

    def second_handler(e: Event) -> None:
        raise KeyError("two")

    broker.subscribe("*", first_handler)
    broker.subscribe("*", second_handler)
    event = _event()
    _settle(broker, mode, event)
    broker.stop()
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.FAILED
    assert "first_handler" in stored.error and "second_handler" in stored.error
    assert "one" in stored.error and "two" in stored.error
    assert stored.retry_count == 2


def test_retry__zero_retries_fails_at_once(mode: str, make_broker: MakeBroker) -> None:
    """max_retries=0 makes the first failure final, with retry_count 0."""
    broker = make_broker(mode=mode, retry_policy=RetryPolicy(max_retries=0))
    flaky = Flaky(5)
    broker.subscribe("*", flaky)
    event = _event()
    _settle(broker, mode, event)
    broker.stop()
    assert flaky.calls == 1
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.FAILED and stored.retry_count == 0


def test_publish_sync__raises_handler_error_with_failures(make_broker: MakeBroker) -> None:
    """publish_sync raises HandlerError after retries, with (subscription_id, exception) pairs."""
    broker = make_broker(mode="sync")
    exc_seen: list[BaseException] = []

    def bad(e: Event) -> None:
        err = ValueError("always")
        exc_seen.append(err)
        raise err

    fine = Flaky(0)
    sub_bad = broker.subscribe("*", bad)
    broker.subscribe("*", fine)
    event = _event()
    with pytest.raises(HandlerError) as info:
        broker.publish_sync(event)
    err = info.value
    assert err.code == "handler_failed"
    assert err.event_id == event.id
    assert len(err.failures) == 1
    sid, exc = err.failures[0]
    assert sid == sub_bad
    assert exc is exc_seen[-1] and isinstance(exc, ValueError)
    assert len(exc_seen) == 3  # first attempt plus QUICK_RETRIES' two retries
    assert fine.calls == 1


def test_publish_async__failure_is_recorded_not_raised(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """In async mode a failing handler is recorded and counted; publish does not raise."""
    broker = make_broker(mode="async")
    broker.subscribe("*", Flaky(100))
    event = _event()
    broker.publish_async(event)
    wait_for(lambda: broker.stats().total_failed == 1)
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.FAILED


def test_stored_status__completed_with_timestamps(mode: str, make_broker: MakeBroker) -> None:
    """A handled event is stored completed, with processed_at and completed_at after created_at."""
    broker = make_broker(mode=mode)
    broker.subscribe("*", Flaky(1))
    event = _event()
    broker.publish(event)
    broker.stop()
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.COMPLETED
    assert stored.processed_at is not None and stored.completed_at is not None
    assert stored.created_at <= stored.processed_at <= stored.completed_at
    assert stored.completed_at.tzinfo is not None and stored.error == ""


def test_stored_status__failed_with_timestamps(mode: str, make_broker: MakeBroker) -> None:
    """A failed event is stored failed, with both timestamps and the error text."""
    broker = make_broker(mode=mode)
    broker.subscribe("*", Flaky(100, "nope"))
    event = _event()
    _settle(broker, mode, event)
    broker.stop()
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.FAILED
    assert stored.processed_at is not None and stored.completed_at is not None
    assert stored.created_at <= stored.processed_at <= stored.completed_at
    assert "nope" in stored.error


def test_dead_letters__hold_failed_events(mode: str, make_broker: MakeBroker) -> None:
    """Failed events go to dead_letters() (copies, oldest first); completed ones do not."""
    broker = make_broker(mode=mode, worker_count=1)
    broker.subscribe("bad.*", Flaky(100))
    broker.subscribe("good.*", Flaky(0))
    first, good, second = _event("bad.one"), _event("good.one"), _event("bad.two")
    for e in (first, good, second):
        _settle(broker, mode, e)
    broker.stop()
    dead = broker.dead_letters()
    assert [e.id for e in dead] == [first.id, second.id]
    assert all(e.status is EventStatus.FAILED and e.error for e in dead)
    dead[0].error = "changed"
    assert broker.dead_letters()[0].error != "changed"


def test_redrive__publishes_dead_letter_again(
    mode: str, make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """redrive(id) publishes the dead letter again, clean, and it can now complete."""
    broker = make_broker(mode=mode, retry_policy=RetryPolicy(1, 0.01, 0.01))
    broken = threading.Event()
    broken.set()
    calls: list[Event] = []

    def handler(e: Event) -> None:
        calls.append(e)
        if broken.is_set():
            raise RuntimeError("downstream down")

    broker.subscribe("*", handler)
    event = _event()
    _settle(broker, mode, event)
    wait_for(lambda: broker.dead_letters(), message="the dead letter")
    assert [e.id for e in broker.dead_letters()] == [event.id]
    broken.clear()
    redriven = broker.redrive(event.id)
    assert redriven.id == event.id
    broker.stop()
    assert broker.dead_letters() == []
    assert calls[-1].id == event.id and calls[-1].retry_count == 0 and calls[-1].error == ""
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.COMPLETED
    assert stored.retry_count == 0 and stored.error == ""


def test_redrive__unknown_id_raises(make_broker: MakeBroker) -> None:
    """redrive of an id that is no dead letter raises a LookupError (SubscriptionNotFound)."""
    broker = make_broker(mode="sync")
    broker.subscribe("*", Flaky(0))
    done = _event()
    broker.publish(done)
    with pytest.raises(SubscriptionNotFound):
        broker.redrive("no-such-event")
    with pytest.raises(LookupError):
        broker.redrive(done.id)  # completed, not a dead letter


def test_redrive__refused_publish_keeps_the_dead_letter(make_broker: MakeBroker) -> None:
    """A redrive that cannot publish (broker stopped) leaves the dead letter and stored copy."""
    broker = make_broker(mode="sync", retry_policy=RetryPolicy(max_retries=0))
    broker.subscribe("*", Flaky(100))
    event = _event()
    with pytest.raises(HandlerError):
        broker.publish(event)
    broker.stop()
    from sqlalchemy_eventbroker import BrokerStopped

    with pytest.raises(BrokerStopped):
        broker.redrive(event.id)
    assert [e.id for e in broker.dead_letters()] == [event.id]
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.FAILED and stored.error


def test_redrive__queue_full_keeps_the_dead_letter(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """A redrive refused with QueueFull leaves the dead letter for a later attempt."""
    from sqlalchemy_eventbroker import QueueFull

    broker = make_broker(mode="async", worker_count=1, buffer_size=1,
                         retry_policy=RetryPolicy(max_retries=0))
    release, entered = threading.Event(), threading.Event()
    broker.subscribe("fail.*", Flaky(100))
    broker.subscribe("block.*", lambda e: (entered.set(), release.wait(10)))
    dead = _event("fail.x")
    broker.publish(dead)
    wait_for(lambda: broker.dead_letters(), message="the dead letter")
    try:
        broker.publish(_event("block.x"))
        assert entered.wait(5)
        broker.publish(_event("block.x"))  # the one queue place
        with pytest.raises(QueueFull):
            broker.redrive(dead.id)
        assert [e.id for e in broker.dead_letters()] == [dead.id]
        stored = broker.provider.get(dead.id)
        assert stored is not None and stored.status is EventStatus.FAILED
    finally:
        release.set()
    wait_for(lambda: broker.stats().queue_size == 0)
    broker.redrive(dead.id)  # room again
    wait_for(lambda: broker.stats().total_failed == 2, message="the redriven event to fail again")


def test_retry__error_names_handler_unsubscribed_meanwhile(
    mode: str, make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """The stored error names a failed handler even if its subscription was removed meanwhile."""
    broker = make_broker(mode=mode, retry_policy=RetryPolicy(max_retries=0))
    subs: list[str] = []

    def leaves_then_fails(e: Event) -> None:
        broker.unsubscribe(subs[0])
        raise RuntimeError("gone")

    subs.append(broker.subscribe("*", leaves_then_fails))
    event = _event()
    _settle(broker, mode, event)
    wait_for(lambda: broker.stats().total_failed == 1)
    stored = broker.provider.get(event.id)
    assert stored is not None and "leaves_then_fails" in stored.error and "gone" in stored.error
