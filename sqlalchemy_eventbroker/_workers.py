"""The async-mode machinery: a bounded queue, worker threads, a retry timer, an asyncio loop.

Kept apart from ``broker.py`` so the broker reads as policy (what happens to an event) and
this module as mechanism (which thread runs what, and when the queue is drained).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ._threads import QuietThread
from .errors import BrokerStopped, QueueFull

__all__ = ["AsyncRunner", "StatusWriter", "WorkerPool"]

#: Most records a worker holds before handing them to ``complete``.
BATCH = 64

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerPool:
    """``worker_count`` threads running items from a queue that admits ``capacity`` of them.

    Capacity is enforced by reservation (``try_reserve``) rather than by a bounded
    ``queue.Queue``, so that a caller can learn the queue is full *before* doing anything
    irreversible (storing the event), and so that retries and remote deliveries, which were
    already accepted once, are never refused. ``outstanding`` counts accepted items not yet
    finished, including retries waiting for their delay: ``drain`` waits for it to reach 0.

    The queue is a ``deque`` that workers pop without a lock. Handing each event to a thread
    through a locked queue costs more than running its handler (BASELINES.md: 8.5 µs per
    event for queue.Queue + 4 threads), almost all of it in waking the thread; so a publisher
    wakes a sleeping worker only when the awake ones cannot take the new item at once (all
    busy), and under load the workers run from the deque without a wake-up per item.

    Idle workers sleep until woken; they do not poll. (Polling workers were measured: they
    barely helped throughput, and their constant demand for the GIL widened a CPython race in
    which a signal reaching the main thread just before it blocks in ``lock.acquire`` is only
    handled when that wait ends, so Ctrl-C or SIGTERM could go unanswered for a minute.)
    ``run(item)`` returns a record (not None) when the item finished its accepted unit of
    work; each worker hands its records to ``complete(records)`` in batches (when it runs
    out of work, or every ``BATCH`` records) and only then counts them as finished.
    """

    def __init__(self, worker_count: int, capacity: int, run: Callable[[Any], Any],
                 complete: Callable[[list[Any]], None], name: str = "eventbroker") -> None:
        self._run = run
        self._complete = complete
        self._capacity = capacity
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)      # drain() waits here
        self._wake = threading.Condition(self._lock)      # sleeping workers wait here
        self._space = threading.Condition(self._lock)     # put() waits here while full
        self._claimed = 0     # reserved by try_reserve, not yet queued
        self._outstanding = 0
        self._sleepers = 0    # workers asleep until woken
        self._space_waiters = 0
        self._busy = [False] * worker_count
        self._worker_count = worker_count
        self._timers: list[tuple[float, int, Any]] = []
        self._timer_seq = itertools.count()
        self._timer_cond = threading.Condition()
        self._stopping = False
        self._admitting = True
        self._threads = [
            QuietThread(target=self._work, args=(i,), name=f"{name}-worker-{i}",
                             daemon=True)
            for i in range(worker_count)
        ]
        self._timer_thread = QuietThread(
            target=self._timer_loop, name=f"{name}-retry-timer", daemon=True
        )

    def start(self) -> None:
        for t in self._threads:
            t.start()
        self._timer_thread.start()

    # -- admission ---------------------------------------------------------------------

    def try_reserve(self, n: int = 1) -> None:
        """Claim ``n`` queue places, or raise :class:`QueueFull` and claim none.

        Raises :class:`BrokerStopped` once :meth:`close_admission` was called.
        """
        with self._lock:
            if not self._admitting:
                raise BrokerStopped("broker was stopped; events are no longer accepted")
            taken = self._claimed + len(self._items)
            if taken + n > self._capacity:
                raise QueueFull(
                    f"queue full: {taken} of {self._capacity} places taken "
                    f"(buffer_size); event not published"
                )
            self._claimed += n
            self._outstanding += n

    def close_admission(self) -> None:
        """Refuse new reservations from now on, so ``drain`` sees every accepted item."""
        with self._lock:
            self._admitting = False

    def release(self, n: int = 1) -> None:
        """Give back places reserved by ``try_reserve`` that will not be used."""
        with self._lock:
            self._claimed -= n
            self._outstanding -= n
            if self._outstanding == 0:
                self._idle.notify_all()

    def put_reserved(self, item: Any) -> None:
        """Queue an item whose place ``try_reserve`` claimed."""
        self._items.append(item)
        with self._lock:
            self._claimed -= 1
            if self._sleepers and self._needs_wake():
                self._wake.notify()

    def _needs_wake(self) -> bool:
        """Whether the awake workers are too few for what is queued (caller holds the lock).

        Read after the item was appended: a worker about to sleep re-checks the deque under
        the lock after counting itself asleep, so no wake-up can be lost in between.
        """
        awake_free = self._worker_count - self._sleepers - sum(self._busy)
        return len(self._items) > awake_free

    def put(self, item: Any, block_while_full: bool = True) -> None:
        """Queue an already-accepted item (a remote delivery), waiting while the queue is full."""
        with self._lock:
            if block_while_full:
                self._wait_for_space()
            self._outstanding += 1
            self._items.append(item)
            if self._sleepers and self._needs_wake():
                self._wake.notify()

    def hold(self, block_while_full: bool = True) -> None:
        """Claim a place for an already-accepted item queued later by :meth:`put_reserved`
        (an ordered job parked behind its key), waiting while full like :meth:`put`."""
        with self._lock:
            if block_while_full:
                self._wait_for_space()
            self._claimed += 1
            self._outstanding += 1

    def _wait_for_space(self) -> None:
        """Wait (holding the lock, as a condition does) until the queue has a free place."""
        while not self._stopping and self._claimed + len(self._items) >= self._capacity:
            self._space_waiters += 1
            try:
                self._space.wait(0.05)
            finally:
                self._space_waiters -= 1

    def put_later(self, delay: float, item: Any) -> None:
        """Queue ``item`` after ``delay`` seconds without holding a worker meanwhile.

        The item stays counted in ``outstanding`` (it was counted when first accepted).
        """
        with self._timer_cond:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), item))
            self._timer_cond.notify()

    # -- state -------------------------------------------------------------------------

    def queue_size(self) -> int:
        return len(self._items) + self._claimed

    @property
    def active(self) -> int:
        return sum(self._busy)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def drain(self, timeout: float | None) -> bool:
        """Wait until every accepted item is finished; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._outstanding > 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(0.5 if remaining is None else min(remaining, 0.5))
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop threads; items still queued or waiting for a retry are abandoned."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            self._space.notify_all()
            self._idle.notify_all()
        with self._timer_cond:
            self._timer_cond.notify()
        deadline = time.monotonic() + timeout
        for t in (*self._threads, self._timer_thread):
            if t.is_alive() and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    # -- threads -----------------------------------------------------------------------

    def _settle(self, done: list[Any]) -> None:
        """Hand finished records over, then count them (called without the lock)."""
        if done:
            try:
                self._complete(done)
            except BaseException:  # pragma: no cover - complete() handles its own errors
                log.exception("eventbroker worker: completing a batch failed")
        with self._lock:
            if done:
                self._outstanding -= len(done)
                if self._outstanding == 0:
                    self._idle.notify_all()
            if self._space_waiters:
                self._space.notify_all()

    def _work(self, index: int) -> None:
        items = self._items
        run = self._run
        busy = self._busy
        done: list[Any] = []
        while True:
            try:
                item = items.popleft()
            except IndexError:
                if done or self._space_waiters:
                    self._settle(done)
                    done = []
                    continue  # completing took time: look again before idling
                with self._lock:
                    if self._stopping:
                        return
                    self._sleepers += 1
                    while not items and not self._stopping:
                        self._wake.wait()
                    self._sleepers -= 1
                    if self._stopping:
                        return
                continue
            busy[index] = True
            if items and self._sleepers:
                # More work than this worker: wake a sleeper if no awake worker is free.
                with self._lock:
                    if self._sleepers and self._needs_wake():
                        self._wake.notify()
            try:
                record = run(item)
                if record is not None:
                    done.append(record)
            except BaseException:  # pragma: no cover - run() handles its own errors
                log.exception("eventbroker worker: unexpected error")
            finally:
                busy[index] = False
            if len(done) >= BATCH or self._space_waiters:
                self._settle(done)
                done = []

    def _timer_loop(self) -> None:
        while True:
            with self._timer_cond:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    if self._timers and self._timers[0][0] <= now:
                        _, _, item = heapq.heappop(self._timers)
                        break
                    wait = self._timers[0][0] - now if self._timers else None
                    self._timer_cond.wait(wait)
            # Retries bypass capacity: the event was accepted once already.
            self._items.append(item)
            with self._lock:
                if self._sleepers and self._needs_wake():
                    self._wake.notify()


