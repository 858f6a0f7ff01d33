"""Prometheus collectors for brokers, on a registry the caller chooses.

Collectors are created once per registry and shared by every broker using it; labelled
children are cached per ``(source, type)`` because ``Counter.labels()`` costs as much as a
whole in-process dispatch (BASELINES.md), while a bound child's ``inc()`` is cheap.

Label values stay bounded (API.md section 8): a broker labels at most :data:`MAX_TYPES`
distinct event types; every later type is counted under ``type="other"``, and a warning is
logged once per broker. The bound applies to the children this broker creates, so the
``/metrics`` body and the caches here stay small whatever types the application invents.

The store gauges (``eventbroker_store_*``, ``eventbroker_group_*``) are computed at scrape time
by :class:`StoreCollector`, one per registry, from the stores of the running brokers on it:
the same figures as ``eventbroker stats``, from the same code (``providers.ops``). They are
bounded too: the :data:`STORE_TOP_TYPES` most frequent types by name (the rest summed under
``type="other"``) and the :data:`STORE_MAX_GROUPS` groups with the most pending events.
"""

from __future__ import annotations

import logging
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .providers.base import Provider

__all__ = ["MAX_TYPES", "OTHER_TYPE", "BrokerMetrics", "StoreCollector", "start_metrics_server"]

log = logging.getLogger(__name__)

#: Most distinct event types one broker labels in its metrics.
MAX_TYPES = 1000
#: The ``type`` label of every event type past the first :data:`MAX_TYPES`.
OTHER_TYPE = "other"
#: Event types the store gauges name (the most frequent); the rest are summed as "other".
STORE_TOP_TYPES = 20
#: Consumer groups the group gauges report (those with the most pending events).
STORE_MAX_GROUPS = 100

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
        self.store = StoreCollector()
        registry.register(self.store)

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

    def watch_store(self, provider: Provider) -> None:
        """Report ``provider``'s store in the scrape-time store gauges (a running broker)."""
        self._c.store.watch(provider)

    def unwatch_store(self, provider: Provider) -> None:
        """Stop reporting ``provider``'s store (its broker stopped)."""
        self._c.store.unwatch(provider)

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


class StoreCollector(Collector):
    """Gauges of the watched stores, computed when Prometheus scrapes (``providers.ops``).

    Every sample carries ``store`` (the provider's ``repr``: backend address without secrets
    and table or stream), so two brokers on two stores stay apart and two brokers on one
    store report it once. A store that fails to answer reports ``eventbroker_store_up 0``
    (and a warning once until it answers again) instead of failing the whole scrape.
    A database answers with a few aggregate statements per scrape (see ``database/_ops.py``);
    other backends with their ``stats()`` alone (no per-type counts, no groups).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[int, tuple[weakref.ref[Provider], str]] = {}
        self._failing: set[str] = set()

    def watch(self, provider: Provider) -> None:
        try:
            ref = weakref.ref(provider)
        except TypeError:  # a provider class with __slots__ and no __weakref__: not reported
            return
        with self._lock:
            self._stores[id(provider)] = (ref, repr(provider))

    def unwatch(self, provider: Provider) -> None:
        with self._lock:
            self._stores.pop(id(provider), None)

    def _live(self) -> list[tuple[Provider, str]]:
        with self._lock:
            out, seen = [], set()
            for key, (ref, name) in list(self._stores.items()):
                provider = ref()
                if provider is None:
                    del self._stores[key]
                elif name not in seen:
                    seen.add(name)
                    out.append((provider, name))
            return out

    def describe(self) -> list[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("eventbroker_store_up", "1 if the store answered this scrape.",
                                labels=["store"])
        yield GaugeMetricFamily("eventbroker_store_events", "Stored events by status.",
                                labels=["store", "status"])
        yield GaugeMetricFamily(
            "eventbroker_store_events_by_type",
            f"Stored events of the {STORE_TOP_TYPES} most frequent types; the rest as "
            f"type=\"{OTHER_TYPE}\".", labels=["store", "type"])
        yield GaugeMetricFamily("eventbroker_store_oldest_pending_age_seconds",
                                "Age of the oldest pending event (0: none pending).",
                                labels=["store"])
        yield GaugeMetricFamily("eventbroker_store_notify_queue_usage_ratio",
                                "PostgreSQL pg_notification_queue_usage().", labels=["store"])
        for name, text in (("pending", "Events the group owes that nobody holds."),
                           ("in_flight", "Events leased to a member now."),
                           ("oldest_unclaimed_age_seconds",
                            "Age of the group's oldest pending event (0: none)."),
                           ("members", "Members holding or recently holding a lease.")):
            yield GaugeMetricFamily(f"eventbroker_group_{name}", text,
                                    labels=["store", "group", "pattern"])

    def collect(self) -> Iterator[Metric]:
        from .providers.ops import store_stats

        fam = {f.name: f for f in self._families()}
        for provider, name in self._live():
            try:
                s = store_stats(provider, top_types=STORE_TOP_TYPES, scan=False)
            except Exception as exc:
                fam["eventbroker_store_up"].add_metric([name], 0.0)
                if name not in self._failing:
                    self._failing.add(name)
                    log.warning("eventbroker metrics: store %s did not answer: %s", name, exc)
                continue
            self._failing.discard(name)
            fam["eventbroker_store_up"].add_metric([name], 1.0)
            for status, n in s.by_status.items():
                fam["eventbroker_store_events"].add_metric([name, status], float(n))
            for type_, n in s.by_type.items():
                fam["eventbroker_store_events_by_type"].add_metric([name, type_], float(n))
            fam["eventbroker_store_oldest_pending_age_seconds"].add_metric(
                [name], s.oldest_pending_age_s or 0.0)
            if s.notify_queue_usage is not None:
                fam["eventbroker_store_notify_queue_usage_ratio"].add_metric(
                    [name], s.notify_queue_usage)
            groups = sorted(s.groups, key=lambda g: -g.pending)[:STORE_MAX_GROUPS]
            for g in groups:
                labels = [name, g.group, g.pattern]
                fam["eventbroker_group_pending"].add_metric(labels, float(g.pending))
                fam["eventbroker_group_in_flight"].add_metric(labels, float(g.in_flight))
                fam["eventbroker_group_oldest_unclaimed_age_seconds"].add_metric(
                    labels, g.oldest_unclaimed_age_s or 0.0)
                fam["eventbroker_group_members"].add_metric(labels, float(g.members))
        yield from fam.values()


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
