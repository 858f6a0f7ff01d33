"""Ordered subscriptions inside one broker and across fan-out (API.md section 3).

Every test records, per key, the order handlers saw and how many ran at once. The unordered
control test shows the same workload does overlap within a key, so the ordered tests can fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy_eventbroker import Broker, Event, EventSource, EventStatus, MemoryProvider, new_event

from ._keys import KeyRecorder
from .conftest import Waiter

MakeBroker = Callable[..., Broker]


def _keyed(keys: int, per_key: int) -> list[Event]:
    """``per_key`` events for each of ``keys`` keys, interleaved, numbered per key."""
    return [new_event(EventSource.INTERNAL, "shop.orders.update", {"n": n}, key=f"orders:{k}")
            for n in range(per_key) for k in range(keys)]


def test_ordered__per_key_order_one_at_a_time_and_keys_in_parallel(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    broker = make_broker(mode="async", worker_count=8, buffer_size=10_000)
    rec = KeyRecorder()
    broker.subscribe("shop.orders.*", rec, ordered=True)
    events = _keyed(keys=20, per_key=15)
    for e in events:
        broker.publish(e)
    wait_for(lambda: rec.done == len(events), message="every event handled")
    assert rec.max_same_key == 1
    assert rec.max_total > 1, "other keys must keep flowing while one key waits"
    assert all(order == list(range(15)) for order in rec.order.values()), rec.order


def test_unordered__the_same_workload_overlaps_within_a_key(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """The control: without ``ordered`` the recorder does see a key twice at once."""
    broker = make_broker(mode="async", worker_count=8, buffer_size=10_000)
    rec = KeyRecorder(delay=0.005)
    broker.subscribe("shop.orders.*", rec)
    events = _keyed(keys=2, per_key=40)
    for e in events:
        broker.publish(e)
    wait_for(lambda: rec.done == len(events), message="every event handled")
    assert rec.max_same_key > 1


def test_ordered__retries_keep_the_order(make_broker: MakeBroker, wait_for: Waiter) -> None:
    broker = make_broker(mode="async", worker_count=6, buffer_size=10_000)
    # Every third event fails twice before it succeeds (the policy allows two retries).
    rec = KeyRecorder(fail=lambda e, attempt: e.payload["n"] % 3 == 1 and attempt <= 2)
    broker.subscribe("shop.orders.*", rec, ordered=True)
    events = _keyed(keys=5, per_key=12)
    for e in events:
        broker.publish(e)
    wait_for(lambda: rec.done == len(events), message="every event handled")
    assert rec.max_same_key == 1
    assert all(order == list(range(12)) for order in rec.order.values()), rec.order


def test_ordered__an_event_that_fails_releases_its_key(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    provider = MemoryProvider()
    broker = make_broker(mode="async", worker_count=4, provider=provider)
    rec = KeyRecorder(fail=lambda e, attempt: e.payload["n"] == 2)
    broker.subscribe("shop.orders.*", rec, ordered=True)
    events = _keyed(keys=1, per_key=6)
    for e in events:
        broker.publish(e)
    wait_for(lambda: rec.done == 5, message="the five other events handled")
    assert rec.order["orders:0"] == [0, 1, 3, 4, 5]
    wait_for(lambda: (s := provider.get(events[2].id)) is not None
             and s.status is EventStatus.FAILED, message="event 2 stored as failed")


def test_ordered__events_without_a_key_are_not_held_back(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    broker = make_broker(mode="async", worker_count=4)
    started = threading.Barrier(2, timeout=10)

    def handler(event: Event) -> None:
        started.wait()  # both keyless events must run at the same time to pass this

    broker.subscribe("shop.orders.*", handler, ordered=True)
    done = broker.stats
    for _ in range(2):
        broker.publish(new_event(EventSource.INTERNAL, "shop.orders.update", {}))
    wait_for(lambda: done().total_processed == 2, message="both keyless events handled")


def test_ordered__events_received_from_another_broker_keep_their_order(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    provider = MemoryProvider()
    sender = make_broker(mode="async", provider=provider)
    receiver = make_broker(mode="async", provider=provider, worker_count=8,
                           buffer_size=10_000)
    rec = KeyRecorder()
    receiver.subscribe("shop.orders.*", rec, ordered=True)
    events = _keyed(keys=10, per_key=10)
    for e in events:
        sender.publish(e)
    wait_for(lambda: rec.done == len(events), message="every event received and handled")
    assert rec.max_same_key == 1
    assert all(order == list(range(10)) for order in rec.order.values()), rec.order


def test_ordered__sync_publishers_of_one_key_take_turns(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    broker = make_broker(mode="sync")
    rec = KeyRecorder(delay=0.003)
    broker.subscribe("shop.orders.*", rec, ordered=True)

    def publish(thread: int) -> None:
        for n in range(10):
            broker.publish(new_event(EventSource.INTERNAL, "shop.orders.update",
                                     {"n": thread * 100 + n}, key="orders:1"))

    threads = [threading.Thread(target=publish, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec.done == 40
    assert rec.max_same_key == 1


def test_ordered__stop_drains_parked_events(make_broker: MakeBroker) -> None:
    broker = make_broker(mode="async", worker_count=4)
    rec = KeyRecorder(delay=0.001)
    broker.subscribe("shop.orders.*", rec, ordered=True)
    events = _keyed(keys=2, per_key=25)
    for e in events:
        broker.publish(e)
    start = time.monotonic()
    broker.stop(timeout=10)
    assert time.monotonic() - start < 10
    assert rec.done == len(events)
    assert all(order == list(range(25)) for order in rec.order.values())
