"""Tracing in one process, with the SDK's in-memory exporter: publish and process spans, the
context stored in the event, captured events with and without an outbox, failing handlers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_eventbroker import (
    Broker,
    Event,
    EventFilter,
    EventSource,
    HandlerError,
    MemoryProvider,
    ProviderError,
    RetryPolicy,
    new_event,
    register_crud_hooks,
)
from sqlalchemy_eventbroker.testing import EventRecorder

from ._helpers import assert_child, traceparent_of
from .conftest import Spans

ROOT = Path(__file__).resolve().parents[2]
NO_RETRY = RetryPolicy(max_retries=0)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(sa.String(50))


@pytest.fixture
def make_broker() -> Iterator[Callable[..., Broker]]:
    made: list[Broker] = []

    def make(**kwargs: Any) -> Broker:
        kwargs.setdefault("provider", MemoryProvider())
        kwargs.setdefault("retry_policy", NO_RETRY)
        kwargs.setdefault("registry", CollectorRegistry())
        broker = Broker(**kwargs).start()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop(timeout=5)
        broker.provider.close()


def _event(etype: str = "shop.order.placed") -> Event:
    return new_event(EventSource.SYSTEM, etype, {"order": 1})


def test_publish_sync__publish_and_process_spans_continue_the_callers_trace(
        spans: Spans, make_broker: Callable[..., Broker]) -> None:
    """publish_sync: ``publish <type>`` (PRODUCER) is a child of the current span, its context
    is stored in the event, and ``process <type>`` (CONSUMER) is that span's child."""
    broker = make_broker(mode="sync")
    recorder = EventRecorder()
    broker.subscribe("shop.*.*", recorder)
    event = _event()
    with trace.get_tracer("test").start_as_current_span("request"):
        broker.publish_sync(event)

    request = spans.one("request")
    publish = spans.one("publish shop.order.placed")
    process = spans.one("process shop.order.placed")
    assert publish.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert_child(publish, request)
    assert_child(process, publish)
    stored = broker.provider.get(event.id)
    assert stored is not None
    assert stored.metadata["traceparent"].startswith(traceparent_of(publish))
    assert "tracestate" not in stored.metadata
    assert recorder.events[0].metadata["traceparent"] == stored.metadata["traceparent"]
    for span, operation in ((publish, "publish"), (process, "process")):
        attributes = dict(span.attributes or {})
        assert attributes["messaging.system"] == "eventbroker"
        assert attributes["messaging.destination.name"] == "shop.order.placed"
        assert attributes["messaging.message.id"] == event.id
        assert attributes["messaging.operation.type"] == operation
        assert span.status.status_code is not StatusCode.ERROR


def test_replay__each_handler_call_continues_the_stored_trace(
        spans: Spans, make_broker: Callable[..., Broker]) -> None:
    """replay feeds stored events to a handler: each call is a ``process`` span, a child of
    the ``publish`` span whose context the stored event carries; a raising handler's span
    records the error and the exception still stops the replay."""
    broker = make_broker(mode="sync")
    event = _event()
    with trace.get_tracer("test").start_as_current_span("request"):
        broker.publish_sync(event)
    publish = spans.one("publish shop.order.placed")

    fed: list[str] = []
    assert broker.replay("shop.*.*", lambda e: fed.append(e.id)) == 1
    assert fed == [event.id]
    (process,) = spans.named("process shop.order.placed")
    assert_child(process, publish)

    def fail(e: Event) -> None:
        raise RuntimeError("replay handler down")

    with pytest.raises(RuntimeError, match="replay handler down"):
        broker.replay("shop.*.*", fail)
    failed = spans.named("process shop.order.placed")[-1]
    assert failed.status.status_code is StatusCode.ERROR


def test_publish_async__the_worker_continues_the_trace(
        spans: Spans, make_broker: Callable[..., Broker]) -> None:
    """publish_async: the handler runs on a worker thread, in a span parented on the stored
    context (not on whatever that thread had current)."""
    broker = make_broker(mode="async", worker_count=2)
    recorder = EventRecorder()
    broker.subscribe("shop.*.*", recorder)
    with trace.get_tracer("test").start_as_current_span("request"):
        broker.publish_async(_event())
    recorder.wait_for(1)
    broker.stop(timeout=5)  # the span ends after the handler returns: wait for the job
    assert_child(spans.one("process shop.order.placed"), spans.one("publish shop.order.placed"))
    assert_child(spans.one("publish shop.order.placed"), spans.one("request"))


