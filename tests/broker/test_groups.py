"""Several brokers on one MemoryProvider: fan-out without echo, consumer groups, leases."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import pytest

from sqlalchemy_eventbroker import Broker, Event, EventSource, MemoryProvider, new_event

from .conftest import Waiter

MakeBroker = Callable[..., Broker]


class Recorder:
    """A handler counting calls per event id, thread-safe."""

    def __init__(self, hold: float = 0.0) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.hold = hold
        self._never = threading.Event()

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.counts[event.id] += 1
        if self.hold:
            self._never.wait(self.hold)  # simulated work

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())


@pytest.fixture
def provider() -> MemoryProvider:
    with MemoryProvider() as p:
        yield p  # type: ignore[misc]


def _events(n: int, type_: str = "shop.orders.create") -> list[Event]:
    return [new_event(EventSource.INTERNAL, type_, {"n": i}) for i in range(n)]


def test_fanout__two_brokers_each_subscription_sees_each_event_once(
    mode: str, make_broker: MakeBroker, provider: MemoryProvider, wait_for: Waiter
) -> None:
    """Every subscription on either broker sees every event from both brokers, exactly once."""
    a = make_broker(mode=mode, provider=provider, instance_id="a")
    b = make_broker(mode=mode, provider=provider, instance_id="b")
    rec_a, rec_b = Recorder(), Recorder()
    a.subscribe("shop.*.*", rec_a)
    b.subscribe("shop.*.*", rec_b)
    from_a, from_b = _events(20), _events(20)
    for ea, eb in zip(from_a, from_b, strict=True):
        a.publish(ea)
        b.publish(eb)
    expected = {e.id for e in from_a + from_b}
    wait_for(lambda: rec_a.total() >= 40 and rec_b.total() >= 40, message="both brokers")
    a.stop()
    b.stop()
    for rec in (rec_a, rec_b):
        assert set(rec.counts) == expected
        assert max(rec.counts.values()) == 1  # no echo of a broker's own events


def test_fanout__remote_event_reaches_only_matching_subscriptions(
    make_broker: MakeBroker, provider: MemoryProvider, wait_for: Waiter
) -> None:
    """Events from another broker are routed by pattern like local ones."""
    a = make_broker(provider=provider)
    b = make_broker(provider=provider)
    users, orders = Recorder(), Recorder()
    b.subscribe("public.users.*", users)
    b.subscribe("public.orders.*", orders)
    u = new_event(EventSource.DATABASE, "public.users.create")
    o = new_event(EventSource.DATABASE, "public.orders.delete")
    a.publish(u)
    a.publish(o)
    wait_for(lambda: users.total() == 1 and orders.total() == 1)
    b.stop()
    assert set(users.counts) == {u.id} and set(orders.counts) == {o.id}


def test_group__one_broker_each_event_to_exactly_one_member(
    mode: str, make_broker: MakeBroker, provider: MemoryProvider, wait_for: Waiter
) -> None:
    """Two group members in one broker share the events: each handled by exactly one."""
    broker = make_broker(mode=mode, provider=provider)
    m1, m2 = Recorder(), Recorder()
    broker.subscribe("shop.orders.*", m1, group="emails")
    broker.subscribe("shop.orders.*", m2, group="emails")
    events = _events(100)
    for e in events:
        broker.publish(e)
    wait_for(lambda: m1.total() + m2.total() >= 100, message="all events handled")
    broker.stop()
    combined = m1.counts + m2.counts
    assert set(combined) == {e.id for e in events}
    assert max(combined.values()) == 1


def test_group__across_two_brokers_each_event_to_exactly_one_member(
    mode: str, make_broker: MakeBroker, provider: MemoryProvider, wait_for: Waiter
) -> None:
    """Group members on two brokers share events published by both: each handled once."""
    a = make_broker(mode=mode, provider=provider, instance_id="a")
    b = make_broker(mode=mode, provider=provider, instance_id="b")
    ma, mb = Recorder(), Recorder()
    a.subscribe("shop.orders.*", ma, group="emails")
    b.subscribe("shop.orders.*", mb, group="emails")
    events = _events(100)
    for i, e in enumerate(events):
        (a if i % 2 else b).publish(e)
    wait_for(lambda: ma.total() + mb.total() >= 100, message="all events handled")
    a.stop()
    b.stop()
    combined = ma.counts + mb.counts
    assert set(combined) == {e.id for e in events}
    assert max(combined.values()) == 1


def test_group__and_fanout_on_one_broker_both_see_event_once(
    mode: str, make_broker: MakeBroker, provider: MemoryProvider, wait_for: Waiter
) -> None:
    """A fan-out and a group subscription on the same broker each handle an event once."""
    broker = make_broker(mode=mode, provider=provider)
    fan, grp = Recorder(), Recorder()
    broker.subscribe("shop.*.*", fan)
    broker.subscribe("shop.*.*", grp, group="audit")
    events = _events(10)
    for e in events:
        broker.publish(e)
    wait_for(lambda: fan.total() >= 10 and grp.total() >= 10)
    broker.stop()
    for rec in (fan, grp):
        assert set(rec.counts) == {e.id for e in events} and max(rec.counts.values()) == 1


def test_group__events_published_while_no_member_runs_are_delivered_later(
    make_broker: MakeBroker, provider: MemoryProvider, wait_for: Waiter
) -> None:
    """A group is durable from its first opening: a later member gets the backlog."""
    first = make_broker(provider=provider)
    first.subscribe("shop.orders.*", Recorder(), group="billing")
    first.stop()
    publisher = make_broker(provider=provider)
    backlog = _events(5)
    for e in backlog:
        publisher.publish(e)
    late = make_broker(provider=provider)
    rec = Recorder()
    late.subscribe("shop.orders.*", rec, group="billing")
    wait_for(lambda: rec.total() >= 5, message="the backlog")
    late.stop()
    assert set(rec.counts) == {e.id for e in backlog} and max(rec.counts.values()) == 1


def test_group__unsubscribed_member_gets_nothing_more(
    make_broker: MakeBroker, provider: MemoryProvider, wait_for: Waiter
) -> None:
    """After one member unsubscribes, the remaining member handles every new event."""
    a = make_broker(provider=provider)
    b = make_broker(provider=provider)
    ma, mb = Recorder(), Recorder()
    sub_a = a.subscribe("shop.orders.*", ma, group="g")
    b.subscribe("shop.orders.*", mb, group="g")
    a.unsubscribe(sub_a)
    events = _events(20)
    for e in events:
        a.publish(e)
    wait_for(lambda: mb.total() >= 20)
    a.stop()
    b.stop()
    assert ma.total() == 0
    assert set(mb.counts) == {e.id for e in events}


def test_group_stream__unacked_delivery_is_redelivered_after_lease(
    provider: MemoryProvider,
) -> None:
    """Provider level: a delivery not acked goes to a member again once its lease expires."""
    lease = 0.3
    with provider.group_stream("shop.*.*", "workers", lease=lease) as s1, \
            provider.group_stream("shop.*.*", "workers", lease=lease) as s2:
        event = _events(1)[0]
        provider.store(event)
        provider.publish(event)
        first = s1.receive(timeout=2)
        assert first is not None and first.event.id == event.id
        taken = time.monotonic()
        assert s2.receive(timeout=0.05) is None  # still leased to s1
        again = s2.receive(timeout=3)
        assert again is not None and again.event.id == event.id
        assert time.monotonic() - taken >= lease - 0.01
        again.ack()
        first.ack()  # a stale ack from the first holder is harmless
        assert s1.receive(timeout=lease + 0.2) is None  # acked: never delivered again
        assert provider.stats().provider_specific["group_backlog"] == 0


def test_group_stream__renewed_delivery_is_not_redelivered(provider: MemoryProvider) -> None:
    """Provider level: renewing a lease keeps the delivery from going to another member."""
    lease = 0.3
    with provider.group_stream("x.*", "g", lease=lease) as s1, \
            provider.group_stream("x.*", "g", lease=lease) as s2:
        event = new_event(EventSource.INTERNAL, "x.y")
        provider.store(event)
        provider.publish(event)
        delivery = s1.receive(timeout=2)
        assert delivery is not None
        end = time.monotonic() + 3 * lease
        while time.monotonic() < end:
            delivery.renew()
            assert s2.receive(timeout=lease / 3) is None
        delivery.ack()
        assert s2.receive(timeout=lease + 0.1) is None


def test_group__slow_handler_past_lease_is_not_redelivered(
    make_broker: MakeBroker, provider: MemoryProvider, wait_for: Waiter
) -> None:
    """A handler running three times its lease is not redelivered: the broker renews it."""
    a = make_broker(provider=provider, instance_id="a")
    b = make_broker(provider=provider, instance_id="b")
    slow_a, slow_b = Recorder(hold=1.0), Recorder(hold=1.0)
    a.subscribe("slow.*", slow_a, group="g", lease=0.3)
    b.subscribe("slow.*", slow_b, group="g", lease=0.3)
    event = new_event(EventSource.INTERNAL, "slow.job")
    a.publish(event)
    wait_for(lambda: provider.get(event.id).status == "completed",  # type: ignore[union-attr]
             timeout=10, message="the slow handler to finish")
    assert slow_a.total() + slow_b.total() == 1
    a.stop()
    b.stop()
    assert (slow_a.counts + slow_b.counts)[event.id] == 1
    assert provider.stats().provider_specific["group_backlog"] == 0


def test_group__failing_handler_ends_failed_and_is_not_redelivered(
    mode: str, make_broker: MakeBroker, provider: MemoryProvider, wait_for: Waiter
) -> None:
    """A group handler out of retries leaves the event failed and acked: no other member gets it."""
    a = make_broker(mode=mode, provider=provider)
    b = make_broker(mode=mode, provider=provider)
    calls = Recorder()

    def broken(e: Event) -> None:
        calls(e)
        raise RuntimeError("no")

    a.subscribe("job.*", broken, group="g", lease=0.3)
    b.subscribe("job.*", broken, group="g", lease=0.3)
    event = new_event(EventSource.INTERNAL, "job.run")
    a.publish(event)
    wait_for(lambda: provider.get(event.id).status == "failed")  # type: ignore[union-attr]
    wait_for(lambda: provider.stats().provider_specific["group_backlog"] == 0)
    a.stop()
    b.stop()
    assert calls.counts[event.id] == 3  # one attempt and two retries, on one member
    assert [e.id for e in a.dead_letters() + b.dead_letters()] == [event.id]


def test_group__queued_deliveries_past_lease_are_handled_once(
    make_broker: MakeBroker, provider: MemoryProvider, wait_for: Waiter
) -> None:
    """Deliveries waiting for a busy worker longer than the lease are still handled once."""
    a = make_broker(mode="async", provider=provider, worker_count=1)
    b = make_broker(mode="async", provider=provider, worker_count=1)
    ra, rb = Recorder(hold=0.05), Recorder(hold=0.05)
    a.subscribe("job.*", ra, group="g", lease=0.2)
    b.subscribe("job.*", rb, group="g", lease=0.2)
    events = _events(20, "job.run")
    for e in events:
        a.publish(e)
    wait_for(lambda: ra.total() + rb.total() >= 20, timeout=15)
    wait_for(lambda: provider.stats().provider_specific["group_backlog"] == 0)
    a.stop()
    b.stop()
    combined = ra.counts + rb.counts
    assert set(combined) == {e.id for e in events} and max(combined.values()) == 1
