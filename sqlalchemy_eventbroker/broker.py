"""The broker: subscriptions, publishing, dispatch with retries, and the cross-instance bus.

How an event travels (see docs/design.md): ``publish*`` validates and stores it through the
provider, tells other brokers through ``provider.publish``, and dispatches it to this broker's
matching *fan-out* subscriptions (sync: in the caller's thread; async: a bounded queue feeding
worker threads). Every broker with fan-out subscriptions also reads one ``provider.stream``
and dispatches what other brokers published; every *group* subscription reads its own
``provider.group_stream`` and acknowledges each delivery once its handler has finished.
"""

from __future__ import annotations

import collections
import datetime as dt
import inspect
import itertools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Self

from prometheus_client import CollectorRegistry

from . import signals
from ._threads import QuietThread
from ._types import Handler, SubscriptionID
from ._workers import AsyncRunner, StatusWriter, WorkerPool
from .errors import (
    BrokerError,
    BrokerStopped,
    ConfigError,
    HandlerError,
    SubscriptionNotFound,
)
from .event import Event, EventStatus
from .metrics import BrokerMetrics
from .pattern import compile_pattern
from .providers.base import (
    Delivery,
    EventFilter,
    EventStream,
    GroupStream,
    Provider,
    StatusUpdate,
)
from .retry import RetryPolicy

__all__ = ["Broker", "BrokerStats", "ProcessingMode"]

log = logging.getLogger(__name__)

#: How many dead letters a broker keeps in memory (oldest dropped first). The provider keeps
#: every failed event regardless: ``provider.list(EventFilter(status=EventStatus.FAILED))``.
MAX_DEAD_LETTERS = 10_000
#: How many ids of its own published events a broker remembers to suppress their echo.
MAX_OWN_IDS = 1_000_000
#: Guards the few fields of a job that retries running in parallel workers share. One lock for
#: all jobs: it is held for a handful of bytecodes, and a lock per job would cost more.
_JOB_LOCK = threading.Lock()
_NO_FAILURES: list[tuple[str, BaseException]] = []  # shared, never appended to (see _Job.fail)
_POLL = 0.2  # seconds a consumer thread blocks in receive() before checking for stop


class ProcessingMode(StrEnum):
    """``sync``: handlers run in the publishing thread. ``async``: queued for worker threads."""

    SYNC = "sync"
    ASYNC = "async"


@dataclass(slots=True, kw_only=True)
class BrokerStats:
    """A snapshot of a broker's counters."""

    instance_id: str
    mode: ProcessingMode
    is_running: bool
    total_published: int
    total_processed: int
    total_failed: int
    active_subscribers: int
    queue_size: int
    active_workers: int
    provider_stats: Any = None


@dataclass(slots=True, eq=False)
class _Subscription:
    id: SubscriptionID
    pattern: str
    handler: Handler
    match: Callable[[str], bool]
    group: str | None = None
    lease: float = 30.0
    stream: GroupStream | None = None
    thread: threading.Thread | None = None
    active: bool = True


class _Job:
    """One event on its way through a set of handlers (one item per handler on retry)."""

    __slots__ = (
        "delivery",
        "elapsed",
        "event",
        "failures",
        "inline_status",
        "lock",
        "pending",
        "retries",
        "slot",
        "started",
        "subs",
    )
    failures: list[tuple[str, BaseException]]

    def fail(self, subscription_id: str, exc: BaseException) -> None:
        if self.failures is _NO_FAILURES:
            self.failures = []
        self.failures.append((subscription_id, exc))

    def __init__(
        self,
        event: Event,
        subs: Sequence[_Subscription],
        pending: int,
        started: float,
        delivery: Delivery | None = None,
        slot: threading.BoundedSemaphore | None = None,
        inline_status: bool = False,
    ) -> None:
        self.event = event
        self.subs = subs
        self.pending = pending
        self.started = started
        self.elapsed = 0.0
        self.delivery = delivery
        #: A group consumer's prefetch slot, released when the delivery is acknowledged.
        self.slot = slot
        #: ``(subscription_id, exception)`` of handlers that gave up; empty until one does.
        self.failures = _NO_FAILURES
        #: subscription_id -> (attempts so far, last exception), for handlers being retried.
        self.retries: dict[str, tuple[int, BaseException]] | None = None
        #: Write the outcome before returning (publish_sync promises it), not in the next batch.
        self.inline_status = inline_status
        self.lock = _JOB_LOCK


