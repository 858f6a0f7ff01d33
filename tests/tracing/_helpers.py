"""Plain helpers shared by the tracing tests (no test module imports another)."""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import format_span_id, format_trace_id


def traceparent_of(span: ReadableSpan) -> str:
    """The W3C ``traceparent`` naming ``span`` (version 00), without its flags."""
    return f"00-{format_trace_id(span.context.trace_id)}-{format_span_id(span.context.span_id)}-"


def assert_child(child: ReadableSpan, parent: ReadableSpan) -> None:
    """``child`` is in ``parent``'s trace, with ``parent`` as its parent span."""
    assert child.context.trace_id == parent.context.trace_id
    assert child.parent is not None, f"{child.name} has no parent"
    assert child.parent.span_id == parent.context.span_id, (child.name, parent.name)
