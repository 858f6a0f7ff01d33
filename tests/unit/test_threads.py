"""Library threads leave process signals to the main thread."""

from __future__ import annotations

import signal
import threading

from prometheus_client import CollectorRegistry

from sqlalchemy_eventbroker import Broker, MemoryProvider
from sqlalchemy_eventbroker._threads import QuietThread


def test_quiet_thread__blocks_sigint_and_sigterm() -> None:
    """A QuietThread's signal mask holds SIGINT and SIGTERM; the main thread's does not."""
    seen: list[set[int]] = []
    t = QuietThread(target=lambda: seen.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, []))))
    t.start()
    t.join(5)
    assert {signal.SIGINT, signal.SIGTERM} <= seen[0]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_broker_threads__are_all_quiet() -> None:
    """Every thread a running broker starts (workers, timers, consumers) is a QuietThread."""
    before = set(threading.enumerate())
    broker = Broker(MemoryProvider(), worker_count=3, registry=CollectorRegistry()).start()
    try:
        broker.subscribe("a.*", lambda e: None)
        broker.subscribe("b.*", lambda e: None, group="g")
        started = [t for t in threading.enumerate() if t not in before]
        assert len(started) >= 6
        assert all(isinstance(t, QuietThread) for t in started), [
            t.name for t in started if not isinstance(t, QuietThread)]
    finally:
        broker.stop()
