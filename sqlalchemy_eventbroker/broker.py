"""The broker: subscriptions, publishing, dead letters and replay (the public API).

How an event travels: every way in (``publish*``, captured transactions, the bus) goes
through the one pipeline of ``_pipeline.py``: accept → store (unless already stored) →
route → run handlers → record. ``_bus.py`` reads what other brokers published (one fan-out
stream per broker, one group stream per group subscription) and feeds the same pipeline.
This module holds the policy users see: validation, modes, subscriptions, and errors.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Self

from prometheus_client import CollectorRegistry

from ._bus import Bus
from ._pipeline import (
    CAPTURED,
    PUBLISHED,
    WRITTEN,
    Pipeline,
    Subscription,
    call_handler,
    raise_failures,
)
from ._types import Handler, SubscriptionID
from .errors import BrokerStopped, ConfigError, HandlerError, SubscriptionNotFound
from .event import FIELD_LIMITS, Event, EventStatus
from .metrics import BrokerMetrics
from .pattern import compile_pattern
from .providers.base import EventFilter, Provider, TransactionalProvider, bus_provider
from .retry import RetryPolicy

__all__ = ["Broker", "BrokerStats", "ProcessingMode"]

log = logging.getLogger(__name__)

#: Default for ``Broker(max_publish_depth=...)``: how deep sync handlers may publish from
#: handlers before :class:`~sqlalchemy_eventbroker.errors.PublishDepthExceeded`.
MAX_PUBLISH_DEPTH = 16
#: Upper bounds of ``worker_count`` (threads) and ``buffer_size`` (queue places); the
#: configuration file applies the same ones.
MAX_WORKER_COUNT = 1024
MAX_BUFFER_SIZE = 10_000_000
#: Event types whose routes a broker caches (beyond it, routes are computed per publish).
_MAX_ROUTES = 10_000


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


class Broker:
    """Publishes events and runs the handlers subscribed to them.

    Thread-safe: subscribe, unsubscribe and publish from any thread. See the module docstring
    for the path an event takes, and API.md for the contract.

    Args:
        provider: where events are stored and how they reach other brokers; a private
            ``MemoryProvider`` by default. A provider implementing only API.md section 4 is
            adapted (batches become loops; its own events are skipped by id).
        mode: ``"async"`` (default) or ``"sync"``; decides what ``publish`` does.
        worker_count: threads running handlers in async mode.
        buffer_size: events the async queue holds before ``publish_async`` raises ``QueueFull``.
            Captured transactions are never refused: past this size their events wait in a
            backlog (they are committed data, already in memory).
        retry_policy: retries of a failing handler.
        instance_id: names this broker on events it publishes; the host name by default.
        registry: Prometheus registry for this broker's metrics (the global one by default).
        close_provider: close the provider in ``stop()``; by default only a provider the broker
            made itself is closed.
        max_publish_depth: how deep handlers run in the caller's thread may publish from
            handlers (sync mode); deeper raises ``PublishDepthExceeded``, never retried.
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
        max_publish_depth: int = MAX_PUBLISH_DEPTH,
    ) -> None:
        try:
            self.mode = ProcessingMode(mode)
        except ValueError:
            raise ConfigError(
                f"mode: expected 'sync' or 'async', got {mode!r}", path="mode"
            ) from None
        for name, value, most in (("worker_count", worker_count, MAX_WORKER_COUNT),
                                  ("buffer_size", buffer_size, MAX_BUFFER_SIZE),
                                  ("max_publish_depth", max_publish_depth, 1_000)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ConfigError(f"{name}: expected int from 1 to {most:,}, got {value!r}",
                                  path=name)
        if instance_id is not None and len(instance_id) > FIELD_LIMITS["instance_id"]:
            raise ConfigError(f"instance_id: expected at most {FIELD_LIMITS['instance_id']} "
                              f"characters, got {len(instance_id)}", path="instance_id")
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
        #: Tags this broker's events on a shared backend, so its own streams skip them.
        self.origin = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._subs: dict[SubscriptionID, Subscription] = {}
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self._sub_ids = itertools.count(1)
        self._running = False
        self._stopped = False
        name = f"eventbroker-{self.instance_id}"
        self._pipeline = Pipeline(
            provider=bus_provider(provider),
            outbox=provider if isinstance(provider, TransactionalProvider) else None,
            origin=self.origin, sync=self.mode is ProcessingMode.SYNC,
            worker_count=worker_count, buffer_size=buffer_size,
            retry_policy=self.retry_policy, metrics=self.metrics, name=name,
            route=self._fanout_for, max_publish_depth=max_publish_depth, sender=self,
        )
        self._bus = Bus(self._pipeline.provider, self._pipeline, name)

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
                self._pipeline.ensure_pool()
            self._running = True
            self.metrics.watch_store(self.provider)  # store gauges, computed at scrape time
            self._bus.start()
            subs = list(self._subs.values())
        if any(s.group is None for s in subs):
            self._bus.ensure_receiver()
        for sub in subs:
            if sub.group is not None:
                self._bus.start_group_consumer(sub)
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
            pipeline = self._pipeline
            pipeline.closed = True
            if pipeline.pool is not None:
                # A publish_async racing this stop either gets its place before this (and is
                # drained below) or is refused with BrokerStopped: never accepted and dropped.
                pipeline.pool.close_admission()
        self.metrics.unwatch_store(self.provider)
        self._bus.stop_reading(subs, deadline)
        pipeline.close(deadline)
        self._bus.close(subs)
        if self._close_provider:
            try:
                self.provider.close()
            except Exception as exc:
                log.debug("eventbroker: close failed: %s", exc)

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
        ordered: bool = False,
    ) -> SubscriptionID:
        """Call ``handler`` with a copy of every event whose type matches ``pattern``.

        The pattern is compiled now, so a bad one fails here and never at publish time.
        Without ``group`` the subscription is fan-out: it sees every matching event published
        by this broker, and by every broker sharing the provider, while it is subscribed.
        With ``group``, subscriptions sharing the name (and pattern) anywhere on the bus
        compete: each event reaches one of them, at least once; ``lease`` is how long a
        member may hold an event before it is redelivered (renewed while the handler runs).
        With ``ordered``, events with the same non-empty ``key`` reach this subscription one
        at a time, in publish order, whatever the worker count (API.md section 3); other
        keys keep flowing while one waits.

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
        sub = Subscription(
            id=f"sub-{next(self._sub_ids)}-{uuid.uuid4().hex[:8]}",
            pattern=pattern, handler=handler, match=match, group=group, lease=float(lease),
            ordered=bool(ordered),
        )
        with self._lock:
            subs = dict(self._subs)
            subs[sub.id] = sub
            self._subs = subs
            self._routes = {}
            running = self._running
        if running:
            if group is None:
                self._bus.ensure_receiver()
            else:
                self._bus.start_group_consumer(sub)
        return sub.id

    def on(self, pattern: str, *, group: str | None = None, lease: float = 30.0,
           ordered: bool = False) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`subscribe`; returns the function unchanged."""

        def register(fn: Handler) -> Handler:
            self.subscribe(pattern, fn, group=group, lease=lease, ordered=ordered)
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
        self._bus.stop_group_consumer(sub)

    def _fanout_for(self, event_type: str) -> tuple[Subscription, ...]:
        routes = self._routes
        found = routes.get(event_type)
        if found is None:
            found = tuple(
                s for s in self._subs.values() if s.group is None and s.match(event_type)
            )
            if len(routes) < _MAX_ROUTES:
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

        Retries wait in this thread, and the outcome is stored before this returns. Group
        subscriptions are served by their consumers, not here (another member on the bus may
        be the one to take the event).

        Raises:
            BrokerStopped: not started, or stopped.
            EventValidationError: the event is invalid (nothing was stored).
            PayloadError: the payload holds U+0000 (nothing was stored).
            HandlerError: handlers still failed after their retries; ``.failures`` lists them.
            PublishDepthExceeded: called from handlers nested ``max_publish_depth`` deep.
        """
        self._accept(event)
        raise_failures(event, self._pipeline.run((event,), PUBLISHED, inline=True))

    def publish_async(self, event: Event) -> None:
        """Store and publish ``event`` and queue it for the workers; returns at once.

        Raises:
            BrokerStopped: not started, or stopped.
            EventValidationError: the event is invalid (nothing was stored).
            QueueFull: the queue holds ``buffer_size`` events; nothing was stored or counted.
        """
        self._accept(event)
        self._pipeline.run((event,), PUBLISHED, inline=False)

    def publish_many(self, events: Sequence[Event]) -> None:
        """Publish several events by mode, storing and announcing them in one batch.

        In async mode the queue places for all of them are claimed first: ``QueueFull`` means
        none was published. In sync mode every handler runs, then ``HandlerError`` lists the
        failures of all of them.
        """
        events = list(events)
        for event in events:
            self._accept(event)
        inline = self.mode is ProcessingMode.SYNC
        raise_failures(len(events), self._pipeline.run(events, PUBLISHED, inline=inline))

    def publish_captured(self, events: Sequence[Event], *, written: bool) -> None:
        """Publish the events of a committed transaction (ORM capture). Never raises.

        ``written``: an outbox wrote them in that transaction, so they are announced and
        dispatched, not stored again. Captured events are never refused for a full queue:
        they wait in a backlog past ``buffer_size``. Failures are logged and counted.
        """
        if not events:
            return
        try:
            if not self._running:
                raise BrokerStopped("broker not running; captured events were not published")
            for event in events:
                if not event.instance_id:
                    event.instance_id = self.instance_id
            self._pipeline.run(events, WRITTEN if written else CAPTURED,
                               inline=self.mode is ProcessingMode.SYNC)
        except Exception as exc:
            self.count_capture_error(exc)

    def _accept(self, event: Event) -> None:
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

    def flush_statuses(self) -> None:
        """Write outcomes that are still batched to the provider now (async mode batches them)."""
        self._pipeline.flush_statuses()

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
            return [e.clone() for e in self._pipeline.dead.values()]

    def redrive(self, event_id: str) -> Event:
        """Publish a dead letter again: same id, status ``pending``, no error, no retries.

        The stored copy is replaced, so other brokers see it as a new event too.

        Raises:
            SubscriptionNotFound: (a ``LookupError``) no dead letter or failed stored event
                has this id.
        """
        self.flush_statuses()  # a batched 'failed' must not land on the redriven copy
        with self._lock:
            event = self._pipeline.dead.pop(event_id, None)
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
                self._pipeline.dead[event_id] = failed
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
        Each call runs in a ``process`` span when tracing is configured, as a handler's does.
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
        count = 0
        runner = self._pipeline.runner
        for event in self._pipeline.provider.iter_events(flt):
            failure = call_handler(handler, event, None, runner)
            if failure is not None:
                raise failure
            count += 1
        return count

    def stats(self) -> BrokerStats:
        """Counters and the provider's own stats."""
        try:
            provider_stats = self.provider.stats()
        except Exception as exc:
            provider_stats = None
            log.warning("eventbroker: provider stats failed: %s", exc)
        p = self._pipeline
        pool = p.pool
        with p.counter_lock:
            return BrokerStats(
                instance_id=self.instance_id,
                mode=self.mode,
                is_running=self._running,
                total_published=p.published,
                total_processed=p.processed,
                total_failed=p.failed,
                active_subscribers=len(self._subs),
                queue_size=pool.queue_size() if pool is not None else 0,
                active_workers=pool.active if pool is not None else 0,
                provider_stats=provider_stats,
            )


class _DeadLetterNotFound(SubscriptionNotFound):
    """No dead letter has this id."""

    code = "dead_letter_not_found"


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception as exc:
        log.debug("eventbroker: close failed: %s", exc)


def _replace(flt: EventFilter, **changes: Any) -> EventFilter:
    return dataclasses.replace(flt, **changes)
