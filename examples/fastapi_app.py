"""A FastAPI app whose writes become events, handled by a worker process, traced end to end.

* The web app uses async SQLAlchemy. ``register_crud_hooks`` captures every ORM write; a
  ``DatabaseProvider`` on the same database writes the event rows in the request's own
  transaction (transactional outbox).
* A worker process (``--worker``, started by the demo) sends order confirmations from a group
  handler (``group="mailers"``: with several workers, each order is mailed once).
* With the OpenTelemetry SDK installed (``pip install opentelemetry-sdk``), each request runs in
  a span, the captured event carries its context (``metadata["traceparent"]``), and the
  worker's ``process`` span continues the request's trace. Spans are printed one per line.

Runs as written, with no server, on a temporary SQLite file (the worker polls it): the demo
starts the worker, sends a few requests through FastAPI's ``TestClient``, waits for the
confirmations and exits::

    python examples/fastapi_app.py
    python examples/fastapi_app.py --url postgresql+psycopg://postgres@127.0.0.1/app
    EVENTBROKER_EXAMPLE_URL=postgresql+psycopg://... python examples/fastapi_app.py
    python examples/fastapi_app.py --serve          # uvicorn on :8000, if installed

Needs ``fastapi``, ``httpx`` (for the ``TestClient``) and ``aiosqlite`` (SQLite) or
``psycopg`` (PostgreSQL).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel
from sqlalchemy import String, create_engine, make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_eventbroker import Broker, DatabaseProvider, Event, register_crud_hooks

ITEMS = ["tea", "scones", "jam"]


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(50))
    quantity: Mapped[int]


class NewOrder(BaseModel):
    item: str
    quantity: int = 1


def sync_url(url: str) -> str:
    """The URL the provider and the schema set-up use (a sync driver)."""
    u = make_url(url)
    driver = "sqlite" if u.get_backend_name() == "sqlite" else "postgresql+psycopg"
    return u.set(drivername=driver).render_as_string(hide_password=False)


def async_url(url: str) -> str:
    """The URL the app's async engine uses (aiosqlite or psycopg's async mode)."""
    u = make_url(url)
    driver = "sqlite+aiosqlite" if u.get_backend_name() == "sqlite" else "postgresql+psycopg"
    return u.set(drivername=driver).render_as_string(hide_password=False)


# -- tracing (optional) ---------------------------------------------------------------------------

def setup_tracing(service: str) -> bool:
    """An SDK tracer provider printing one line per finished span, if the SDK is installed."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError:
        print(f"{service}: tracing off (pip install opentelemetry-sdk to see the spans)",
              flush=True)
        return False

    def one_line(span: ReadableSpan) -> str:
        parent = f"{span.parent.span_id:016x}" if span.parent else "-"
        return (f"{service} span {span.name!r} trace={span.context.trace_id:032x} "
                f"span={span.context.span_id:016x} parent={parent}\n")

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(formatter=one_line)))
    trace.set_tracer_provider(provider)
    return True


def current_trace_id() -> str:
    """The current trace id (hex), or "" without tracing."""
    try:
        from opentelemetry import trace
    except ImportError:
        return ""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


# -- the web app ----------------------------------------------------------------------------------

def create_app(url: str) -> FastAPI:
    """The app: its engine, broker and capture live as long as the app (the lifespan)."""
    engine = create_async_engine(async_url(url))
    factory = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        provider = DatabaseProvider(sync_url(url))
        with provider, Broker(provider=provider, instance_id="web") as broker:
            handle = register_crud_hooks(factory, broker=broker)
            try:
                yield
            finally:
                handle.remove()
        await engine.dispose()

    app = FastAPI(title="orders", lifespan=lifespan)

    @app.middleware("http")
    async def trace_requests(request: Request,
                             call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """A SERVER span per request (what opentelemetry-instrumentation-fastapi would do)."""
        try:
            from opentelemetry import trace
        except ImportError:
            return await call_next(request)
        if trace.get_current_span().get_span_context().is_valid:
            return await call_next(request)  # FastAPI's own instrumentation made one already
        name = f"{request.method} {request.url.path}"
        with trace.get_tracer("fastapi_app").start_as_current_span(
                name, kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": request.method,
                            "url.path": request.url.path}):
            return await call_next(request)

    @app.post("/orders", status_code=201)
    async def place_order(order: NewOrder) -> dict[str, object]:
        async with factory() as session, session.begin():  # captured at flush, written in tx
            row = Order(item=order.item, quantity=order.quantity)
            session.add(row)
        return {"id": row.id, "item": row.item, "trace_id": current_trace_id()}

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, object]:
        async with factory() as session:
            row = await session.get(Order, order_id)
            if row is None:
                return {"id": order_id, "found": False}
            return {"id": row.id, "item": row.item, "quantity": row.quantity, "found": True}

    return app


