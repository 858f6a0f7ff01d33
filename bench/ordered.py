"""Ordered subscriptions: what per-key order costs against the same work unordered.

* Dispatch: one broker (memory provider, async, 10 workers) handles ``n`` events spread over
  1,000 keys, with a handler that takes ~0.1 ms of simulated I/O (a timed wait, which frees
  the GIL as real I/O does), once with ``ordered=True`` and once without. The gate adds a
  dict lookup at enqueue and a hand-over at the end of each event; with 1,000 keys the 10
  workers rarely wait for a key, so the ratio should stay near 1.
* Groups: two member brokers (each with its own ``DatabaseProvider``) drain ``n`` events over
  1,000 keys from one PostgreSQL group, ordered against unordered. An ordered member takes a
  claim only when no older claim of its key is left, so the claim query does an index probe
  per candidate row and a key's next event waits for the previous acknowledgement.

Variants alternate run by run; medians are reported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy_eventbroker import Broker, Event, EventSource, MemoryProvider, new_event
from sqlalchemy_eventbroker.providers.database import DatabaseProvider

from ._env import PG_ADMIN_URL, fresh_pg_database, reachable
from ._report import Row, median, na_row, profile_call, rate, ratio_row

SECTION = "Ordered subscriptions (1,000 keys), against the same work unordered"
KEYS = 1_000
#: Dispatch: the gate must cost little next to ~0.1 ms of handler work per event.
DISPATCH_TARGET = 0.8
#: Groups: a key's next claim waits for the previous acknowledgement (deferred a few ms).
GROUP_TARGET = 0.5


def _events(n: int) -> list[Event]:
    return [new_event(EventSource.INTERNAL, "bench.orders.update", {"i": i},
                      key=f"orders:{i % KEYS}") for i in range(n)]


class _Counter:
    def __init__(self, n: int, work: float) -> None:
        self.n = n
        self.work = work
        self.count = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self._pause = threading.Event()  # never set: a timed wait stands for I/O

    def __call__(self, event: Event) -> None:
        if self.work:
            self._pause.wait(self.work)
        with self.lock:
            self.count += 1
            if self.count == self.n:
                self.done.set()


def _dispatch(ordered: bool, n: int) -> float:
    """Events per second through one async broker."""
    counter = _Counter(n, work=0.0001)
    events = _events(n)
    with Broker(provider=MemoryProvider(max_events=n + 10), mode="async", worker_count=10,
                buffer_size=n + 10) as broker:
        broker.subscribe("bench.**", counter, ordered=ordered)
        t0 = time.perf_counter()
        for e in events:
            broker.publish(e)
        if not counter.done.wait(120):
            raise RuntimeError(f"dispatch: {counter.count} of {n} handled in 120 s")
        return n / (time.perf_counter() - t0)


def _group_drain(url: str, ordered: bool, n: int, run: int) -> float:
    """Events per second for two members draining ``n`` events published beforehand."""
    group = f"bench-{'o' if ordered else 'u'}-{run}"
    counter = _Counter(n, work=0.0)
    providers = [DatabaseProvider(url) for _ in range(3)]
    members: list[Broker] = []
    try:
        # Join (the group starts at the tail), stop, publish, then start draining: the
        # figure is the drain alone.
        for p in providers[:2]:
            p.group_stream("bench.**", group, ordered=ordered).close()
        with Broker(provider=providers[2], mode="async", instance_id="publisher") as pub:
            events = _events(n)
            for i in range(0, n, 500):
                pub.publish_many(events[i:i + 500])
        t0 = time.perf_counter()
        for i, p in enumerate(providers[:2]):
            b = Broker(provider=p, mode="async", worker_count=8, buffer_size=n + 10,
                       instance_id=f"member-{i}")
            b.subscribe("bench.**", counter, group=group, ordered=ordered)
            b.start()
            members.append(b)
        if not counter.done.wait(300):
            raise RuntimeError(f"group drain: {counter.count} of {n} handled in 300 s")
        return n / (time.perf_counter() - t0)
    finally:
        for b in members:
            b.stop(timeout=10)
        for p in providers:
            p.close()


def run(quick: bool, runs: int, profile_failures: Callable[[list[Row]], None]) -> list[Row]:
    rows: list[Row] = []
    n = 5_000 if quick else 20_000
    ordered, unordered = [], []
    for _ in range(runs):
        unordered.append(_dispatch(False, n))
        ordered.append(_dispatch(True, n))
    row = ratio_row(SECTION, "async dispatch, 10 workers, ~0.1 ms handler", median(ordered),
                    median(unordered), rate, at_least=DISPATCH_TARGET,
                    note=f"{n:,} events; raw = the same subscription unordered")
    row.profiler = lambda: profile_call(lambda: _dispatch(True, min(n, 5_000)))
    part = [row]
    profile_failures(part)
    rows += part
    if not reachable(PG_ADMIN_URL):
        rows.append(na_row(SECTION, "PostgreSQL group", f"server not reachable at {PG_ADMIN_URL}"))
        return rows
    n = 2_000 if quick else 10_000
    with fresh_pg_database() as url:
        with DatabaseProvider(url) as p:
            p.create_schema()
        o, u = [], []
        for r in range(runs):
            u.append(_group_drain(url, False, n, r))
            o.append(_group_drain(url, True, n, r))
        rows.append(ratio_row(
            SECTION, "PostgreSQL group, 2 members × 8 workers, drain", median(o), median(u),
            rate, at_least=GROUP_TARGET,
            note=f"{n:,} events; raw = the same group unordered"))
    return rows
