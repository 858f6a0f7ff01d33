"""The dispatch pipeline: the ONE path every event takes through a broker.

Every way in (``publish``, ``publish_many``, a committed transaction's captured events, an
event received from another broker, a group delivery) goes through :meth:`Pipeline.run`:

    accept → store (unless already stored) → route → run handlers → record the outcome

The ways in differ only in data (a :class:`Way`): whether the events still need storing,
whether an outbox already wrote them and they need announcing, and what happens when the
async queue is full. Sync and async differ only in where handlers run: in the caller's
thread, or on the worker pool. There is one retry state machine (:meth:`Pipeline._attempt`
decides, the caller's thread sleeps or the pool's timer waits) and one place that calls a
handler (:meth:`Pipeline._call`).
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import signals
from ._ordering import KeyGate
from ._types import Handler, SubscriptionID
from ._workers import AsyncRunner, StatusWriter, WorkerPool
from .errors import BrokerStopped, HandlerError, PublishDepthExceeded
from .event import Event, EventStatus
from .metrics import BrokerMetrics
from .providers.base import (
    BatchGroupStream,
    BusProvider,
    Delivery,
    StatusUpdate,
    TransactionalProvider,
)
from .retry import RetryPolicy
from .tracing import start_process, start_publish

__all__ = ["Job", "Pipeline", "Subscription", "Way", "call_handler"]

log = logging.getLogger("sqlalchemy_eventbroker.broker")

#: How many dead letters a broker keeps in memory (oldest dropped first). The provider keeps
#: every failed event regardless: ``provider.list(EventFilter(status=EventStatus.FAILED))``.
MAX_DEAD_LETTERS = 10_000
#: Guards the few fields of a job that retries running in parallel workers share. One lock for
#: all jobs: it is held for a handful of bytecodes, and a lock per job would cost more.
_JOB_LOCK = threading.Lock()
_NO_FAILURES: list[tuple[str, BaseException]] = []  # shared, never appended to (see Job.fail)
_FAILED = EventStatus.FAILED


class _Depth(threading.local):
    """How deep the current thread is in handlers run inline (publish from a handler), and
    which gate keys its running jobs hold."""

    value = 0

    def __init__(self) -> None:
        self.keys: set[str] = set()


class Admission(Enum):
    """What a full async queue does to a way in."""

    #: ``QueueFull`` before anything happened (publish_async, publish_many).
    REFUSE = "refuse"
    #: Admitted past ``buffer_size`` into a backlog: committed data is never dropped.
    OVERFLOW = "overflow"
    #: The caller waits for room (a stream reader: back-pressure on the bus).
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class Way:
    """How events enter the pipeline: the only thing that differs between the ways in."""

    #: Store and announce through ``store_and_publish_many`` before dispatch.
    store: bool
    #: An outbox wrote them in a transaction that committed: announce them now.
    announce: bool
    admission: Admission
    #: Counted in ``total_published`` and the published metric.
    counted: bool
    #: Starts a ``publish`` span per event (tracing.py); captured events got theirs at flush.
    traced: bool = False


PUBLISHED = Way(store=True, announce=False, admission=Admission.REFUSE, counted=True,
                traced=True)
CAPTURED = Way(store=True, announce=False, admission=Admission.OVERFLOW, counted=True)
WRITTEN = Way(store=False, announce=True, admission=Admission.OVERFLOW, counted=True)
RECEIVED = Way(store=False, announce=False, admission=Admission.WAIT, counted=False)


@dataclass(slots=True, eq=False)
class Subscription:
    """One ``subscribe`` call: a handler, what it matches, and (for groups) its consumer."""

    id: SubscriptionID
    pattern: str
    handler: Handler
    match: Callable[[str], bool]
    group: str | None = None
    lease: float = 30.0
    stream: BatchGroupStream | None = None
    thread: threading.Thread | None = None
    active: bool = True
    #: Events with the same non-empty key reach this subscription one at a time, in order.
    ordered: bool = False

    @property
    def handler_name(self) -> str:
        h = self.handler
        return getattr(h, "__qualname__", None) or getattr(h, "__name__", None) or repr(h)


class Job:
    """One event on its way through a set of handlers (one item per handler on retry)."""

    __slots__ = ("delivery", "elapsed", "event", "failures", "gate_key", "lock", "pending",
                 "retries", "slot", "started", "subs")
    failures: list[tuple[str, BaseException]]

    def __init__(self, event: Event, subs: Sequence[Subscription],
                 delivery: Delivery | None = None,
                 slot: threading.BoundedSemaphore | None = None) -> None:
        self.event = event
        self.subs = subs
        self.pending = len(subs)
        self.started = time.perf_counter()
        self.elapsed = 0.0
        self.delivery = delivery
        #: A group consumer's prefetch slot, released when the delivery is acknowledged.
        self.slot = slot
        #: ``(subscription_id, exception)`` of handlers that gave up; empty until one does.
        self.failures = _NO_FAILURES
        #: subscription_id -> (attempts so far, last exception), for handlers being retried.
        self.retries: dict[str, tuple[int, BaseException]] | None = None
        self.lock = _JOB_LOCK
        #: The key this job holds in the pipeline's gate while it runs (ordered subscriptions).
        self.gate_key = _gate_key(event, subs)

    def fail(self, subscription_id: str, exc: BaseException) -> None:
        if self.failures is _NO_FAILURES:
            self.failures = []
        self.failures.append((subscription_id, exc))


class Pipeline:
    """Runs events through storing, handlers and recording for one broker. Thread-safe.

    ``route(event_type)`` gives the local fan-out subscriptions of a type (the broker owns
    subscriptions); group deliveries come with their one subscription already chosen.
    """

    def __init__(self, *, provider: BusProvider, outbox: TransactionalProvider | None,
                 origin: str, sync: bool, worker_count: int, buffer_size: int,
                 retry_policy: RetryPolicy, metrics: BrokerMetrics, name: str,
                 route: Callable[[str], tuple[Subscription, ...]],
                 max_publish_depth: int, sender: object) -> None:
        self.provider = provider
        #: What signals name as their sender: the broker users connected to.
        self.sender = sender
        self.outbox = outbox
        self.origin = origin
        self.sync = sync
        self.worker_count = worker_count
        self.buffer_size = buffer_size
        self.retry_policy = retry_policy
        self.metrics = metrics
        self.name = name
        self.route = route
        self.max_publish_depth = max_publish_depth
        self.runner = AsyncRunner(f"{name}-asyncio")
        self.pool: WorkerPool | None = None
        self.closed = False
        self._statuses: StatusWriter | None = None
        self._depth = _Depth()
        self._lock = threading.Lock()
        self.dead: collections.OrderedDict[str, Event] = collections.OrderedDict()
        #: One job per key at a time for ordered subscriptions (see _ordering).
        self.gate: KeyGate[Job] = KeyGate()
        self.counter_lock = threading.Lock()
        #: Set by the bus: acknowledges a group delivery once its job is recorded.
        self.on_acknowledge: Callable[[Job], None] = _no_ack
        self.published = 0
        self.processed = 0
        self.failed = 0

    # -- the one path ------------------------------------------------------------------

    def run(self, events: Sequence[Event], way: Way, *, inline: bool,
            jobs: list[Job] | None = None) -> list[tuple[str, BaseException]]:
        """Take ``events`` the ``way`` they came, store them if needed and run their handlers.

        ``inline``: handlers run in this thread (sync mode, ``publish_sync``), and the
        outcome is recorded before returning; otherwise the jobs go to the worker pool.
        ``jobs``: prebuilt jobs (a group delivery) instead of routing ``events``.
        Returns the failures of inline runs (empty for the pool).

        Raises:
            QueueFull: ``Admission.REFUSE`` and the queue has no room; nothing happened.
            PublishDepthExceeded: handlers publishing from handlers nested too deep.
            ProviderError: storing failed; nothing was dispatched.
        """
        if jobs is None:
            route = self.route
            jobs = [Job(e, subs) for e in events if (subs := route(e.type))]
        if not inline:
            self._to_pool(events, way, jobs)
            return _NO_FAILURES
        depth = self._depth.value
        if jobs and depth >= self.max_publish_depth:
            raise PublishDepthExceeded(
                f"publish from a handler nested {depth} deep (max_publish_depth="
                f"{self.max_publish_depth}): a handler that publishes what it handles?"
            )
        self._store(events, way, len(events) - len(jobs))
        if not jobs:
            return _NO_FAILURES
        self._depth.value = depth + 1
        interrupt: BaseException | None = None
        try:
            for job in jobs:
                if interrupt is None:
                    if job.gate_key is not None:
                        self._wait_turn(job, job.gate_key)
                    self._run(job, job.subs, inline=True)
                    if job.failures:
                        interrupt = _interrupt_of(job)
                else:  # KeyboardInterrupt, SystemExit: end the batch, every event failed
                    for sub in job.subs:
                        job.fail(sub.id, interrupt)
        finally:
            self._depth.value = depth
        self.record(jobs, inline=True)
        if interrupt is not None:
            raise interrupt  # recorded first: no event is left pending
        return [f for job in jobs if job.failures for f in job.failures]

    def _to_pool(self, events: Sequence[Event], way: Way, jobs: list[Job]) -> None:
        """The pool's half of :meth:`run`: claim places, store, then queue the jobs."""
        pool = None
        admission = way.admission
        if jobs:
            pool = self.pool or self.ensure_pool()
            if admission is Admission.REFUSE:
                pool.try_reserve(len(jobs))
        try:
            self._store(events, way, len(events) - len(jobs))
        except BaseException:
            if pool is not None and admission is Admission.REFUSE:
                pool.release(len(jobs))
            raise
        if pool is None:
            return
        gate = self.gate
        if admission is Admission.REFUSE:
            for job in jobs:
                if job.gate_key is None or gate.enter(job.gate_key, job):
                    pool.put_reserved(job)
                # else: parked behind its key, keeping the place it reserved
        else:
            wait = admission is Admission.WAIT
            for job in jobs:
                if job.gate_key is None:
                    pool.put(job, block_while_full=wait)
                else:  # a parked job holds its queue place until its turn
                    pool.hold(block_while_full=wait)
                    if gate.enter(job.gate_key, job):
                        pool.put_reserved(job)

    def _store(self, events: Sequence[Event], way: Way, unhandled: int) -> None:
        """Store (or announce) ``events`` as ``way`` says, and count them.

        ``unhandled`` events matched no local handler: they are done already (counted as
        processed, as an event no handler matched is not an error).
        """
        if way.store:
            if way.traced and start_publish is not None:
                with start_publish(events):  # before storing: the stored event has its context
                    self.provider.store_and_publish_many(events, origin=self.origin)
            else:
                self.provider.store_and_publish_many(events, origin=self.origin)
        elif way.announce and self.outbox is not None:
            self.outbox.announce_committed(events)
        counted = way.counted
        if counted or unhandled:
            with self.counter_lock:
                if counted:
                    self.published += len(events)
                self.processed += unhandled
        if counted:
            published = self.metrics.published
            send = signals.event_published.receivers
            for e in events:
                published(e.source, e.type)
                if send:
                    self.send(signals.event_published, e)

    def run_item(self, item: Job | tuple[Job, Subscription]) -> Job | None:
        """A worker's unit: a job's handlers, or one handler's retry.

        Returns the concluded job once every handler succeeded or gave up (the worker hands
        a batch of them to :meth:`record`), else None.
        """
        if isinstance(item, tuple):
            job, only = item
            return self._run(job, (only,), inline=False)
        return self._run(item, item.subs, inline=False)

    def _run(self, job: Job, subs: Sequence[Subscription], *, inline: bool) -> Job | None:
        """Call ``subs`` for ``job``; inline, a failing handler is retried here, in this
        thread; on the pool, its retry goes back to the pool after the policy's delay."""
        event = job.event
        if subs is job.subs:  # a fresh job, not one handler's retry
            event.mark_processing()
        key = job.gate_key
        if key is not None:
            held = self._depth.keys
            held.add(key)
            try:
                return self._run_subs(job, subs, inline)
            finally:
                held.discard(key)
        return self._run_subs(job, subs, inline)

    def _run_subs(self, job: Job, subs: Sequence[Subscription], inline: bool) -> Job | None:
        event = job.event
        finished = 0
        stop: BaseException | None = None
        for sub in subs:
            if stop is not None:  # interrupted: the remaining handlers fail with it
                with job.lock:
                    job.fail(sub.id, stop)
                finished += 1
                continue
            while True:
                if job.retries and not sub.active and sub.group is None and sub.id in job.retries:
                    # Unsubscribed while its retry waited: its last failure is final.
                    with job.lock:
                        job.fail(sub.id, job.retries[sub.id][1])
                    finished += 1
                    break
                exc = self._call(sub, event)
                delay = None if exc is None else self._attempt(job, sub, exc)
                if delay is None:
                    finished += 1
                    if exc is not None and not isinstance(exc, Exception):
                        stop = exc
                    break
                if inline:
                    time.sleep(delay)
                    continue
                assert self.pool is not None
                self.pool.put_later(delay, (job, sub))
                break
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

    def _call(self, sub: Subscription, event: Event) -> BaseException | None:
        """A subscription's handler, with its own copy of the event."""
        return call_handler(sub.handler, event.clone(), sub.group, self.runner)

    def _attempt(self, job: Job, sub: Subscription, exc: BaseException) -> float | None:
        """The retry state machine: after a failed call, the delay before the next attempt,
        or None when this handler gave up (its failure is then on the job)."""
        policy = self.retry_policy
        with job.lock:
            if job.retries is None:
                job.retries = {}
            attempt = job.retries.get(sub.id, (0, exc))[0] + 1
            job.retries[sub.id] = (attempt, exc)
            retry = (attempt <= policy.max_retries
                     and (sub.active or sub.group is not None)
                     and isinstance(exc, Exception)  # not KeyboardInterrupt, SystemExit
                     and not isinstance(exc, PublishDepthExceeded))
            if retry:
                job.event.increment_retry()
            else:
                job.fail(sub.id, exc)
        self._log_failure(job.event, sub, exc, final=not retry)
        return policy.delay(attempt) if retry else None

    # -- recording ---------------------------------------------------------------------

    def _wait_turn(self, job: Job, key: str) -> None:
        """Inline (in the caller's thread): wait until ``key`` is this caller's.

        A handler that publishes an event of the key it is handling, inline, would wait for
        itself: that one event runs at once, nested, outside the gate.
        """
        if key in self._depth.keys:
            job.gate_key = None
        else:
            self.gate.wait_turn(key)

    def _conclude(self, job: Job) -> Job:
        """Give the event its final status; returns the job for :meth:`record`."""
        event = job.event
        job.elapsed = time.perf_counter() - job.started
        if job.gate_key is not None:  # the next job parked behind it may run
            nxt = self.gate.leave(job.gate_key)
            if nxt is not None:
                assert self.pool is not None  # a job parks only on its way into the pool
                self.pool.put_reserved(nxt)
        if job.failures:
            # From the job, not the broker: the subscription may have been removed meanwhile.
            by_id = {s.id: s for s in job.subs}
            event.mark_failed("; ".join(
                f"{sid} ({by_id[sid].handler_name if sid in by_id else '?'}): "
                f"{type(exc).__name__}: {exc}"
                for sid, exc in job.failures
            ))
        else:
            event.mark_completed()
        return job

    def record(self, jobs: list[Job], inline: bool = False) -> None:
        """Write back, count and announce concluded jobs; acknowledge group deliveries.

        Workers call this once per batch of jobs they finished, so the status write, the
        counters' lock and the lease bookkeeping are paid per batch, not per event. Jobs run
        in the caller's thread (``inline``) and providers in this process are written at
        once; the pool's outcomes to a remote backend are batched for a few milliseconds.
        The status is written before the counters move: whoever sees ``total_processed``
        grow can read the outcome from the provider when it was written at once.
        """
        updates = []
        failed: list[Job] = []
        for j in jobs:
            e = j.event
            updates.append(StatusUpdate(e.id, e.status, e.error, e.retry_count))
            if e.status is _FAILED:
                failed.append(j)
        if inline or self.provider.in_process:
            self.write_statuses(updates)
        else:
            writer = self._status_writer()
            for update in updates:
                writer.add(update)
        with self.counter_lock:
            self.processed += len(jobs)
            self.failed += len(failed)
        processed = self.metrics.processed
        for j in jobs:
            e = j.event
            processed(e.source, e.type, e.status, j.elapsed)
        if failed:
            with self._lock:
                for j in failed:
                    self.dead[j.event.id] = j.event.clone()
                while len(self.dead) > MAX_DEAD_LETTERS:
                    self.dead.popitem(last=False)
        if signals.event_processed.receivers or signals.event_failed.receivers:
            for j in jobs:
                signal = signals.event_failed if j.event.status is _FAILED \
                    else signals.event_processed
                if signal.receivers:
                    self.send(signal, j.event)
        for j in jobs:
            if j.delivery is not None:
                self.on_acknowledge(j)

    def write_statuses(self, updates: list[StatusUpdate]) -> None:
        try:
            self.provider.update_status_many(updates)
        except Exception as exc:
            log.warning("eventbroker: could not record the status of %d events: %s",
                        len(updates), exc)
            self.metrics.error("provider")

    def _status_writer(self) -> StatusWriter:
        writer = self._statuses
        if writer is None:
            with self._lock:
                if self._statuses is None:
                    self._statuses = StatusWriter(self.write_statuses, name=f"{self.name}-status")
                writer = self._statuses
        return writer

    def flush_statuses(self) -> None:
        if self._statuses is not None:
            self._statuses.flush()

    def _log_failure(self, event: Event, sub: Subscription, exc: BaseException,
                     final: bool) -> None:
        log.log(
            logging.ERROR if final else logging.WARNING,
            "eventbroker: handler %s for %s failed%s: %s",
            sub.handler_name, event.type, " (giving up)" if final else ", will retry", exc,
            extra={"event_id": event.id, "subscription_id": sub.id},
            exc_info=exc if final else None,
        )

    def send(self, signal: Any, event: Event) -> None:
        try:
            signal.send(self.sender, event=event)
        except Exception:
            log.exception("eventbroker: a signal receiver raised")

    # -- the pool ----------------------------------------------------------------------

    def ensure_pool(self) -> WorkerPool:
        with self._lock:
            if self.pool is None:
                if self.closed:
                    raise BrokerStopped("broker was stopped; events are no longer accepted")
                self.pool = WorkerPool(self.worker_count, self.buffer_size, self.run_item,
                                       self.record, name=self.name)
                self.pool.start()
                self.metrics.watch_queue(self.pool)
            return self.pool

    def close(self, deadline: float) -> None:
        """Finish what was accepted (until ``deadline``, a ``time.monotonic()``), then stop."""
        pool = self.pool
        if pool is not None:
            if not pool.drain(max(0.0, deadline - time.monotonic())):
                log.warning("eventbroker: stop() timed out with %d events unfinished",
                            pool.outstanding)
            pool.stop(timeout=max(0.1, deadline - time.monotonic()))
        if self._statuses is not None:
            self._statuses.close()
        self.runner.close()


