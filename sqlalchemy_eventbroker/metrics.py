"""Prometheus collectors for brokers, on a registry the caller chooses.

Collectors are created once per registry and shared by every broker using it; labelled
children are cached per ``(source, type)`` because ``Counter.labels()`` costs as much as a
whole in-process dispatch (BASELINES.md), while a bound child's ``inc()`` is cheap.

Label values stay bounded (API.md section 8): a broker labels at most :data:`MAX_TYPES`
distinct event types; every later type is counted under ``type="other"``, and a warning is
logged once per broker. The bound applies to the children this broker creates, so the
``/metrics`` body and the caches here stay small whatever types the application invents.
"""

from __future__ import annotations

import logging
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["MAX_TYPES", "OTHER_TYPE", "BrokerMetrics", "start_metrics_server"]

log = logging.getLogger(__name__)

#: Most distinct event types one broker labels in its metrics.
MAX_TYPES = 1000
#: The ``type`` label of every event type past the first :data:`MAX_TYPES`.
OTHER_TYPE = "other"

_lock = threading.Lock()
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _Collectors] = weakref.WeakKeyDictionary()


class _Collectors:
    """The metric families on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "eventbroker_events_published_total", "Events accepted by publish.",
            ["source", "type"], registry=registry,
        )
        self.processed = Counter(
            "eventbroker_events_processed_total",
            "Events whose handlers finished, by final status.",
            ["source", "type", "status"], registry=registry,
        )
        self.duration = Histogram(
            "eventbroker_event_processing_duration_seconds",
            "Time from dispatch until every handler of an event finished, retries included.",
            ["source", "type"], registry=registry,
        )
        self.queue_size = Gauge(
            "eventbroker_queue_size", "Events waiting in async brokers' queues.",
            registry=registry,
        )
        self.errors = Counter(
            "eventbroker_errors_total",
            "Failures kept away from the application: capture, provider and dispatch errors.",
            ["kind"], registry=registry,
        )
        self.queue_sources: weakref.WeakSet[Any] = weakref.WeakSet()
        self.queue_size.set_function(self._queue_total)

    def _queue_total(self) -> float:
        return float(sum(src.queue_size() for src in list(self.queue_sources)))


def _collectors_for(registry: CollectorRegistry) -> _Collectors:
    with _lock:
        found = _collectors.get(registry)
        if found is None:
            found = _collectors[registry] = _Collectors(registry)
        return found


class BrokerMetrics:
    """One broker's view of the collectors, with bound children cached."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self._c = _collectors_for(self.registry)
        self._published: dict[tuple[str, str], Any] = {}
        self._processed: dict[tuple[str, str, str], Any] = {}
        self._duration: dict[tuple[str, str], Any] = {}
        self._errors: dict[str, Any] = {}
        #: The types labelled so far, at most MAX_TYPES; the rest count as OTHER_TYPE.
        self._types: set[str] = set()
        self._types_lock = threading.Lock()
        self._warned = False

    def _label(self, type_: str) -> str:
        # Only on a cache miss: a type already cached never comes here.
        with self._types_lock:
            if type_ in self._types:
                return type_
            if len(self._types) < MAX_TYPES:
                self._types.add(type_)
                return type_
            if not self._warned:
                self._warned = True
                log.warning(
                    "eventbroker metrics: more than %d distinct event types; later types are "
                    "counted under type=%r", MAX_TYPES, OTHER_TYPE)
        return OTHER_TYPE

    def watch_queue(self, source: Any) -> None:
        """Report ``source.queue_size()`` in ``eventbroker_queue_size`` (read at scrape time)."""
        self._c.queue_sources.add(source)

    def published(self, source: str, type_: str) -> None:
        key = (source, type_)
        inc = self._published.get(key)
        if inc is None:
            # Keyed by the label, so the cache is as bounded as the series.
            key = (source, self._label(type_))
            inc = self._published.get(key)
            if inc is None:
                inc = self._published[key] = _fast_inc(self._c.published.labels(*key))
        inc(1)

    def processed(self, source: str, type_: str, status: str, seconds: float) -> None:
        key = (source, type_, status)
        inc = self._processed.get(key)
        if inc is None:
            key = (source, self._label(type_), status)
            inc = self._processed.get(key)
            if inc is None:
                inc = self._processed[key] = _fast_inc(self._c.processed.labels(*key))
        inc(1)
        dkey = (source, type_)
        observe = self._duration.get(dkey)
        if observe is None:
            dkey = (source, self._label(type_))
            observe = self._duration.get(dkey)
            if observe is None:
                observe = self._duration[dkey] = _fast_observe(self._c.duration.labels(*dkey))
        observe(seconds)

    def error(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._c.errors.labels(kind)
        child.inc()


def _fast_inc(child: Any) -> Callable[[float], None]:
    """The bound child's value increment, skipping per-call checks that cannot fail here.

    ``Counter.inc`` validates its argument and observability on every call; the value's own
    ``inc`` is the same update under the same lock. Falls back to the public method if a
    future prometheus_client changes its internals.
    """
    value = getattr(child, "_value", None)
    inc = getattr(value, "inc", None)
    return inc if callable(inc) else child.inc  # type: ignore[no-any-return]


def _fast_observe(child: Any) -> Callable[[float], None]:
    """``Histogram.observe`` without exemplar handling, with a binary search for the bucket."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None:
        return child.observe  # type: ignore[no-any-return]
    bucket_incs = [b.inc for b in buckets]
    sum_inc = total.inc
    bounds = list(bounds)

    def observe(amount: float) -> None:
        sum_inc(amount)
        bucket_incs[bisect_left(bounds, amount)](1)

    return observe


def start_metrics_server(
    port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> Callable[[], None]:
    """Serve ``/metrics`` over HTTP on ``addr:port`` from a daemon thread.

    Returns a function that stops the server. Binds to loopback unless told otherwise:
    metrics name event types, which may be internal.
    """
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=addr, registry=registry or REGISTRY)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