def test_handler__its_span_is_current_so_what_it_publishes_continues_the_trace(
        spans: Spans, make_broker: Callable[..., Broker]) -> None:
    """Inside a handler (sync or async) the process span is current: an event it publishes
    gets a publish span under it, and that event's handler a process span under that."""
    broker = make_broker(mode="sync")
    seen: list[Any] = []

    async def first(event: Event) -> None:
        seen.append(trace.get_current_span().get_span_context())
        broker.publish_sync(_event("shop.order.shipped"))

    broker.subscribe("shop.order.placed", first)
    broker.subscribe("shop.order.shipped", EventRecorder())
    broker.publish_sync(_event())

    process = spans.one("process shop.order.placed")
    assert seen == [process.context]
    assert_child(spans.one("publish shop.order.shipped"), process)
    assert_child(spans.one("process shop.order.shipped"), spans.one("publish shop.order.shipped"))


def test_handler_failure__each_attempt_records_the_exception_with_error_status(
        spans: Spans, make_broker: Callable[..., Broker]) -> None:
    """A failing handler: every attempt's span records the exception and has status ERROR."""
    broker = make_broker(mode="sync", retry_policy=RetryPolicy(
        max_retries=1, initial_delay=0.001, max_delay=0.001))

    def broken(event: Event) -> None:
        raise RuntimeError("card declined")

    broker.subscribe("shop.*.*", broken)
    with pytest.raises(HandlerError):
        broker.publish_sync(_event())
    attempts = spans.named("process shop.order.placed")
    assert len(attempts) == 2
    for span in attempts:
        assert span.status.status_code is StatusCode.ERROR
        assert "card declined" in (span.status.description or "")
        (exception,) = [e for e in span.events if e.name == "exception"]
        assert (exception.attributes or {})["exception.type"] == "RuntimeError"
        assert_child(span, spans.one("publish shop.order.placed"))


def test_publish_many__each_event_gets_its_own_span_even_with_shared_metadata(
        spans: Spans, make_broker: Callable[..., Broker]) -> None:
    """publish_many: one publish span per event, and events built from one metadata dict
    do not end up sharing one context."""
    broker = make_broker(mode="sync")
    shared = {"request_id": "r1"}
    events = [_event() for _ in range(3)]
    for e in events:
        e.metadata = shared
    broker.publish_many(events)
    published = spans.named("publish shop.order.placed")
    assert len(published) == 3
    stored = [broker.provider.get(e.id) for e in events]
    parents = {s.metadata["traceparent"] for s in stored if s is not None}
    assert parents == {e.metadata["traceparent"] for e in events}
    assert len(parents) == 3
    assert all(s is not None and s.metadata["request_id"] == "r1" for s in stored)
    assert shared == {"request_id": "r1"}  # the caller's dict is left alone


class _RefusingProvider(MemoryProvider):
    """Refuses every write, as a backend that went away would."""

    def store_and_publish_many(self, events: Any, *, origin: str = "") -> None:
        raise ProviderError("the store is down")


def test_store_failure__the_publish_span_records_it(
        spans: Spans, make_broker: Callable[..., Broker]) -> None:
    """Storing failed: publish raises as before, and its span ends with the error."""
    broker = make_broker(mode="sync", provider=_RefusingProvider())
    with pytest.raises(ProviderError):
        broker.publish_sync(_event())
    span = spans.one("publish shop.order.placed")
    assert span.status.status_code is StatusCode.ERROR
    assert "the store is down" in (span.status.description or "")
    assert not spans.named("process shop.order.placed")