# -- the worker process ---------------------------------------------------------------------------

def worker(url: str) -> int:
    """Mails a confirmation per new order (one worker per order), until stdin closes."""
    setup_tracing("worker")
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            print(line, flush=True)

    def confirm(event: Event) -> None:
        say(f"worker mailed confirmation for order {event.payload['id']} "
            f"({event.payload['item']}), trace={current_trace_id() or '-'}")

    provider = DatabaseProvider(sync_url(url), poll_interval=0.05)
    with provider, Broker(provider=provider, instance_id="worker-1") as broker:
        broker.subscribe("*.orders.create", confirm, group="mailers", lease=10.0)
        say("worker ready")
        sys.stdin.read()  # until the demo closes our stdin
    return 0


# -- the demo -------------------------------------------------------------------------------------

def demo(url: str) -> int:
    """Start the worker, place orders through the app, wait for every confirmation."""
    import warnings

    # Newer Starlette asks for httpx2 in its TestClient; httpx still works.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

    engine = create_engine(sync_url(url))
    Base.metadata.create_all(engine)
    DatabaseProvider(engine).create_schema()
    engine.dispose()
    tracing = setup_tracing("web")

    proc = subprocess.Popen([sys.executable, __file__, "--worker", "--url", url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def collect() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("worker ready"):
                ready.set()

    threading.Thread(target=collect, daemon=True).start()
    try:
        if not ready.wait(30):
            print("the worker did not start", file=sys.stderr)
            return 1
        placed: list[dict[str, object]] = []
        with TestClient(create_app(url)) as client:
            for item in ITEMS:
                response = client.post("/orders", json={"item": item, "quantity": 2})
                response.raise_for_status()
                placed.append(response.json())
                print(f"web placed order {placed[-1]['id']} ({item}), "
                      f"trace={placed[-1]['trace_id'] or '-'}", flush=True)
            print("web GET /orders/1 ->", client.get("/orders/1").json(), flush=True)

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and \
                    sum("mailed confirmation" in ln for ln in lines) < len(ITEMS):
                time.sleep(0.05)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)

    for line in lines:
        print(line)
    mailed = [ln for ln in lines if "mailed confirmation" in ln]
    ok = len(mailed) == len(ITEMS)
    print(f"\nworker confirmed {len(mailed)} of {len(ITEMS)} orders")
    if tracing:
        continued = sum(
            any(f"'process {etype}' trace={o['trace_id']}" in ln for ln in lines)
            for o in placed for etype in ("main.orders.create", "public.orders.create"))
        print(f"the request's trace continued in the worker for {continued} of {len(ITEMS)} orders")
        ok = ok and continued == len(ITEMS)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("EVENTBROKER_EXAMPLE_URL"),
                        help="database URL (default: $EVENTBROKER_EXAMPLE_URL, else a "
                             "temporary SQLite file)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true",
                        help="serve the app with uvicorn on 127.0.0.1:8000 (no worker)")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="eventbroker-fastapi-")
    url = args.url or f"sqlite:///{os.path.join(tmp.name, 'app.db')}"
    try:
        if args.worker:
            return worker(url)
        if args.serve:
            import uvicorn

            engine = create_engine(sync_url(url))
            Base.metadata.create_all(engine)
            DatabaseProvider(engine).create_schema()
            engine.dispose()
            setup_tracing("web")
            uvicorn.run(create_app(url), host="127.0.0.1", port=8000)
            return 0
        return demo(url)
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
