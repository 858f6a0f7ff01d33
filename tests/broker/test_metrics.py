"""Prometheus metrics of API.md 8, on a fresh registry per test, and the HTTP endpoint."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from sqlalchemy_eventbroker import (
    Broker,
    Event,
    EventSource,
    HandlerError,
    RetryPolicy,
    new_event,
    start_metrics_server,
)

from .conftest import Waiter

MakeBroker = Callable[..., Broker]

PUBLISHED = "eventbroker_events_published_total"
PROCESSED = "eventbroker_events_processed_total"
DURATION = "eventbroker_event_processing_duration_seconds"
QUEUE = "eventbroker_queue_size"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics__names_and_labels(make_broker: MakeBroker, registry: CollectorRegistry) -> None:
    """The registry holds the four metrics of API.md 8 with exactly their label names."""
    broker = make_broker(mode="sync", registry=registry)
    broker.subscribe("*", lambda e: None)
    broker.publish(new_event(EventSource.DATABASE, "public.users.create"))
    labels: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    assert labels[PUBLISHED] == {"source", "type"}
    assert labels[PROCESSED] == {"source", "type", "status"}
    assert labels[f"{DURATION}_count"] == {"source", "type"}
    assert labels[f"{DURATION}_bucket"] == {"source", "type", "le"}
    assert labels[QUEUE] == set()
    types = {f.name: f.type for f in registry.collect()}
    assert types[DURATION] == "histogram" and types[QUEUE] == "gauge"


def test_metrics__counts_by_source_type_and_status(
    mode: str, make_broker: MakeBroker, registry: CollectorRegistry
) -> None:
    """Published, processed (by final status) and duration counts match what happened."""
    broker = make_broker(mode=mode, registry=registry, retry_policy=RetryPolicy(1, 0.01, 0.01))
    pause = threading.Event()
    broker.subscribe("public.users.*", lambda e: pause.wait(0.02))

    def fail(e: Event) -> None:
        raise RuntimeError("no")

    broker.subscribe("public.orders.*", fail)
    for _ in range(3):
        broker.publish(new_event(EventSource.DATABASE, "public.users.create"))
    for _ in range(2):
        try:
            broker.publish(new_event(EventSource.FRONTEND, "public.orders.delete"))
        except HandlerError:
            assert mode == "sync"
    broker.stop()

    users = {"source": "database", "type": "public.users.create"}
    orders = {"source": "frontend", "type": "public.orders.delete"}
    assert _value(registry, PUBLISHED, **users) == 3
    assert _value(registry, PUBLISHED, **orders) == 2
    assert _value(registry, PROCESSED, **users, status="completed") == 3
    assert _value(registry, PROCESSED, **users, status="failed") == 0
    assert _value(registry, PROCESSED, **orders, status="failed") == 2
    assert _value(registry, PROCESSED, **orders, status="completed") == 0
    assert _value(registry, f"{DURATION}_count", **users) == 3
    assert _value(registry, f"{DURATION}_count", **orders) == 2
    assert _value(registry, f"{DURATION}_sum", **users) >= 3 * 0.02 - 0.005
    assert _value(registry, f"{DURATION}_sum", **orders) >= 2 * 0.01 - 0.002  # one retry delay


def test_metrics__queue_size_gauge(
    make_broker: MakeBroker, registry: CollectorRegistry, wait_for: Waiter
) -> None:
    """eventbroker_queue_size reports events waiting in the async queue."""
    broker = make_broker(mode="async", registry=registry, worker_count=1, buffer_size=10)
    release, entered = threading.Event(), threading.Event()

    def blocker(e: Event) -> None:
        entered.set()
        release.wait(10)

    broker.subscribe("*", blocker)
    try:
        broker.publish(new_event(EventSource.SYSTEM, "q.one"))
        assert entered.wait(5)
        for _ in range(4):
            broker.publish(new_event(EventSource.SYSTEM, "q.one"))
        assert _value(registry, QUEUE) == 4
    finally:
        release.set()
    wait_for(lambda: broker.stats().total_processed == 5)
    assert _value(registry, QUEUE) == 0


def test_metrics__refused_event_is_not_counted(
    make_broker: MakeBroker, registry: CollectorRegistry
) -> None:
    """A QueueFull or invalid event adds nothing to the published counter."""
    from sqlalchemy_eventbroker import EventValidationError, QueueFull

    broker = make_broker(mode="async", registry=registry, worker_count=1, buffer_size=1)
    release, entered = threading.Event(), threading.Event()
    broker.subscribe("*", lambda e: (entered.set(), release.wait(10)))
    try:
        broker.publish(new_event(EventSource.SYSTEM, "r.x"))
        assert entered.wait(5)
        broker.publish(new_event(EventSource.SYSTEM, "r.x"))
        with pytest.raises(QueueFull):
            broker.publish(new_event(EventSource.SYSTEM, "r.x"))
        bad = new_event(EventSource.SYSTEM, "r.x")
        bad.id = ""
        with pytest.raises(EventValidationError):
            broker.publish(bad)
        assert _value(registry, PUBLISHED, source="system", type="r.x") == 2
    finally:
        release.set()


def test_metrics__registries_are_separate(make_broker: MakeBroker) -> None:
    """Two brokers on two registries count only their own events."""
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    b1 = make_broker(mode="sync", registry=r1)
    b2 = make_broker(mode="sync", registry=r2)
    b1.publish(new_event(EventSource.SYSTEM, "s.t"))
    b1.publish(new_event(EventSource.SYSTEM, "s.t"))
    b2.publish(new_event(EventSource.SYSTEM, "s.t"))
    assert _value(r1, PUBLISHED, source="system", type="s.t") == 2
    assert _value(r2, PUBLISHED, source="system", type="s.t") == 1


def test_metrics__brokers_sharing_a_registry_add_up(make_broker: MakeBroker,
                                                    registry: CollectorRegistry) -> None:
    """Two brokers given the same registry share its collectors (no duplicate registration)."""
    b1 = make_broker(mode="sync", registry=registry)
    b2 = make_broker(mode="sync", registry=registry)
    b1.publish(new_event(EventSource.SYSTEM, "s.t"))
    b2.publish(new_event(EventSource.SYSTEM, "s.t"))
    assert _value(registry, PUBLISHED, source="system", type="s.t") == 2


def test_start_metrics_server__serves_metrics_over_http(
    make_broker: MakeBroker, registry: CollectorRegistry
) -> None:
    """start_metrics_server(port, registry=...) serves the broker's metrics on loopback."""
    broker = make_broker(mode="sync", registry=registry)
    broker.subscribe("*", lambda e: None)
    broker.publish(new_event(EventSource.DATABASE, "public.users.create"))
    port = _free_port()
    stop = start_metrics_server(port, registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    finally:
        stop()
    from prometheus_client.parser import text_string_to_metric_families

    served = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    users = (("source", "database"), ("type", "public.users.create"))
    completed = (("source", "database"), ("status", "completed"), ("type", "public.users.create"))
    assert served[(PUBLISHED, users)] == 1
    assert served[(PROCESSED, completed)] == 1
    assert served[(f"{DURATION}_count", users)] == 1
    assert served[(QUEUE, ())] == 0


def test_packaging__prometheus_client_floor_returns_server_and_thread() -> None:
    """The declared prometheus-client floor is 0.20, the first release whose start_http_server
    returns ``(server, thread)``, which start_metrics_server needs to stop it (issue 11, row 11;
    with 0.17 to 0.19 it returned None, a TypeError left the server running)."""
    import re
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads(
        (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    (spec,) = [d for d in pyproject["project"]["dependencies"]
               if d.lower().startswith("prometheus-client")]
    match = re.search(r">=\s*(\d+)\.(\d+)", spec)
    assert match is not None, spec
    assert (int(match[1]), int(match[2])) >= (0, 20), spec


def test_metrics__at_most_1000_types_then_other(make_broker: MakeBroker,
                                                registry: CollectorRegistry,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A broker labels at most 1,000 distinct types; later ones count under type="other", and
    one warning is logged (API.md section 8; issue 11, row 5)."""
    import logging

    from sqlalchemy_eventbroker.metrics import MAX_TYPES

    assert MAX_TYPES == 1000
    broker = make_broker(mode="sync", registry=registry)
    broker.subscribe("**", lambda e: None)
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_eventbroker.metrics"):
        for i in range(MAX_TYPES + 50):
            broker.publish(new_event(EventSource.SYSTEM, f"t{i}.created"))
        broker.publish(new_event(EventSource.SYSTEM, "t1050.created"))
        broker.publish(new_event(EventSource.SYSTEM, "t0.created"))
    types = {s.labels["type"] for f in registry.collect() for s in f.samples
             if s.name == PUBLISHED}
    assert len(types) == MAX_TYPES + 1 and "other" in types
    other = {"source": "system", "type": "other"}
    assert _value(registry, PUBLISHED, **other) == 51
    assert _value(registry, PROCESSED, **other, status="completed") == 51
    assert _value(registry, f"{DURATION}_count", **other) == 51
    assert _value(registry, PUBLISHED, source="system", type="t0.created") == 2
    warnings = [r for r in caplog.records if "distinct event types" in r.getMessage()]
    assert len(warnings) == 1
