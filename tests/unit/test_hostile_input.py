"""Property tests: arbitrary input to the parsing entry points gives our named errors only.

``Event.from_json``, ``Event.from_dict``, ``Event.set_payload`` and ``compile_pattern`` take
input from outside (stored rows, messages from other hosts, configuration). Whatever they are
given, they either succeed or raise a ``BrokerError`` subclass, never a raw ``ValueError``,
``TypeError``, ``RecursionError`` or ``UnicodeEncodeError`` (issue 11).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlalchemy_eventbroker import Event, EventSource, new_event
from sqlalchemy_eventbroker.errors import BrokerError
from sqlalchemy_eventbroker.pattern import compile_pattern

FIELDS = ["id", "source", "type", "status", "retry_count", "error", "payload", "user_id",
          "session_id", "instance_id", "schema", "entity", "operation", "created_at",
          "processed_at", "completed_at", "metadata", "key"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
python_values = st.recursive(
    json_values | st.binary(max_size=8) | st.datetimes() | st.just(object())
    | st.frozensets(st.integers(), max_size=3) | st.just(float("inf")),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text() | st.integers() | st.none(), inner, max_size=3),
    max_leaves=12,
)
fields = st.dictionaries(st.sampled_from(FIELDS), python_values, max_size=6)


def _usable(event: Event) -> None:
    # What from_dict/from_json/set_payload give is validated with named errors only, and an
    # event that passes validate() is encoded and read back as it was.
    try:
        event.validate()
    except BrokerError:
        return
    assert Event.from_json(event.to_json()) == event


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(fields)
def test_from_dict__arbitrary_fields_give_named_errors_only(changes: dict[str, Any]) -> None:
    """A valid event dict with arbitrary values in some fields: an event or a BrokerError."""
    d = new_event(EventSource.SYSTEM, "a.b.c").to_dict()
    d.update(changes)
    try:
        event = Event.from_dict(d)
    except BrokerError:
        return
    _usable(event)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8) | json_values)
def test_from_json__arbitrary_documents_give_named_errors_only(doc: Any) -> None:
    """Any JSON document, and any event document with arbitrary JSON field values: an event
    or a BrokerError."""
    base = new_event(EventSource.SYSTEM, "a.b.c").to_dict()
    for document in (doc, {**base, **doc} if isinstance(doc, dict) else doc):
        try:
            event = Event.from_json(json.dumps(document))
        except BrokerError:
            continue
        _usable(event)


@settings(max_examples=200)
@given(st.text() | st.binary())
def test_from_json__arbitrary_text_gives_named_errors_only(text: str | bytes) -> None:
    """Any text or bytes at all: an event or a BrokerError."""
    try:
        event = Event.from_json(text)
    except BrokerError:
        return
    _usable(event)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(python_values)
def test_set_payload__arbitrary_values_give_named_errors_only(value: Any) -> None:
    """Any Python value: stored in its JSON form or a BrokerError (PayloadError)."""
    event = new_event(EventSource.SYSTEM, "a.b.c")
    try:
        event.set_payload(value)
    except BrokerError:
        return
    _usable(event)


@given(st.text(), st.text())
def test_compile_pattern__arbitrary_strings_give_named_errors_only(pattern: str,
                                                                   type_: str) -> None:
    """Any string: a matcher that answers a bool for any type, or a BrokerError."""
    try:
        matcher = compile_pattern(pattern)
    except BrokerError:
        return
    assert isinstance(matcher(type_), bool)


def test_deep_document__named_error() -> None:
    """Nesting far beyond the recursion limit is a named error, for text and for dicts."""
    deep: Any = 0
    for _ in range(20_000):
        deep = [deep]
    d = new_event(EventSource.SYSTEM, "a.b.c").to_dict()
    for payload_place in ("payload", "metadata"):
        try:
            Event.from_dict({**d, payload_place: {"k": deep}})
        except BrokerError:
            pass
    try:
        Event.from_json('{"payload": ' + "[" * 20_000 + "]" * 20_000 + "}")
    except BrokerError:
        pass