class AsyncRunner:
    """One asyncio loop in a daemon thread, for ``async def`` handlers of a sync application.

    Started on first use; every coroutine of a broker runs on this one loop, so handlers can
    share loop-bound resources (clients, locks) across calls.
    """

    def __init__(self, name: str = "eventbroker-asyncio") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = QuietThread(target=run, name=self._name, daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on the loop and wait for its result in the calling thread."""
        loop = self._ensure()
        if self._thread is threading.current_thread():
            raise RuntimeError("AsyncRunner.run called from its own loop thread")

        async def wrap() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrap(), loop).result()

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


class StatusWriter:
    """Collects final-status writes and hands them to the provider in batches.

    One round trip per handled event would cap a consumer at the backend's round-trip rate
    (a PostgreSQL UPDATE + commit, a Redis script call, a NATS KV compare-and-set), so
    outcomes wait here up to ``interval`` seconds or until ``max_batch`` are pending, then
    go out together through ``write(batch)``. ``flush()`` writes what is pending now and
    returns after it was written; ``close()`` flushes and stops the thread.
    """

    def __init__(self, write: Callable[[list[Any]], None], interval: float = 0.02,
                 max_batch: int = 500, name: str = "eventbroker-status") -> None:
        self._write = write
        self._interval = interval
        self._max_batch = max_batch
        self._pending: list[Any] = []
        self._cond = threading.Condition()
        self._writing = threading.Lock()
        self._closed = False
        self._thread = QuietThread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def add(self, item: Any) -> None:
        with self._cond:
            self._pending.append(item)
            if len(self._pending) == 1 or len(self._pending) >= self._max_batch:
                self._cond.notify()

    def flush(self) -> None:
        """Write everything added so far before returning."""
        with self._writing:
            with self._cond:
                batch, self._pending = self._pending, []
            if batch:
                self._write(batch)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed and not self._pending:
                    return
                if len(self._pending) < self._max_batch and not self._closed:
                    # Let a batch build up: the first outcome waits at most one interval.
                    self._cond.wait(self._interval)
            self.flush()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.flush()
