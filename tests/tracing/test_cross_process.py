"""Tracing across two processes on PostgreSQL: the handler's span on the other host is in the
publisher's trace, a child of its publish span (group delivery, and fan-out of a captured event
written by the outbox)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_eventbroker import (
    Broker,
    EventSource,
    RetryPolicy,
    new_event,
    register_crud_hooks,
)

from .conftest import Spans

ROOT = Path(__file__).resolve().parents[2]
database = pytest.importorskip("sqlalchemy_eventbroker.providers.database")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(sa.String(50))


class Worker:
    """The subprocess and the lines it printed (read by a thread, waited on by deadline)."""

    def __init__(self, url: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.tracing._pg_worker", url], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.strip())
                self.changed.notify_all()

    def wait(self, found: Callable[[list[str]], Any], what: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not (result := found(self.lines)):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {what} from the worker: {self.lines}")
                self.changed.wait(min(left, 0.5))
        return result

    def spans(self, name: str) -> list[dict[str, Any]]:
        return [s for line in list(self.lines) if line.startswith("{")
                if (s := json.loads(line))["name"] == name]

    def close(self) -> str:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.stderr.read()


def test_two_processes__handlers_on_the_other_host_continue_the_trace(
        spans: Spans, postgres_url: str) -> None:
    """A group handler and a fan-out handler in another process, on PostgreSQL: their process
    spans have the publisher's trace id and its publish span as parent."""
    engine = sa.create_engine(postgres_url)
    Base.metadata.create_all(engine)
    provider = database.DatabaseProvider(engine)
    provider.create_schema()
    worker = Worker(postgres_url)
    broker = None
    try:
        worker.wait(lambda lines: "ready" in lines, "ready line")
        broker = Broker(provider, mode="sync", instance_id="web", registry=CollectorRegistry(),
                        retry_policy=RetryPolicy(max_retries=0)).start()
        factory = sessionmaker(engine)
        handle = register_crud_hooks(factory, broker=broker)
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("POST /orders"):
            broker.publish_sync(new_event(EventSource.SYSTEM, "shop.order.placed", {"id": 1}))
            with factory() as session, session.begin():  # the outbox writes the event row
                session.add(Order(item="tea"))
        handle.remove()

        grouped = worker.wait(lambda _: worker.spans("process shop.order.placed"), "group span")
        fanned = worker.wait(lambda _: worker.spans("process public.orders.create"),
                             "fan-out span")
    finally:
        if broker is not None:
            broker.stop(timeout=5)
        stderr = worker.close()
        provider.close()
        engine.dispose()

    request = spans.one("POST /orders")
    trace_id = f"{request.context.trace_id:032x}"
    for (remote,), name in ((grouped, "publish shop.order.placed"),
                            (fanned, "publish public.orders.create")):
        publish = spans.one(name)
        assert remote["trace_id"] == trace_id, stderr
        assert remote["parent_span_id"] == f"{publish.context.span_id:016x}"
        assert remote["kind"] == "CONSUMER"
        assert remote["attributes"]["messaging.operation.type"] == "process"
        assert publish.parent is not None and publish.parent.span_id == request.context.span_id
    assert grouped[0]["attributes"]["messaging.consumer.group.name"] == "billing"
