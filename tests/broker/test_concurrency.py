"""Many threads at once: exactly-once handling, and subscribe/unsubscribe racing publish."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from sqlalchemy_eventbroker import (
    Broker,
    Event,
    EventSource,
    MemoryProvider,
    QueueFull,
    new_event,
)

from .conftest import Waiter

MakeBroker = Callable[..., Broker]

THREADS = 8
PER_THREAD = 10_000


def _run_threads(target: Callable[[int], None], n: int) -> list[BaseException]:
    """Run ``target(i)`` in ``n`` threads started together; return what they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            start.wait()
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a publishing thread hung"
    return errors


def test_publish_async__8_threads_10000_each_handled_exactly_once(
    make_broker: MakeBroker, wait_for: Waiter
) -> None:
    """80,000 events published from 8 threads in async mode are each handled exactly once."""
    provider = MemoryProvider(max_events=THREADS * PER_THREAD)
    broker = make_broker(mode="async", provider=provider, worker_count=8, buffer_size=1000)
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def handler(e: Event) -> None:
        with lock:
            counts[e.id] += 1

    broker.subscribe("bulk.*", handler)
    published: list[list[str]] = [[] for _ in range(THREADS)]
    refused = [0] * THREADS

    def publisher(i: int) -> None:
        mine = published[i]
        for n in range(PER_THREAD):
            event = new_event(EventSource.INTERNAL, "bulk.item", {"t": i, "n": n})
            while True:
                try:
                    broker.publish_async(event)
                    break
                except QueueFull:
                    refused[i] += 1
                    time.sleep(0.0005)  # back off; the refused event is simply sent again
            mine.append(event.id)

    assert _run_threads(publisher, THREADS) == []
    ids = [eid for mine in published for eid in mine]
    assert len(set(ids)) == THREADS * PER_THREAD
    broker.stop(timeout=60)
    assert len(counts) == THREADS * PER_THREAD
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1
    stats = broker.stats()
    assert stats.total_published == THREADS * PER_THREAD
    assert stats.total_processed == THREADS * PER_THREAD and stats.total_failed == 0
    assert stats.queue_size == 0 and stats.active_workers == 0
    assert provider.stats().total_events == THREADS * PER_THREAD
    provider.close()


def test_subscribe__racing_publish_never_raises_nor_loses_subscribers(
    mode: str, make_broker: MakeBroker
) -> None:
    """Subscribing and unsubscribing while 4 threads publish never raises, and no subscription
    that was not removed misses an event published while it existed."""
    broker = make_broker(mode=mode, worker_count=4, buffer_size=100_000)
    stable_seen: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def stable(e: Event) -> None:
        with lock:
            stable_seen[e.id] += 1

    broker.subscribe("race.*", stable)
    stop = threading.Event()
    published: list[list[str]] = [[] for _ in range(4)]
    churn_missed: list[str] = []
    churned = [0]

    # The churn starts once every publisher is under way, so the two really overlap.
    underway = threading.Barrier(5)

    def publisher(i: int) -> None:
        while not stop.is_set() and len(published[i]) < 10_000:  # stays under buffer_size
            event = new_event(EventSource.INTERNAL, f"race.p{i}")
            broker.publish(event)
            published[i].append(event.id)
            if len(published[i]) == 1:
                underway.wait(30)

    def churner(i: int) -> None:
        # Each round: subscribe, publish a probe that the new subscription must see, then
        # unsubscribe.
        for r in range(300):
            got: list[str] = []
            sub = broker.subscribe(f"race.c{i}.*", got.append)
            # A second subscription kept between rounds exercises unsubscribe of others.
            extra = broker.subscribe("race.*", lambda e: None)
            probe = new_event(EventSource.INTERNAL, f"race.c{i}.r{r}")
            broker.publish_sync(probe)  # runs the handlers before it returns, in both modes
            if [e.id for e in got] != [probe.id]:
                churn_missed.append(probe.id)
            broker.unsubscribe(extra)
            broker.unsubscribe(sub)
            churned[0] += 1

    errors: list[BaseException] = []

    def stop_when_churners_done() -> None:
        underway.wait(30)
        churn = [threading.Thread(target=lambda i=i: _guard(churner, i, errors)) for i in (4, 5)]
        for t in churn:
            t.start()
        for t in churn:
            t.join(60)
        stop.set()

    controller = threading.Thread(target=stop_when_churners_done)
    controller.start()
    errors.extend(_run_threads(publisher, 4))
    controller.join(60)
    assert errors == []
    assert churned[0] == 600
    assert churn_missed == []
    broker.stop(timeout=30)
    ids = [eid for mine in published for eid in mine]
    assert ids, "publishers made no progress"
    missing = [eid for eid in ids if stable_seen[eid] != 1]
    assert missing == []
    assert broker.stats().active_subscribers == 1


def _guard(fn: Callable[[int], None], i: int, errors: list[BaseException]) -> None:
    try:
        fn(i)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)