def _gate_key(event: Event, subs: Sequence[Subscription]) -> str | None:
    """The gate key of a job: its event's key when an ordered subscription is among ``subs``.

    A group's deliveries are ordered among themselves, apart from fan-out jobs of the same
    key, so the group name is part of the key.
    """
    key = event.key
    if not key:
        return None
    for sub in subs:
        if sub.ordered:
            return key if sub.group is None else f"{sub.group}\x00{key}"
    return None


def call_handler(handler: Handler, event: Event, group: str | None,
                 runner: AsyncRunner) -> BaseException | None:
    """The one place a handler is called (subscriptions and replay): awaited on ``runner``
    when it is ``async``, in a ``process`` span when tracing is configured (tracing.py).
    Returns what it raised (KeyboardInterrupt too: the event must still end), else None."""
    span = None if start_process is None else start_process(event, group)
    try:
        result = handler(event)
        if result is not None and inspect.isawaitable(result):
            runner.run(result)
        failure = None
    except BaseException as exc:
        failure = exc
    if span is not None:
        span.end(failure)
    return failure


def _interrupt_of(job: Job) -> BaseException | None:
    """A handler's KeyboardInterrupt/SystemExit (a ``BaseException`` that is no ``Exception``)."""
    for _, exc in job.failures:
        if not isinstance(exc, Exception):
            return exc
    return None


def _no_ack(job: Job) -> None:
    raise AssertionError("a group delivery was recorded by a pipeline without a bus")


def raise_failures(event_or_count: Event | int,
                   failures: list[tuple[str, BaseException]]) -> None:
    """What ``publish_sync``/``publish_many`` raise after their handlers ran inline."""
    if not failures:
        return
    for _, exc in failures:
        if isinstance(exc, PublishDepthExceeded):
            raise exc  # travels up unchanged, so no level of the chain retries it
    if isinstance(event_or_count, Event):
        raise HandlerError(event_or_count.error, event_id=event_or_count.id,
                           failures=failures) from None
    raise HandlerError(f"{len(failures)} handler(s) failed", failures=failures)
