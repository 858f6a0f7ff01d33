"""The other host: a broker on PostgreSQL whose handlers' spans are printed as JSON lines.

``python -m tests.tracing._pg_worker URL``: prints ``ready`` once subscribed, then one line
per finished span, until stdin closes. Handlers: a group handler on ``shop.*.*`` (group
``billing``) and a fan-out handler on ``*.orders.*``.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from sqlalchemy_eventbroker import Broker, DatabaseProvider, Event

_lock = threading.Lock()


def say(line: str) -> None:
    with _lock:
        print(line, flush=True)


class JsonLines(SpanExporter):
    """Each span as one JSON line on stdout: what the parent test compares."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for s in spans:
            say(json.dumps({
                "name": s.name,
                "kind": s.kind.name,
                "trace_id": f"{s.context.trace_id:032x}",
                "span_id": f"{s.context.span_id:016x}",
                "parent_span_id": f"{s.parent.span_id:016x}" if s.parent else None,
                "attributes": dict(s.attributes or {}),
            }))
        return SpanExportResult.SUCCESS


def main(url: str) -> int:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLines()))
    trace.set_tracer_provider(provider)

    def noop(event: Event) -> None:
        pass

    with DatabaseProvider(url) as events, Broker(provider=events, instance_id="other-host") as b:
        b.subscribe("shop.*.*", noop, group="billing", lease=5.0)
        b.subscribe("*.orders.*", noop)
        say("ready")
        sys.stdin.read()
    provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
