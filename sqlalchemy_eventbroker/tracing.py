"""OpenTelemetry tracing (API.md section 11): a ``publish`` span per event, a ``process`` span
per handler call, and the W3C trace context carried in ``event.metadata`` between them.

Why the context travels in the event: the handler may run much later, in another process on
another host (a group member, a fan-out reader), after the event sat in PostgreSQL, Redis or
NATS. ``metadata["traceparent"]`` (and ``"tracestate"`` when set) is stored and delivered with
the event on every backend, so whichever process runs a handler parents its ``process`` span on
the ``publish`` span, and a web request's trace continues into handlers anywhere.

The three hooks below are ``None`` when OpenTelemetry is not installed: the import is tried
once, here, and the pipeline's cost is one ``is None`` test per publish and per handler call.
With OpenTelemetry installed but no SDK tracer provider set (the API's proxy or no-op
provider), each hook returns at once after one module-global check, and no metadata is added.

* :data:`start_publish`: the broker's ``publish`` calls, around the store (so the stored event
  carries its ``traceparent``);
* :data:`mark_captured`: ORM capture, when a flush builds the event (so the context is the one
  current at flush: the web request's, also when an outbox writes the event in the
  transaction);
* :data:`start_process`: the one place a handler is called.

Attributes follow OpenTelemetry's messaging conventions: ``messaging.system`` is
``"eventbroker"``, ``messaging.destination.name`` the event type, ``messaging.message.id`` the
event id, ``messaging.operation.type`` ``publish`` or ``process`` (and
``messaging.consumer.group.name`` for a group handler). A failing handler's span records the
exception and has status ERROR; each retry is a span of its own.

Tracing never fails a publish or a handler: an error inside OpenTelemetry is logged and the
event goes on untraced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Any

from .event import Event

__all__ = ["AVAILABLE", "mark_captured", "start_process", "start_publish"]

log = logging.getLogger("sqlalchemy_eventbroker.tracing")

try:
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
    from opentelemetry.trace import (
        NoOpTracerProvider,
        ProxyTracerProvider,
        Span,
        SpanKind,
        Status,
        StatusCode,
        Tracer,
        TracerProvider,
    )
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:
    #: Whether ``opentelemetry-api`` could be imported (the ``[otel]`` extra).
    AVAILABLE = False
else:
    AVAILABLE = True

SYSTEM = "eventbroker"
_TRACEPARENT = "traceparent"
_TRACESTATE = "tracestate"


# -- is a tracer provider configured? ---------------------------------------------------------

def _global_provider() -> TracerProvider | None:
    """The global tracer provider set by ``set_tracer_provider``, or None while unset.

    ``trace.get_tracer_provider()`` looks up an environment variable on every call while no
    provider is set (about 2 µs, paid per publish and per handler call); the module global it
    reads costs a dict lookup. When that variable names a provider, or a release renames the
    global, the public call is used.
    """
    found = _trace.__dict__.get("_TRACER_PROVIDER", _trace)
    if found is _trace or _BY_ENVIRONMENT:
        return _trace.get_tracer_provider()
    return found  # type: ignore[no-any-return]


_BY_ENVIRONMENT = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
_cached: tuple[object, Tracer] | None = None


def _tracer() -> Tracer | None:
    """Our tracer from the global provider, or None when no SDK provider is configured."""
    global _cached
    provider = _global_provider()
    if provider is None:
        return None
    cached = _cached
    if cached is not None and cached[0] is provider:
        return cached[1]
    if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
        return None
    tracer = provider.get_tracer("sqlalchemy_eventbroker")
    _cached = (provider, tracer)
    return tracer


def _attributes(event: Event, operation: str) -> dict[str, Any]:
    return {
        "messaging.system": SYSTEM,
        "messaging.destination.name": event.type,
        "messaging.message.id": event.id,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }


# -- publishing --------------------------------------------------------------------------------

def _publish_span(tracer: Tracer, event: Event) -> Span:
    """Start ``publish <type>`` (parent: the current context) and store its context in the
    event's metadata, replacing any context it carried (a republished event is a new message)."""
    span = tracer.start_span(f"publish {event.type}", kind=SpanKind.PRODUCER,
                             attributes=_attributes(event, "publish"))
    if span.get_span_context().is_valid:
        # A copy: events built from one metadata dict must not share one context.
        meta = dict(event.metadata)
        meta.pop(_TRACESTATE, None)
        _PROPAGATOR.inject(meta, context=_trace.set_span_in_context(span))
        event.metadata = meta
    return span