class Broker:
    """Publishes events and runs the handlers subscribed to them.

    Thread-safe: subscribe, unsubscribe and publish from any thread. See the module docstring
    for the path an event takes, and API.md for the contract.

    Args:
        provider: where events are stored and how they reach other brokers; a private
            ``MemoryProvider`` by default.
        mode: ``"async"`` (default) or ``"sync"``; decides what ``publish`` does.
        worker_count: threads running handlers in async mode.
        buffer_size: events the async queue holds before ``publish_async`` raises ``QueueFull``.
        retry_policy: retries of a failing handler.
        instance_id: names this broker on events it publishes; the host name by default.
        registry: Prometheus registry for this broker's metrics (the global one by default).
        close_provider: close the provider in ``stop()``; by default only a provider the broker
            made itself is closed.
    """

    def __init__(
        self,
        provider: Provider | None = None,
        mode: ProcessingMode | str = ProcessingMode.ASYNC,
        worker_count: int = 10,
        buffer_size: int = 1000,
        retry_policy: RetryPolicy | None = None,
        instance_id: str | None = None,
        *,
        registry: CollectorRegistry | None = None,
        close_provider: bool | None = None,
    ) -> None:
        try:
            self.mode = ProcessingMode(mode)
        except ValueError:
            raise ConfigError(
                f"mode: expected 'sync' or 'async', got {mode!r}", path="mode"
            ) from None
        for name, value in (("worker_count", worker_count), ("buffer_size", buffer_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected int >= 1, got {value!r}", path=name)
        if provider is None:
            from .providers.memory import MemoryProvider

            provider = MemoryProvider()
            close_provider = True if close_provider is None else close_provider
        elif not isinstance(provider, Provider):
            raise ConfigError(
                f"provider: {type(provider).__name__} does not implement the Provider protocol",
                path="provider",
            )
        self.provider: Provider = provider
        self._close_provider = bool(close_provider)
        self.worker_count = worker_count
        self.buffer_size = buffer_size
        self.retry_policy = retry_policy if retry_policy is not None else RetryPolicy()
        self.instance_id = instance_id or socket.gethostname()
        self.metrics = BrokerMetrics(registry)
        self._origin = uuid.uuid4().hex  # tells this broker's events apart on a shared provider
        self._origin_aware = bool(getattr(provider, "supports_origin", False))
        # Outcomes are batched only where a write is a round trip (see StatusWriter).
        self._update_status_many = getattr(provider, "update_status_many", None)
        self._store_and_publish = getattr(provider, "store_and_publish_many", None)
        self._inline_status = bool(getattr(provider, "inline_status_writes", False)) or \
            self._update_status_many is None

        self._lock = threading.RLock()
        self._subs: dict[SubscriptionID, _Subscription] = {}
        self._routes: dict[str, tuple[_Subscription, ...]] = {}
        self._sub_ids = itertools.count(1)
        self._running = False
        self._stopped = False
        self._pool: WorkerPool | None = None
        self._runner = AsyncRunner(f"eventbroker-{self.instance_id}-asyncio")
        self._receiver: EventStream | None = None
        self._receiver_thread: threading.Thread | None = None
        self._own: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._own_lock = threading.Lock()
        self._inflight: dict[int, tuple[Delivery, float]] = {}
        self._renewer: threading.Thread | None = None
        self._renew_wake = threading.Event()
        self._dead: collections.OrderedDict[str, Event] = collections.OrderedDict()
        self._statuses: StatusWriter | None = None
        self._published = 0
        self._processed = 0
        self._failed = 0
        self._counter_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._running

    def start(self) -> Self:
        """Start workers and consumers. Idempotent; a stopped broker cannot be restarted.

        Raises:
            BrokerStopped: the broker was stopped before.
        """
        with self._lock:
            if self._running:
                return self
            if self._stopped:
                raise BrokerStopped("this broker was stopped; create a new one")
            if self.mode is ProcessingMode.ASYNC:
                self._ensure_pool()
            self._running = True
            self._renewer = QuietThread(
                target=self._renew_loop, name="eventbroker-lease-renewer", daemon=True
            )
            self._renewer.start()
            subs = list(self._subs.values())
        if any(s.group is None for s in subs):
            self._ensure_receiver()
        for sub in subs:
            if sub.group is not None:
                self._start_group_consumer(sub)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Process what was accepted (up to ``timeout`` seconds), then stop. Idempotent.

        Publishing is refused from the moment ``stop`` is called. Group consumers stop taking
        new deliveries; what they already took is finished and acknowledged. Then streams are
        closed, and the provider too when the broker owns it.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._stopped:
                return
            self._running = False
            self._stopped = True
            subs = list(self._subs.values())
            receiver, receiver_thread = self._receiver, self._receiver_thread
            if self._pool is not None:
                # A publish_async racing this stop either gets its place before this (and is
                # drained below) or is refused with BrokerStopped: never accepted and dropped.
                self._pool.close_admission()
        # Stop taking work from the bus, then finish what was taken.
        if receiver is not None:
            receiver.close()
        threads = [s.thread for s in subs if s.thread is not None]
        if receiver_thread is not None:
            threads.append(receiver_thread)
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        if self._pool is not None:
            if not self._pool.drain(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "eventbroker: stop() timed out with %d events unfinished",
                    self._pool.outstanding,
                )
            self._pool.stop(timeout=max(0.1, deadline - time.monotonic()))
        for sub in subs:
            if sub.stream is not None:
                _close_quietly(sub.stream)
        if self._statuses is not None:
            self._statuses.close()
        self._renew_wake.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=2)
        self._runner.close()
        if self._close_provider:
            _close_quietly(self.provider)

    def close(self) -> None:
        """Same as ``stop()``."""
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"Broker(instance_id={self.instance_id!r}, mode={self.mode.value!r}, "
            f"running={self._running}, provider={self.provider!r})"
        )

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        group: str | None = None,
        lease: float = 30.0,
    ) -> SubscriptionID:
        """Call ``handler`` with a copy of every event whose type matches ``pattern``.

        The pattern is compiled now, so a bad one fails here and never at publish time.
        Without ``group`` the subscription is fan-out: it sees every matching event published
        by this broker, and by every broker sharing the provider, while it is subscribed.
        With ``group``, subscriptions sharing the name (and pattern) anywhere on the bus
        compete: each event reaches one of them, at least once; ``lease`` is how long a
        member may hold an event before it is redelivered (renewed while the handler runs).

        Raises:
            PatternError: the pattern is malformed.
            TypeError: ``handler`` is not callable.
        """
        match = compile_pattern(pattern)
        if not callable(handler):
            raise TypeError(f"handler: expected a callable, got {type(handler).__name__}")
        if group is not None and (not isinstance(group, str) or not group):
            raise ValueError(f"group: expected a non-empty string, got {group!r}")
        if lease <= 0:
            raise ValueError(f"lease: expected seconds > 0, got {lease!r}")
        sub = _Subscription(
            id=f"sub-{next(self._sub_ids)}-{uuid.uuid4().hex[:8]}",
            pattern=pattern, handler=handler, match=match, group=group, lease=float(lease),
        )
        with self._lock:
            subs = dict(self._subs)
            subs[sub.id] = sub
            self._subs = subs
            self._routes = {}
            running = self._running
        if running:
            if group is None:
                self._ensure_receiver()
            else:
                self._start_group_consumer(sub)
        return sub.id

    def on(self, pattern: str, *, group: str | None = None,
           lease: float = 30.0) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`subscribe`; returns the function unchanged."""

        def register(fn: Handler) -> Handler:
            self.subscribe(pattern, fn, group=group, lease=lease)
            return fn

        return register

    def unsubscribe(self, subscription_id: SubscriptionID) -> None:
        """Remove a subscription; its handler is not called for later events.

        Raises:
            SubscriptionNotFound: no subscription has this id.
        """
        with self._lock:
            sub = self._subs.get(subscription_id)
            if sub is None:
                raise SubscriptionNotFound(
                    f"no subscription with id {subscription_id!r}",
                    subscription_id=str(subscription_id),
                )
            subs = dict(self._subs)
            del subs[subscription_id]
            self._subs = subs
            self._routes = {}
        sub.active = False
        if sub.stream is not None:
            stream = sub.stream
            if sub.thread is not None and sub.thread is not threading.current_thread():
                sub.thread.join(timeout=2 * _POLL + 1)
            _close_quietly(stream)

    def _fanout_for(self, event_type: str) -> tuple[_Subscription, ...]:
        routes = self._routes
        found = routes.get(event_type)
        if found is None:
            found = tuple(
                s for s in self._subs.values() if s.group is None and s.match(event_type)
            )
            if len(routes) < 10_000:
                routes[event_type] = found
        return found

    # -- publishing ----------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Publish by mode: ``publish_sync`` in sync mode, ``publish_async`` in async mode."""
        if self.mode is ProcessingMode.SYNC:
            self.publish_sync(event)
        else:
            self.publish_async(event)

    def publish_sync(self, event: Event) -> None:
        """Store and publish ``event``, then run its local handlers now, in this thread.

        Retries wait in this thread. Group subscriptions are served by their consumers, not
        here (another member on the bus may be the one to take the event).

        Raises:
            BrokerStopped: not started, or stopped.
            EventValidationError: the event is invalid (nothing was stored).
            HandlerError: handlers still failed after their retries; ``.failures`` lists them.
        """
        self._prepare(event)
        subs = self._fanout_for(event.type)
        self._store_one(event)
        if not subs:
            self._count_unhandled(1)
            return
        started = time.perf_counter()
        event.mark_processing()
        for index, sub in enumerate(subs):
            try:
                result = sub.handler(event.clone())
                if result is not None and inspect.isawaitable(result):
                    self._runner.run(result)
            except Exception as exc:
                # A failure: leave the fast path for the job machinery (retries, failures).
                job = _Job(event, subs, len(subs), started, inline_status=True)
                self._run_job_inline(job, resume_at=index, first_error=exc)
                if job.failures:
                    raise HandlerError(event.error, event_id=event.id,
                                       failures=job.failures) from None
                return
        event.mark_completed()
        self._record_success(event, time.perf_counter() - started)

    def _record_success(self, event: Event, elapsed: float) -> None:
        """``_finish`` for a sync event whose handlers all succeeded at the first attempt."""
        self._write_statuses([StatusUpdate(event.id, EventStatus.COMPLETED, "",
                                           event.retry_count)])
        with self._counter_lock:
            self._processed += 1
        self.metrics.processed(event.source, event.type, EventStatus.COMPLETED, elapsed)
        if signals.event_processed.receivers:
            self._send(signals.event_processed, event)

    def publish_async(self, event: Event) -> None:
        """Store and publish ``event`` and queue it for the workers; returns at once.

        Raises:
            BrokerStopped: not started, or stopped.
            EventValidationError: the event is invalid (nothing was stored).
            QueueFull: the queue holds ``buffer_size`` events; nothing was stored or counted.
        """
        self._prepare(event)
        subs = self._fanout_for(event.type)
        pool = self._pool
        if pool is None:  # a sync-mode broker: async publish still must not block on handlers
            pool = self._ensure_pool()
        if not subs:
            self._store_one(event)
            self._count_unhandled(1)
            return
        pool.try_reserve()
        try:
            self._store_one(event)
        except BaseException:
            pool.release()
            raise
        pool.put_reserved(_Job(event, subs, len(subs), time.perf_counter()))

    def publish_many(self, events: Sequence[Event]) -> None:
        """Publish several events by mode, storing and announcing them in one batch.

        In async mode the queue places for all of them are claimed first: ``QueueFull`` means
        none was published.
        """
        events = list(events)
        for event in events:
            self._prepare(event)
        if self.mode is ProcessingMode.SYNC:
            self._store_and_announce(events)
            failures: list[tuple[str, BaseException]] = []
            for event in events:
                subs = self._fanout_for(event.type)
                if not subs:
                    self._count_unhandled(1)
                    continue
                job = _Job(event, subs, len(subs), time.perf_counter(),
                           inline_status=True)
                self._run_job_inline(job)
                failures.extend(job.failures)
            if failures:
                raise HandlerError(f"{len(failures)} handler(s) failed", failures=failures)
            return
        self._dispatch_async(events, store=True)

    def publish_captured(self, events: Sequence[Event], *, stored: bool) -> None:
        """Publish events captured from a committed transaction. Never raises.

        Called by ORM capture after commit. With ``stored=True`` the events were written
        (and announced) in the transaction itself, so they are only dispatched locally. A
        full queue or failing handler is logged and counted, never raised into the commit.
        """
        if not events:
            return
        try:
            if not self._running:
                raise BrokerStopped("broker not running; captured events were not published")
            for event in events:
                if not event.instance_id:
                    event.instance_id = self.instance_id
            if self.mode is ProcessingMode.SYNC:
                if not stored:
                    self._store_and_announce(events)
                else:
                    self._count_published(events)
                for event in events:
                    subs = self._fanout_for(event.type)
                    if not subs:
                        self._count_unhandled(1)
                        continue
                    self._run_job_inline(_Job(event, subs, len(subs), time.perf_counter()))
            else:
                self._dispatch_async(events, store=not stored, lossless=True)
        except Exception as exc:
            self.count_capture_error(exc)

    def _dispatch_async(self, events: Sequence[Event], *, store: bool,
                        lossless: bool = False) -> None:
        pool = self._pool or self._ensure_pool()
        jobs = []
        for event in events:
            subs = self._fanout_for(event.type)
            if subs:
                jobs.append(_Job(event, subs, len(subs), time.perf_counter()))
        reserved = False
        try:
            if jobs:
                pool.try_reserve(len(jobs))
                reserved = True
        except BrokerError:
            if not lossless:
                raise
            # Captured events are committed data: store them even when the queue is full, and
            # report the lost local dispatch instead of losing the audit record.
            jobs = []
            if store:
                self._store_and_announce(events)
            else:
                self._count_published(events)
            raise
        try:
            if store:
                self._store_and_announce(events)
            else:
                self._count_published(events)
        except BaseException:
            if reserved:
                pool.release(len(jobs))
            raise
        self._count_unhandled(len(events) - len(jobs))
        for job in jobs:
            pool.put_reserved(job)

    def _ensure_pool(self) -> WorkerPool:
        with self._lock:
            if self._pool is None:
                if self._stopped:
                    raise BrokerStopped("broker was stopped; events are no longer accepted")
                self._pool = WorkerPool(self.worker_count, self.buffer_size, self._run_item,
                                        self._record, name=f"eventbroker-{self.instance_id}")
                self._pool.start()
                self.metrics.watch_queue(self._pool)
            return self._pool

    def _prepare(self, event: Event) -> None:
        if not self._running:
            raise BrokerStopped(
                "broker is not running: call start() first"
                if not self._stopped else "broker was stopped; events are no longer accepted"
            )
        if not isinstance(event, Event):
            raise TypeError(f"publish: expected an Event, got {type(event).__name__}")
        if not event.instance_id:
            event.instance_id = self.instance_id
        event.validate()

    def _store_one(self, event: Event) -> None:
        """``_store_and_announce`` for one event: the publish hot path, kept flat."""
        provider = self.provider
        if self._store_and_publish is not None:
            if not self._origin_aware and self._receiver is not None:
                self.note_own((event.id,))
            self._store_and_publish((event,), origin=self._origin if self._origin_aware else None)
        elif self._origin_aware:
            provider.store(event)
            provider.publish_many((event,), origin=self._origin)  # type: ignore[attr-defined]
        else:
            if self._receiver is not None:
                self.note_own((event.id,))
            provider.store(event)
            provider.publish(event)
        with self._counter_lock:
            self._published += 1
        self.metrics.published(event.source, event.type)
        if signals.event_published.receivers:
            self._send(signals.event_published, event)

    def _store_and_announce(self, events: Sequence[Event]) -> None:
        if len(events) == 1:
            self._store_one(events[0])
            return
        provider = self.provider
        if self._receiver is not None and not self._origin_aware:
            self.note_own([e.id for e in events])
        if self._store_and_publish is not None:
            self._store_and_publish(events, origin=self._origin if self._origin_aware else None)
        else:
            store_many = getattr(provider, "store_many", None)
            if store_many is not None:
                store_many(events)
            else:
                for e in events:
                    provider.store(e)
            self._announce(events)
        self._count_published(events)

    def _announce(self, events: Sequence[Event]) -> None:
        provider = self.provider
        if self._origin_aware:
            provider.publish_many(events, origin=self._origin)  # type: ignore[attr-defined]
            return
        if hasattr(provider, "publish_many"):
            provider.publish_many(events)
        else:
            for e in events:
                provider.publish(e)

    def _count_published(self, events: Sequence[Event]) -> None:
        with self._counter_lock:
            self._published += len(events)
        published = self.metrics.published
        if signals.event_published.receivers:
            for e in events:
                published(e.source, e.type)
                self._send(signals.event_published, e)
        else:
            for e in events:
                published(e.source, e.type)

    def _count_unhandled(self, n: int) -> None:
        if n:
            with self._counter_lock:
                self._processed += n

    # -- echo suppression ----------------------------------------------------------------

    def note_own(self, event_ids: Iterable[str]) -> None:
        """Remember ids of events this broker publishes, so its receiver skips their echo.

        ORM capture calls this before writing outbox rows, because the receiver may read a
        committed row before ``after_commit`` runs.
        """
        if self._receiver is None or self._origin_aware:
            return
        with self._own_lock:
            own = self._own
            for eid in event_ids:
                own[eid] = None
            while len(own) > MAX_OWN_IDS:
                own.popitem(last=False)

    def forget_own(self, event_ids: Iterable[str]) -> None:
        """Forget ids noted by :meth:`note_own` whose events will never be published."""
        with self._own_lock:
            for eid in event_ids:
                self._own.pop(eid, None)

    def _is_own(self, event_id: str) -> bool:
        with self._own_lock:
            return self._own.pop(event_id, 0) is None

    # -- consumers of the bus ------------------------------------------------------------

    def _ensure_receiver(self) -> None:
        with self._lock:
            if self._receiver is not None or not self._running:
                return
            if self._origin_aware:
                stream = self.provider.stream("*", exclude_origin=self._origin)  # type: ignore[call-arg]
            else:
                stream = self.provider.stream("*")
            self._receiver = stream
            self._receiver_thread = QuietThread(
                target=self._receive_loop, args=(stream,),
                name=f"eventbroker-{self.instance_id}-receiver", daemon=True,
            )
            self._receiver_thread.start()

    def _receive_loop(self, stream: EventStream) -> None:
        while self._running:
            try:
                event = stream.receive(timeout=_POLL)
            except StopIteration:
                return
            except Exception as exc:
                log.warning("eventbroker: fan-out stream failed: %s", exc)
                self.metrics.error("stream")
                time.sleep(_POLL)
                continue
            if event is None or self._is_own(event.id):
                continue
            subs = self._fanout_for(event.type)
            if not subs:
                continue
            job = _Job(event, subs, len(subs), time.perf_counter())
            if self.mode is ProcessingMode.SYNC:
                self._run_job_inline(job)
            else:
                (self._pool or self._ensure_pool()).put(job)

    def _start_group_consumer(self, sub: _Subscription) -> None:
        with self._lock:
            if sub.stream is not None or not self._running or not sub.active:
                return
            assert sub.group is not None
            sub.stream = self.provider.group_stream(sub.pattern, sub.group, lease=sub.lease)
            sub.thread = QuietThread(
                target=self._group_loop, args=(sub,),
                name=f"eventbroker-group-{sub.group}", daemon=True,
            )
            sub.thread.start()

    def _group_loop(self, sub: _Subscription) -> None:
        stream = sub.stream
        assert stream is not None
        # At most worker_count deliveries in flight per group subscription, so one member does
        # not lease events that it cannot start on before their lease runs out.
        slots = threading.BoundedSemaphore(1 if self.mode is ProcessingMode.SYNC
                                           else self.worker_count)
        while sub.active and self._running:
            if not slots.acquire(timeout=_POLL):
                continue
            try:
                delivery = stream.receive(timeout=_POLL)
            except StopIteration:
                slots.release()
                return
            except Exception as exc:
                slots.release()
                log.warning("eventbroker: group %r stream failed: %s", sub.group, exc)
                self.metrics.error("stream")
                time.sleep(_POLL)
                continue
            if delivery is None:
                slots.release()
                continue
            event = delivery.event
            if not sub.match(event.type):  # defensive: a provider filtering loosely
                delivery.ack()
                slots.release()
                continue
            job = _Job(event, [sub], 1, time.perf_counter(), delivery=delivery, slot=slots)
            self._track(delivery, sub.lease)
            if self.mode is ProcessingMode.SYNC:
                self._run_job_inline(job)
            else:
                (self._pool or self._ensure_pool()).put(job, block_while_full=True)

    # -- lease renewal -------------------------------------------------------------------

    def _track(self, delivery: Delivery, lease: float) -> None:
        with self._lock:
            self._inflight[id(delivery)] = (delivery, lease)
        self._renew_wake.set()

    def _untrack(self, delivery: Delivery) -> None:
        with self._lock:
            self._inflight.pop(id(delivery), None)

    def _renew_loop(self) -> None:
        last: dict[int, float] = {}
        while self._running or self._inflight:
            with self._lock:
                items = list(self._inflight.items())
            if not items:
                self._renew_wake.wait(1.0)
                self._renew_wake.clear()
                if not self._running and not self._inflight:
                    return
                continue
            now = time.monotonic()
            shortest = min(lease for _, (_, lease) in items)
            for key, (delivery, lease) in items:
                if now - last.setdefault(key, now) >= lease / 3:
                    try:
                        delivery.renew()
                    except Exception as exc:
                        log.warning("eventbroker: lease renewal failed: %s", exc)
                    last[key] = now
            for key in list(last):
                if key not in self._inflight:
                    del last[key]
            self._renew_wake.wait(max(0.05, shortest / 6))
            self._renew_wake.clear()

    # -- running handlers ----------------------------------------------------------------

    def _call(self, sub: _Subscription, event: Event) -> BaseException | None:
        try:
            result = sub.handler(event.clone())
            if result is not None and inspect.isawaitable(result):
                self._runner.run(result)
            return None
        except Exception as exc:
            return exc

    def _run_job_inline(
        self, job: _Job, resume_at: int = 0, first_error: BaseException | None = None
    ) -> None:
        """Sync mode: every handler with its retries, in this thread.

        ``resume_at``/``first_error``: the handlers before ``resume_at`` already succeeded
        and the one at ``resume_at`` failed its first attempt with ``first_error``.
        """
        event = job.event
        if first_error is None:
            event.mark_processing()
        policy = self.retry_policy
        for index, sub in enumerate(job.subs):
            if index < resume_at:
                continue
            exc: BaseException | None
            if index == resume_at and first_error is not None:
                exc = first_error
            else:
                # The first attempt inline (the hot path), retries below.
                try:
                    result = sub.handler(event.clone())
                    if result is not None and inspect.isawaitable(result):
                        self._runner.run(result)
                    continue
                except Exception as first:
                    exc = first
            attempt = 0
            while True:
                if exc is None:
                    break
                attempt += 1
                if attempt > policy.max_retries or (not sub.active and sub.group is None):
                    job.fail(sub.id, exc)
                    self._log_failure(job.event, sub, exc, final=True)
                    break
                self._log_failure(event, sub, exc, final=False)
                event.increment_retry()
                time.sleep(policy.delay(attempt))
                exc = self._call(sub, event)
        job.pending = 0
        self._finish(job)

    def _run_item(self, item: _Job | tuple[_Job, _Subscription]) -> _Job | None:
        """Async mode, in a worker: a job's handlers, or one handler's retry.

        Returns the concluded job once every handler succeeded or gave up (the worker hands
        a batch of them to :meth:`_record`), else None.
        """
        subs: Sequence[_Subscription]
        if isinstance(item, tuple):
            job, only = item
            subs = (only,)
        else:
            job, subs = item, item.subs
            job.event.mark_processing()
        pool = self._pool
        assert pool is not None
        finished = 0
        for sub in subs:
            if not sub.active and sub.group is None and job.retries and sub.id in job.retries:
                # Unsubscribed while its retry waited: its last failure is final, as in sync mode.
                with job.lock:
                    job.fail(sub.id, job.retries[sub.id][1])
                finished += 1
                continue
            exc = self._call(sub, job.event)
            if exc is None:
                finished += 1
                continue
            with job.lock:
                if job.retries is None:
                    job.retries = {}
                attempt = job.retries.get(sub.id, (0, exc))[0] + 1
                job.retries[sub.id] = (attempt, exc)
                retry = attempt <= self.retry_policy.max_retries and (
                    sub.active or sub.group is not None
                )
                if retry:
                    job.event.increment_retry()
                else:
                    job.fail(sub.id, exc)
            self._log_failure(job.event, sub, exc, final=not retry)
            if retry:
                pool.put_later(self.retry_policy.delay(attempt), (job, sub))
            else:
                finished += 1
        if not finished:
            return None
        if len(job.subs) == 1:  # nothing runs in parallel with a one-handler job
            job.pending -= finished
            done = job.pending == 0
        else:
            with job.lock:
                job.pending -= finished
                done = job.pending == 0
        return self._conclude(job) if done else None

    def _finish(self, job: _Job) -> None:
        """Conclude and record one job now (sync paths)."""
        self._record([self._conclude(job)])

    def _conclude(self, job: _Job) -> _Job:
        """Give the event its final status; returns the job for :meth:`_record`."""
        event = job.event
        job.elapsed = time.perf_counter() - job.started
        if job.failures:
            # From the job, not self._subs: the subscription may have been removed meanwhile.
            by_id = {s.id: s for s in job.subs}
            event.mark_failed("; ".join(
                f"{sid} ({_handler_name(by_id.get(sid))}): {type(exc).__name__}: {exc}"
                for sid, exc in job.failures
            ))
        else:
            event.mark_completed()
        return job

    def _record(self, jobs: list[_Job]) -> None:
        """Write back, count and announce concluded jobs; acknowledge group deliveries.

        Workers call this once per batch of jobs they finished, so the provider's status
        write, the counters' lock and the lease bookkeeping are paid per batch, not per event.
        The status is written before the counters move: whoever sees ``total_processed``
        grow can read the outcome from the provider (for inline-status providers).
        """
        updates = [StatusUpdate(j.event.id, j.event.status, j.event.error, j.event.retry_count)
                   for j in jobs]
        if self._inline_status or jobs[0].inline_status:
            self._write_statuses(updates)
        else:
            writer = self._status_writer()
            for update in updates:
                writer.add(update)
        failed = [j for j in jobs if j.event.status is EventStatus.FAILED]
        with self._counter_lock:
            self._processed += len(jobs)
            self._failed += len(failed)
        processed = self.metrics.processed
        for j in jobs:
            e = j.event
            processed(e.source, e.type, e.status, j.elapsed)
        if failed:
            with self._lock:
                for j in failed:
                    self._dead[j.event.id] = j.event.clone()
                while len(self._dead) > MAX_DEAD_LETTERS:
                    self._dead.popitem(last=False)
        if signals.event_processed.receivers or signals.event_failed.receivers:
            for j in jobs:
                failed_one = j.event.status is EventStatus.FAILED
                signal = signals.event_failed if failed_one else signals.event_processed
                if signal.receivers:
                    self._send(signal, j.event)
        for j in jobs:
            if j.delivery is not None:
                self._acknowledge(j)

    def _acknowledge(self, job: _Job) -> None:
        delivery = job.delivery
        assert delivery is not None
        self._untrack(delivery)
        try:
            delivery.ack()
        except Exception as exc:
            log.warning("eventbroker: ack of event %s failed (it will be redelivered): %s",
                        job.event.id, exc, extra={"event_id": job.event.id})
            self.metrics.error("provider")
        if job.slot is not None:
            job.slot.release()

    def _log_failure(self, event: Event, sub: _Subscription, exc: BaseException,
                     final: bool) -> None:
        log.log(
            logging.ERROR if final else logging.WARNING,
            "eventbroker: handler %s for %s failed%s: %s",
            _handler_name(sub), event.type, " (giving up)" if final else ", will retry", exc,
            extra={"event_id": event.id, "subscription_id": sub.id},
            exc_info=exc if final else None,
        )

    def _send(self, signal: Any, event: Event) -> None:
        try:
            signal.send(self, event=event)
        except Exception:
            log.exception("eventbroker: a signal receiver raised")

    def _status_writer(self) -> StatusWriter:
        writer = self._statuses
        if writer is None:
            with self._lock:
                if self._statuses is None:
                    self._statuses = StatusWriter(
                        self._write_statuses, name=f"eventbroker-{self.instance_id}-status"
                    )
                writer = self._statuses
        return writer

    def _write_statuses(self, updates: list[StatusUpdate]) -> None:
        provider = self.provider
        many = self._update_status_many
        try:
            if many is not None:
                many(updates)
                return
        except Exception as exc:
            log.warning("eventbroker: could not record the status of %d events: %s",
                        len(updates), exc)
            self.metrics.error("provider")
            return
        for u in updates:
            try:
                provider.update_status(u.event_id, u.status, u.error, retry_count=u.retry_count)
            except Exception as exc:
                log.warning("eventbroker: could not record status of event %s: %s", u.event_id,
                            exc, extra={"event_id": u.event_id})
                self.metrics.error("provider")

    def flush_statuses(self) -> None:
        """Write outcomes that are still batched to the provider now (async mode batches them)."""
        if self._statuses is not None:
            self._statuses.flush()

    def count_capture_error(self, exc: BaseException) -> None:
        """Log and count a failure that ORM capture kept away from the user's transaction."""
        log.error("eventbroker: capture could not publish events: %s", exc, exc_info=exc)
        self.metrics.error("capture")

    # -- dead letters, replay, stats -----------------------------------------------------

    def dead_letters(self) -> list[Event]:
        """Events that ended ``failed`` in this broker, oldest first (copies).

        Kept in memory (at most ``MAX_DEAD_LETTERS``); the provider keeps them durably:
        ``provider.list(EventFilter(status=EventStatus.FAILED))``.
        """
        with self._lock:
            return [e.clone() for e in self._dead.values()]

    def redrive(self, event_id: str) -> Event:
        """Publish a dead letter again: same id, status ``pending``, no error, no retries.

        The stored copy is replaced, so other brokers see it as a new event too.

        Raises:
            SubscriptionNotFound: (a ``LookupError``) no dead letter or failed stored event
                has this id.
        """
        self.flush_statuses()  # a batched 'failed' must not land on the redriven copy
        with self._lock:
            event = self._dead.pop(event_id, None)
        if event is None:
            stored = self.provider.get(event_id)
            if stored is None or stored.status is not EventStatus.FAILED:
                raise _DeadLetterNotFound(f"no dead letter with id {event_id!r}")
            event = stored
        failed = event.clone()
        event.status = EventStatus.PENDING
        event.error = ""
        event.retry_count = 0
        event.processed_at = event.completed_at = None
        try:
            self.provider.delete(event.id)
        except Exception as exc:  # storing again will tell if the backend is really down
            log.warning("eventbroker: redrive could not delete old copy of %s: %s", event_id, exc)
        try:
            self.publish(event)
        except HandlerError:
            raise  # published and failed again: it is a dead letter once more
        except BaseException:
            # Not published (stopped, queue full, backend down): keep the dead letter as it was.
            with self._lock:
                self._dead[event_id] = failed
            try:
                self.provider.store(failed)
            except Exception as exc:
                log.warning("eventbroker: redrive could not restore %s: %s", event_id, exc)
            raise
        return event

    def replay(
        self,
        pattern_or_filter: str | EventFilter,
        handler: Handler,
        since: dt.datetime | dt.timedelta | None = None,
    ) -> int:
        """Feed stored events to ``handler``, oldest first, without storing them again.

        ``since`` (a datetime, or a timedelta meaning "that long ago") overrides the filter's
        ``start_time``. Events are read in pages, so memory stays flat for large histories.
        Returns how many events were fed. A handler exception stops the replay and propagates.
        """
        if isinstance(pattern_or_filter, EventFilter):
            flt = pattern_or_filter
        else:
            compile_pattern(pattern_or_filter)
            flt = EventFilter(type_pattern=pattern_or_filter if pattern_or_filter != "*" else "")
        if since is not None:
            start = dt.datetime.now(dt.UTC) - since if isinstance(since, dt.timedelta) \
                else since
            flt = _replace(flt, start_time=start)
        iterate = getattr(self.provider, "iter_events", None)
        events = iterate(flt) if iterate is not None else _paged(self.provider, flt)
        count = 0
        for event in events:
            result = handler(event)
            if inspect.isawaitable(result):
                self._runner.run(result)
            count += 1
        return count

    def stats(self) -> BrokerStats:
        """Counters and the provider's own stats."""
        try:
            provider_stats = self.provider.stats()
        except Exception as exc:
            provider_stats = None
            log.warning("eventbroker: provider stats failed: %s", exc)
        pool = self._pool
        with self._counter_lock:
            return BrokerStats(
                instance_id=self.instance_id,
                mode=self.mode,
                is_running=self._running,
                total_published=self._published,
                total_processed=self._processed,
                total_failed=self._failed,
                active_subscribers=len(self._subs),
                queue_size=pool.queue_size() if pool is not None else 0,
                active_workers=pool.active if pool is not None else 0,
                provider_stats=provider_stats,
            )


class _DeadLetterNotFound(SubscriptionNotFound):
    """No dead letter has this id."""

    code = "dead_letter_not_found"


def _handler_name(sub: _Subscription | None) -> str:
    if sub is None:
        return "?"
    h = sub.handler
    return getattr(h, "__qualname__", None) or getattr(h, "__name__", None) or repr(h)


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception as exc:
        log.debug("eventbroker: close failed: %s", exc)


def _replace(flt: EventFilter, **changes: Any) -> EventFilter:
    import dataclasses

    return dataclasses.replace(flt, **changes)


def _paged(provider: Provider, flt: EventFilter, page: int = 1000) -> Iterable[Event]:
    offset = flt.offset
    remaining = flt.limit or None
    while True:
        size = page if remaining is None else min(page, remaining)
        if size <= 0:
            return
        batch = provider.list(_replace(flt, limit=size, offset=offset))
        yield from batch
        if len(batch) < size:
            return
        offset += len(batch)
        if remaining is not None:
            remaining -= len(batch)