def test_tracestate__is_stored_when_the_context_has_one(
        spans: Spans, make_broker: Callable[..., Broker]) -> None:
    """A parent context carrying a tracestate: it travels in ``metadata["tracestate"]``."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=abc"})
    broker = make_broker(mode="sync")
    event = _event()
    with trace.get_tracer("test").start_as_current_span("request", context=parent):
        broker.publish_sync(event)
    stored = broker.provider.get(event.id)
    assert stored is not None
    assert stored.metadata["tracestate"] == "vendor=abc"
    assert stored.metadata["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")


def test_unconfigured__no_span_no_metadata(make_broker: Callable[..., Broker]) -> None:
    """OpenTelemetry installed but no SDK provider set: events carry no trace context."""
    assert not isinstance(trace.get_tracer_provider(), __import__(
        "opentelemetry.sdk.trace", fromlist=["TracerProvider"]).TracerProvider)
    broker = make_broker(mode="sync")
    recorder = EventRecorder()
    broker.subscribe("shop.*.*", recorder)
    event = _event()
    broker.publish_sync(event)
    stored = broker.provider.get(event.id)
    assert stored is not None and "traceparent" not in stored.metadata
    assert "traceparent" not in recorder.events[0].metadata


# -- capture ------------------------------------------------------------------------------------

@pytest.fixture
def sqlite_file(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shop.db'}"


def _capture_and_commit(url: str, broker: Broker, spans: Spans) -> None:
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    handle = register_crud_hooks(factory, broker=broker)
    try:
        with trace.get_tracer("test").start_as_current_span("POST /orders"), \
                factory() as session, session.begin():
            session.add(Order(item="tea"))
    finally:
        handle.remove()
        engine.dispose()


def test_captured__carries_the_context_current_at_flush(
        spans: Spans, make_broker: Callable[..., Broker], sqlite_file: str) -> None:
    """A captured event (no outbox): its publish span is a child of the request's span, its
    metadata names that publish span, and the handler's span is that span's child."""
    broker = make_broker(mode="sync")
    recorder = EventRecorder()
    broker.subscribe("*.orders.*", recorder)
    _capture_and_commit(sqlite_file, broker, spans)

    request = spans.one("POST /orders")
    publish = spans.one("publish main.orders.create")
    assert_child(publish, request)
    assert_child(spans.one("process main.orders.create"), publish)
    (event,) = recorder.events
    assert event.metadata["traceparent"].startswith(traceparent_of(publish))


def test_captured__outbox_rows_carry_the_context(
        spans: Spans, make_broker: Callable[..., Broker], sqlite_file: str) -> None:
    """With the outbox (a DatabaseProvider on the session's database), the row written in the
    transaction already carries the request's trace, and the handler continues it."""
    from sqlalchemy_eventbroker import DatabaseProvider

    provider = DatabaseProvider(sqlite_file)
    provider.create_schema()
    broker = make_broker(mode="sync", provider=provider)
    recorder = EventRecorder()
    broker.subscribe("*.orders.*", recorder)
    _capture_and_commit(sqlite_file, broker, spans)

    publish = spans.one("publish main.orders.create")
    assert_child(publish, spans.one("POST /orders"))
    assert_child(spans.one("process main.orders.create"), publish)
    (stored,) = provider.list(EventFilter(type_pattern="*.orders.*"))
    assert stored.metadata["traceparent"].startswith(traceparent_of(publish))
    assert recorder.events[0].id == stored.id


def test_captured__async_session_keeps_the_tasks_context(
        spans: Spans, make_broker: Callable[..., Broker], tmp_path: Path) -> None:
    """An AsyncSession flushes in a greenlet; the request's span is still the parent."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    broker = make_broker(mode="sync")
    broker.subscribe("*.orders.*", EventRecorder())
    url = f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}"

    async def go() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        factory = async_sessionmaker(engine)
        handle = register_crud_hooks(factory, broker=broker)
        try:
            with trace.get_tracer("test").start_as_current_span("POST /orders"):
                async with factory() as session, session.begin():
                    session.add(Order(item="tea"))
        finally:
            handle.remove()
            await engine.dispose()

    asyncio.run(go())
    publish = spans.one("publish main.orders.create")
    assert_child(publish, spans.one("POST /orders"))
    assert_child(spans.one("process main.orders.create"), publish)


# -- without OpenTelemetry -----------------------------------------------------------------------

NOT_INSTALLED = """
import sys
sys.modules["opentelemetry"] = None  # as if the [otel] extra were not installed
from sqlalchemy_eventbroker import Broker, EventSource, MemoryProvider, new_event, tracing
assert not tracing.AVAILABLE
assert tracing.start_publish is None and tracing.start_process is None
assert tracing.mark_captured is None
seen = []
with Broker(MemoryProvider(), mode="sync") as broker:
    broker.subscribe("a.*", seen.append)
    event = new_event(EventSource.SYSTEM, "a.b", {"x": 1})
    broker.publish_sync(event)
    stored = broker.provider.get(event.id)
assert len(seen) == 1 and "traceparent" not in seen[0].metadata
assert "traceparent" not in stored.metadata
assert not [m for m in sys.modules if m.startswith("opentelemetry.")], "imported anyway"
print("ok")
"""


def test_not_installed__publish_works_and_adds_no_context() -> None:
    """Without OpenTelemetry importable: the hooks are None, nothing of it is imported, and
    publishing and handling work with no trace context in the event."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", NOT_INSTALLED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
