"""In-process dispatch: ``publish_sync`` / ``publish_async`` against blinker's ``Signal.send``.

The same pre-built events go to one handler that counts them. Library side: a ``Broker`` on a
``MemoryProvider`` with metrics on (a private Prometheus registry); async with 4 workers,
waiting until the handler has seen every event. ``QueueFull`` is the caller's signal to back
off, so the publishing loop yields briefly and retries (what an application would do).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable

from blinker import Signal
from prometheus_client import CollectorRegistry

from sqlalchemy_eventbroker import Broker, Event, EventSource, MemoryProvider, QueueFull, new_event

from ._report import Row, median, profile_call, rate, ratio_row

SECTION = "2. in-process dispatch (events/s)"
TARGET_SYNC = 0.2
TARGET_ASYNC = 0.12


def _events(n: int) -> list[Event]:
    return [
        new_event(EventSource.DATABASE, "public.users.update", {"id": i, "name": f"user-{i}"})
        for i in range(n)
    ]


def blinker_rate(events: list[Event]) -> float:
    signal = Signal()
    seen = [0]

    def handler(sender: object, event: Event) -> None:
        seen[0] += 1

    signal.connect(handler)
    send = signal.send
    gc.collect()
    t0 = time.perf_counter()
    for e in events:
        send(None, event=e)
    elapsed = time.perf_counter() - t0
    assert seen[0] == len(events)
    return len(events) / elapsed


def sync_rate(events: list[Event]) -> float:
    seen = [0]

    def handler(event: Event) -> None:
        seen[0] += 1

    broker = Broker(MemoryProvider(max_events=10_000), mode="sync",
                    registry=CollectorRegistry(), instance_id="bench")
    broker.subscribe("public.users.*", handler)
    broker.start()
    try:
        publish = broker.publish_sync
        gc.collect()
        t0 = time.perf_counter()
        for e in events:
            publish(e)
        elapsed = time.perf_counter() - t0
    finally:
        broker.stop()
    assert seen[0] == len(events), (seen[0], len(events))
    return len(events) / elapsed


def async_rate(events: list[Event]) -> float:
    n = len(events)
    lock = threading.Lock()
    seen = [0]
    done = threading.Event()

    def handler(event: Event) -> None:
        with lock:
            seen[0] += 1
            if seen[0] == n:
                done.set()

    broker = Broker(MemoryProvider(max_events=10_000), mode="async", worker_count=4,
                    buffer_size=10_000, registry=CollectorRegistry(), instance_id="bench")
    broker.subscribe("public.users.*", handler)
    broker.start()
    try:
        publish = broker.publish_async
        gc.collect()
        t0 = time.perf_counter()
        for e in events:
            while True:
                try:
                    publish(e)
                    break
                except QueueFull:
                    time.sleep(0.0005)
        if not done.wait(120):
            raise RuntimeError(f"async dispatch: {seen[0]} of {n} handled after 120 s")
        elapsed = time.perf_counter() - t0
    finally:
        broker.stop()
    return n / elapsed


def run(quick: bool, runs: int, profile_failures: Callable[[list[Row]], None]) -> list[Row]:
    n = 20_000 if quick else 200_000
    raw: list[float] = []
    sync: list[float] = []
    asyn: list[float] = []
    for _ in range(runs):
        events = _events(n)
        raw.append(blinker_rate(events))
        sync.append(sync_rate(events))
        del events
        asyn.append(async_rate(_events(n)))
    rows = [
        ratio_row(SECTION, f"publish_sync, {n:,} events, metrics on vs blinker send",
                  median(sync), median(raw), rate, at_least=TARGET_SYNC),
        ratio_row(SECTION, f"publish_async (4 workers), {n:,} events vs blinker send",
                  median(asyn), median(raw), rate, at_least=TARGET_ASYNC),
    ]
    small = min(n, 20_000)
    rows[0].profiler = _profiler(sync_rate, small)
    rows[1].profiler = _profiler(async_rate, small)
    return rows


def _profiler(fn: Callable[[list[Event]], float], n: int) -> Callable[[], str]:
    def go() -> str:
        events = _events(n)
        return profile_call(lambda: fn(events))

    return go