class _Publishing:
    """Ends the publish spans of a batch when its store is done (with its error, if any)."""

    __slots__ = ("spans",)

    def __init__(self, spans: list[Span]) -> None:
        self.spans = spans

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            for span in self.spans:
                if exc is not None:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                span.end()
        except Exception:
            log.exception("eventbroker: ending a publish span failed")


_NOTHING: AbstractContextManager[None] = nullcontext()


def _start_publish(events: Sequence[Event]) -> AbstractContextManager[None]:
    """A ``publish`` span per event, injected into its metadata now; the spans end when the
    returned context manager exits (around the store)."""
    tracer = _tracer()
    if tracer is None:
        return _NOTHING
    try:
        return _Publishing([_publish_span(tracer, e) for e in events])
    except Exception:
        log.exception("eventbroker: starting a publish span failed; the event is not traced")
        return _NOTHING


def _mark_captured(event: Event) -> None:
    """The ``publish`` span of an event capture built: started and ended now, at flush, in the
    context current there, and stored in the event's metadata."""
    tracer = _tracer()
    if tracer is None:
        return
    try:
        _publish_span(tracer, event).end()
    except Exception:
        log.exception("eventbroker: a publish span for a captured event failed")


# -- processing --------------------------------------------------------------------------------

class Processing:
    """A handler call's ``process`` span, current in the calling thread until :meth:`end`."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, token: object) -> None:
        self.span = span
        self.token = token

    def end(self, exc: BaseException | None) -> None:
        """Make the span no longer current and end it; ``exc`` (the handler's error, if any)
        is recorded and sets the status to ERROR."""
        try:
            _context.detach(self.token)  # type: ignore[arg-type]
            span = self.span
            if exc is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
        except Exception:
            log.exception("eventbroker: ending a process span failed")


def _start_process(event: Event, group: str | None) -> Processing | None:
    """Start ``process <type>``, child of the context stored in the event (a root span when it
    carries none), and make it current so what the handler publishes continues the trace."""
    tracer = _tracer()
    if tracer is None:
        return None
    try:
        meta = event.metadata
        carrier = {k: v for k in (_TRACEPARENT, _TRACESTATE)
                   if isinstance(v := meta.get(k), str)}
        parent = _PROPAGATOR.extract(carrier)
        attributes = _attributes(event, "process")
        if group is not None:
            attributes["messaging.consumer.group.name"] = group
        span = tracer.start_span(f"process {event.type}", context=parent,
                                 kind=SpanKind.CONSUMER, attributes=attributes)
        return Processing(span, _context.attach(_trace.set_span_in_context(span)))
    except Exception:
        log.exception("eventbroker: starting a process span failed; the call is not traced")
        return None


if AVAILABLE:
    _PROPAGATOR = TraceContextTextMapPropagator()

#: ``start_publish(events)``: a context manager around storing ``events``; None without
#: OpenTelemetry.
start_publish: Callable[[Sequence[Event]], AbstractContextManager[None]] | None = (
    _start_publish if AVAILABLE else None)
#: ``mark_captured(event)``: the publish span of a captured event; None without OpenTelemetry.
mark_captured: Callable[[Event], None] | None = _mark_captured if AVAILABLE else None
#: ``start_process(event, group)``: a handler call's span, or None (not configured); the hook
#: itself is None without OpenTelemetry.
start_process: Callable[[Event, str | None], Processing | None] | None = (
    _start_process if AVAILABLE else None)
