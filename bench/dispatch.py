"""In-process dispatch: ``publish_sync`` / ``publish_async`` against blinker's ``Signal.send``.

The same pre-built events go to one handler that counts them. Library side: a ``Broker`` on a
``MemoryProvider`` with metrics on (a private Prometheus registry); async with 4 workers,
waiting until the handler has seen every event. ``QueueFull`` is the caller's signal to back
off, so the publishing loop yields briefly and retries (what an application would do).

Tracing rows: the same ``publish_sync`` loop in fresh interpreters, with OpenTelemetry made
unimportable (``sys.modules["opentelemetry"] = None``: the ``[otel]`` extra not installed),
installed without a tracer provider, and with an SDK provider (spans recorded, no exporter).
"Not installed" is held to the ``publish_sync`` figure above (tracing costs nothing without
the extra); "no provider" to "not installed".
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from blinker import Signal
from prometheus_client import CollectorRegistry

from sqlalchemy_eventbroker import Broker, Event, EventSource, MemoryProvider, QueueFull, new_event

from ._report import INFO, Row, median, profile_call, rate, ratio_row

SECTION = "2. in-process dispatch (events/s)"
TARGET_SYNC = 0.2
TARGET_ASYNC = 0.12
#: OpenTelemetry not installed vs the in-process publish_sync (fresh interpreter vs the bench's:
#: the bound leaves room for that and for noise; the hooks cost two ``is None`` tests).
TARGET_TRACING_ABSENT = 0.9
#: Installed, no tracer provider, vs not installed: one module-global check per hook.
TARGET_TRACING_UNCONFIGURED = 0.85

#: Set-up run before ``sync_rate`` in a fresh interpreter, per tracing mode.
TRACING_MODES = {
    "absent": "import sys; sys.modules['opentelemetry'] = None",
    "unconfigured": "",
    "configured": ("from opentelemetry import trace; "
                   "from opentelemetry.sdk.trace import TracerProvider; "
                   "trace.set_tracer_provider(TracerProvider())"),
}


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


def tracing_rate(mode: str, n: int) -> float:
    """``sync_rate`` of ``n`` events in a fresh interpreter set up as ``TRACING_MODES[mode]``."""
    code = (f"{TRACING_MODES[mode]}\nfrom bench.dispatch import _events, sync_rate\n"
            f"print(sync_rate(_events({n})))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    if proc.returncode != 0:
        if mode == "configured" and "No module named 'opentelemetry" in proc.stderr:
            return float("nan")  # the SDK is not installed: that row reads "no valid measurement"
        raise RuntimeError(f"tracing bench ({mode}) failed: {proc.stderr.strip()[-500:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def tracing_rows(n: int, runs: int, baseline: float) -> list[Row]:
    """publish_sync with tracing absent, unconfigured and configured (modes interleaved per
    run, so drift on a busy machine spreads over all three)."""
    rates: dict[str, list[float]] = {mode: [] for mode in TRACING_MODES}
    for _ in range(runs):
        for mode in TRACING_MODES:
            rates[mode].append(tracing_rate(mode, n))
    absent = median(rates["absent"])
    configured = ratio_row(SECTION, f"publish_sync, {n:,} events, tracing on (SDK provider, "
                           "no exporter) vs OpenTelemetry not installed",
                           median(rates["configured"]), absent, rate,
                           note="what a recorded span pair costs per event")
    configured.status = INFO if configured.ratio != "–" else configured.status
    return [
        ratio_row(SECTION, f"publish_sync, {n:,} events, OpenTelemetry not installed "
                  "(fresh interpreter) vs publish_sync above", absent, baseline, rate,
                  at_least=TARGET_TRACING_ABSENT),
        ratio_row(SECTION, f"publish_sync, {n:,} events, OpenTelemetry installed, no tracer "
                  "provider vs not installed", median(rates["unconfigured"]), absent, rate,
                  at_least=TARGET_TRACING_UNCONFIGURED),
        configured,
    ]


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
    return rows + tracing_rows(min(n, 50_000), runs, median(sync))


def _profiler(fn: Callable[[list[Event]], float], n: int) -> Callable[[], str]:
    def go() -> str:
        events = _events(n)
        return profile_call(lambda: fn(events))

    return go
