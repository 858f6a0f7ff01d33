"""Event, new_event, event_type: defaults, payload conversion, lifecycle, validation, round trips."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest

from sqlalchemy_eventbroker.errors import EventValidationError, PayloadError
from sqlalchemy_eventbroker.event import (
    Event,
    EventSource,
    EventStatus,
    event_type,
    new_event,
    uuid7,
)

UTC = dt.UTC

FIELDS = [
    "id", "source", "type", "status", "retry_count", "error", "payload", "user_id",
    "session_id", "instance_id", "schema", "entity", "operation", "created_at",
    "processed_at", "completed_at", "metadata", "key",
]


@dataclasses.dataclass
class User:
    id: int
    name: str


# -- enums and helpers -------------------------------------------------------------------------


def test_enums__values() -> None:
    """EventSource and EventStatus are str enums with the contract's values."""
    assert [s.value for s in EventSource] == [
        "database", "websocket", "frontend", "system", "internal"]
    assert [s.value for s in EventStatus] == ["pending", "processing", "completed", "failed"]
    assert EventSource.DATABASE == "database" and isinstance(EventStatus.PENDING, str)


def test_event_type__joins_three_parts() -> None:
    """event_type('public', 'users', 'create') is 'public.users.create'."""
    assert event_type("public", "users", "create") == "public.users.create"


def test_uuid7__canonical_version_7() -> None:
    """uuid7() is a canonical version-7 RFC 4122 UUID."""
    text = uuid7()
    parsed = uuid.UUID(text)
    assert str(parsed) == text
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122


def test_uuid7__time_ordered_across_milliseconds() -> None:
    """An id made in a later millisecond sorts after an earlier one."""
    for _ in range(5):
        first = uuid7()
        ms = int(first[:8] + first[9:13], 16)
        while int((later := uuid7())[:8] + later[9:13], 16) == ms:
            pass  # spin into the next millisecond
        assert first < later


def test_uuid7__unique() -> None:
    """Many ids in a row are all different."""
    assert len({uuid7() for _ in range(10_000)}) == 10_000


# -- new_event ---------------------------------------------------------------------------------


def test_new_event__defaults() -> None:
    """new_event fills every field with the documented default."""
    before = dt.datetime.now(UTC)
    e = new_event(EventSource.DATABASE, "public.users.create")
    after = dt.datetime.now(UTC)
    assert [f.name for f in dataclasses.fields(Event)] == FIELDS
    assert str(uuid.UUID(e.id)) == e.id
    assert e.source is EventSource.DATABASE
    assert e.type == "public.users.create"
    assert e.status is EventStatus.PENDING
    assert (e.retry_count, e.error, e.payload, e.user_id) == (0, "", None, None)
    assert (e.session_id, e.instance_id) == ("", "")
    assert (e.schema, e.entity, e.operation) == ("public", "users", "create")
    assert before <= e.created_at <= after and e.created_at.tzinfo is not None
    assert e.created_at.utcoffset() == dt.timedelta(0)
    assert (e.processed_at, e.completed_at, e.metadata) == (None, None, {})


def test_new_event__same_as_event_new() -> None:
    """Event.new(...) is new_event(...)."""
    e = Event.new("system", "a.b.c", {"x": 1}, user_id=3)
    assert (e.source, e.type, e.payload, e.user_id, e.entity) == (
        EventSource.SYSTEM, "a.b.c", {"x": 1}, 3, "b")


def test_new_event__fresh_ids() -> None:
    """Each new event gets its own id."""
    assert new_event("system", "a").id != new_event("system", "a").id


@pytest.mark.parametrize("type_", ["users.create", "a.b.c.d", "single"])
def test_new_event__non_three_segment_type_leaves_parts_empty(type_: str) -> None:
    """Only a three-segment type fills schema, entity and operation."""
    e = new_event("system", type_)
    assert (e.schema, e.entity, e.operation) == ("", "", "")


def test_new_event__string_source_becomes_enum() -> None:
    """A source given as text becomes the EventSource member."""
    assert new_event("websocket", "x").source is EventSource.WEBSOCKET


def test_new_event__keyword_fields() -> None:
    """user_id, session_id, instance_id and metadata are taken as given (metadata as JSON)."""
    e = new_event("frontend", "ui.click", user_id=7, session_id="s1", instance_id="i1",
                  metadata={"request_id": "r1", "at": dt.date(2024, 1, 2)})
    assert (e.user_id, e.session_id, e.instance_id) == (7, "s1", "i1")
    assert e.metadata == {"request_id": "r1", "at": "2024-01-02"}


def test_new_event__payload_converted() -> None:
    """The payload is stored in its JSON form."""
    e = new_event("system", "x", {"when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)})
    assert e.payload == {"when": "2024-01-02T03:04:05+00:00"}


def test_new_event__bad_payload_or_metadata() -> None:
    """A payload or metadata JSON cannot hold raises PayloadError."""
    with pytest.raises(PayloadError):
        new_event("system", "x", {"b": b"raw"})
    with pytest.raises(PayloadError, match="metadata"):
        new_event("system", "x", metadata={"o": object()})


# -- payload -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (None, None),
        ("text", "text"),
        (3, 3),
        (1.5, 1.5),
        (True, True),
        ([1, "a", None], [1, "a", None]),
        ({"a": {"b": [1]}}, {"a": {"b": [1]}}),
        (dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC), "2024-05-06T07:08:09.123456+00:00"),
        (dt.datetime(2024, 5, 6, 7, 8, 9), "2024-05-06T07:08:09"),
        (dt.date(2024, 5, 6), "2024-05-06"),
        (dt.time(7, 8), "07:08:00"),
        (Decimal("12.50"), "12.50"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (User(1, "ada"), {"id": 1, "name": "ada"}),
        ({"users": [User(2, "bob")]}, {"users": [{"id": 2, "name": "bob"}]}),
        ((1, 2), [1, 2]),
        (EventStatus.FAILED, "failed"),
        ({1: "a"}, {"1": "a"}),
    ],
    ids=lambda v: type(v).__name__,
)
def test_set_payload__converts_to_json_form(value: object, stored: Any) -> None:
    """set_payload stores the JSON form: ISO dates, Decimal/UUID as strings, dataclasses as dicts."""
    e = new_event("system", "x")
    e.set_payload(value)
    assert e.payload == stored
    json.dumps(e.payload)  # and it really is JSON


def test_set_payload__result_is_independent_copy() -> None:
    """Later changes to the object handed in do not reach the stored payload."""
    data = {"a": [1]}
    e = new_event("system", "x")
    e.set_payload(data)
    data["a"].append(2)
    assert e.payload == {"a": [1]}


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (b"bytes", "bytes"),
        (object(), "object"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        ({"a": [1, {"b": b"x"}]}, "payload.a[1].b"),
        ({"k": object()}, "payload.k"),
        ({(1, 2): "tuple key"}, "dict key"),
        (Decimal("NaN"), "NaN"),
        ({1, b"x"}, "bytes"),
    ],
    ids=["bytes", "object", "nan", "inf", "nested-bytes", "nested-object", "tuple-key",
         "decimal-nan", "set-bytes"],
)
def test_set_payload__unrepresentable_raises(value: object, named: str) -> None:
    """Bytes, arbitrary objects and non-finite numbers raise PayloadError naming where."""
    e = new_event("system", "x", {"old": 1})
    with pytest.raises(PayloadError) as info:
        e.set_payload(value)
    assert named in str(info.value)
    assert isinstance(info.value, TypeError)
    assert e.payload == {"old": 1}  # unchanged


def test_get_payload__plain() -> None:
    """get_payload() returns the payload."""
    assert new_event("system", "x", [1, 2]).get_payload() == [1, 2]


def test_get_payload__into_dataclass() -> None:
    """get_payload(into=cls) builds cls(**payload)."""
    user = new_event("system", "x", User(5, "eve")).get_payload(into=User)
    assert user == User(5, "eve")


def test_get_payload__into_needs_dict() -> None:
    """get_payload(into=...) on a non-dict payload raises TypeError naming the event."""
    e = new_event("system", "x", [1])
    with pytest.raises(TypeError, match=e.id):
        e.get_payload(into=User)


# -- clone -------------------------------------------------------------------------------------


def test_clone__same_id_equal() -> None:
    """clone() keeps the id and every field."""
    e = new_event("database", "public.users.create", {"a": [1]}, user_id=1,
                  metadata={"m": {"n": 1}}, key="public.users:1")
    c = e.clone()
    assert c == e and c is not e and c.id == e.id and c.key == "public.users:1"


def test_key__defaults_empty_and_positional_last() -> None:
    """``key`` is the last field, "" by default, and absent from a dict reads as ""."""
    e = new_event("system", "x")
    assert e.key == "" and Event().key == ""
    d = e.to_dict()
    del d["key"]
    assert Event.from_dict(d).key == ""
    assert Event.from_json(new_event("system", "x", key="k:1").to_json()).key == "k:1"


def test_clone__deep() -> None:
    """Changing a clone's payload or metadata leaves the original alone."""
    e = new_event("system", "x", {"a": [1]}, metadata={"m": {"n": [1]}})
    c = e.clone()
    c.payload["a"].append(2)  # type: ignore[index,call-overload,union-attr]
    c.metadata["m"]["n"].append(2)  # type: ignore[index,call-overload,union-attr]
    c.status = EventStatus.FAILED
    assert e.payload == {"a": [1]} and e.metadata == {"m": {"n": [1]}}
    assert e.status is EventStatus.PENDING


# -- lifecycle ---------------------------------------------------------------------------------


def test_mark_processing__sets_status_and_processed_at() -> None:
    """mark_processing: status processing, processed_at now (aware UTC)."""
    e = new_event("system", "x")
    e.mark_processing()
    assert e.status is EventStatus.PROCESSING
    assert e.processed_at is not None and e.processed_at >= e.created_at
    assert e.processed_at.tzinfo is not None and e.completed_at is None


def test_mark_completed__sets_completed_at_and_clears_error() -> None:
    """mark_completed: status completed, completed_at now, error cleared."""
    e = new_event("system", "x")
    e.mark_processing()
    e.error = "earlier failure"
    e.mark_completed()
    assert e.status is EventStatus.COMPLETED and e.error == ""
    assert e.completed_at is not None and e.processed_at is not None
    assert e.completed_at >= e.processed_at


def test_mark_failed__sets_error_text() -> None:
    """mark_failed: status failed, completed_at now, error is the text (of an exception too)."""
    e = new_event("system", "x")
    e.mark_failed(ValueError("boom"))
    assert (e.status, e.error) == (EventStatus.FAILED, "boom")
    assert e.completed_at is not None
    e.mark_failed("plain text")
    assert e.error == "plain text"


def test_increment_retry__counts() -> None:
    """increment_retry adds one each time."""
    e = new_event("system", "x")
    e.increment_retry()
    e.increment_retry()
    assert e.retry_count == 2


# -- validate ----------------------------------------------------------------------------------


def test_validate__fresh_event_ok() -> None:
    """A new event validates."""
    new_event("system", "a.b").validate()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": ""}, "id"),
        ({"id": None}, "id"),
        ({"source": "nowhere"}, "source"),
        ({"source": None}, "source"),
        ({"type": ""}, "type"),
        ({"type": None}, "type"),
        ({"status": "lost"}, "status"),
        ({"retry_count": -1}, "retry_count"),
        ({"retry_count": "1"}, "retry_count"),
        ({"user_id": "7"}, "user_id"),
        ({"user_id": True}, "user_id"),
        ({"created_at": dt.datetime(2024, 1, 1)}, "created_at"),
        ({"created_at": "2024-01-01"}, "created_at"),
        ({"metadata": []}, "metadata"),
    ],
)
def test_validate__names_the_field(change: dict[str, Any], field: str) -> None:
    """validate raises EventValidationError whose .field and message name the bad field."""
    e = new_event("system", "a.b")
    for k, v in change.items():
        setattr(e, k, v)
    with pytest.raises(EventValidationError) as info:
        e.validate()
    assert info.value.field == field
    assert str(info.value).startswith(f"event.{field}:")
    assert isinstance(info.value, ValueError)


def test_event__plain_strings_become_enums() -> None:
    """Event(source='database', status='failed') holds the enum members."""
    e = Event(source="database", type="x", status="failed")  # type: ignore[arg-type]
    assert e.source is EventSource.DATABASE and e.status is EventStatus.FAILED
    e.validate()


# -- serialisation -----------------------------------------------------------------------------


def full_event() -> Event:
    e = new_event("database", "public.users.update", {"id": 1, "name": "ada", "tags": ["x"]},
                  user_id=42, session_id="sess", instance_id="api-1",
                  metadata={"changes": {"name": {"old": "a", "new": "ada"}}, "n": 1.5},
                  key="public.users:1")
    e.mark_processing()
    e.increment_retry()
    e.mark_failed("handler h: boom")
    return e


def test_to_dict__json_ready() -> None:
    """to_dict holds only JSON values, timestamps as ISO-8601 text."""
    d = full_event().to_dict()
    assert list(d) == FIELDS
    assert d["source"] == "database" and d["status"] == "failed"
    assert isinstance(d["created_at"], str) and d["created_at"].endswith("+00:00")
    json.dumps(d)


@pytest.mark.parametrize("make", [full_event, lambda: new_event("system", "x")],
                         ids=["full", "minimal"])
def test_dict_round_trip__exact(make: Any) -> None:
    """Event.from_dict(e.to_dict()) == e, timestamps and metadata included."""
    e = make()
    back = Event.from_dict(e.to_dict())
    assert back == e
    assert back.created_at == e.created_at and back.completed_at == e.completed_at
    assert back.source is e.source and back.status is e.status


@pytest.mark.parametrize("make", [full_event, lambda: new_event("system", "x")],
                         ids=["full", "minimal"])
def test_json_round_trip__exact(make: Any) -> None:
    """Event.from_json(e.to_json()) == e, microseconds and time zone kept."""
    e = make()
    text = e.to_json()
    assert isinstance(text, str) and json.loads(text)["id"] == e.id
    back = Event.from_json(text)
    assert back == e
    assert back.processed_at == e.processed_at
    assert back.created_at.utcoffset() == dt.timedelta(0)


def test_json_round_trip__bytes_input() -> None:
    """from_json accepts bytes as well as text."""
    e = full_event()
    assert Event.from_json(e.to_json().encode()) == e


def test_json_round_trip__non_utc_offset_preserved() -> None:
    """An aware timestamp in another zone keeps its instant through JSON."""
    e = new_event("system", "x")
    e.created_at = dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert Event.from_json(e.to_json()).created_at == e.created_at


def test_from_dict__missing_field_named() -> None:
    """A missing required field is an EventValidationError naming it."""
    d = new_event("system", "x").to_dict()
    del d["type"]
    with pytest.raises(EventValidationError) as info:
        Event.from_dict(d)
    assert info.value.field == "type"


@pytest.mark.parametrize(
    ("key", "value"),
    [("source", "nowhere"), ("status", "lost"), ("created_at", "yesterday"),
     ("completed_at", 12)],
)
def test_from_dict__bad_field_named(key: str, value: object) -> None:
    """A malformed enum or timestamp is an EventValidationError naming the field."""
    d = new_event("system", "x").to_dict()
    d[key] = value  # type: ignore[assignment]
    with pytest.raises(EventValidationError) as info:
        Event.from_dict(d)
    assert info.value.field == key


def test_from_dict__naive_timestamp_taken_as_utc() -> None:
    """A timestamp without offset is read as UTC, so the event stays valid."""
    d = new_event("system", "x").to_dict()
    d["created_at"] = "2024-01-02T03:04:05"
    assert Event.from_dict(d).created_at == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", "", "null"])
def test_from_json__not_an_event_object(text: str) -> None:
    """Text that is not a JSON object is an EventValidationError."""
    with pytest.raises(EventValidationError):
        Event.from_json(text)


@pytest.mark.parametrize(
    ("payload", "metadata", "path"),
    [
        ({"name": "se\x00cret"}, {}, "payload.name"),
        ({"tags": ["ok", "se\x00cret"]}, {}, "payload.tags[1]"),
        ({"se\x00cret": 1}, {}, "payload"),
        ("se\x00cret", {}, "payload"),
        ({"ok": 1}, {"note": {"deep": "se\x00cret"}}, "metadata.note.deep"),
    ],
)
def test_validate__nul_refused_on_every_backend_naming_the_path(
    payload: object, metadata: dict, path: str
) -> None:
    """U+0000 anywhere in payload or metadata is refused by validate() (PostgreSQL jsonb
    cannot hold it, so every backend refuses it alike); the message names the path and
    never quotes the text."""


    e = new_event(EventSource.SYSTEM, "a.b.c")
    e.payload = payload  # type: ignore[assignment]
    e.metadata = metadata
    with pytest.raises(PayloadError) as info:
        e.validate()
    assert path in str(info.value)
    assert "secret" not in str(info.value) and "cret" not in str(info.value)


def test_set_payload__unserializable_message_has_no_data() -> None:
    """A value JSON cannot hold is named by type and path, never by its text."""


    class Secret:
        def __repr__(self) -> str:
            return "hunter2"

    e = new_event(EventSource.SYSTEM, "a.b.c")
    with pytest.raises(PayloadError) as info:
        e.set_payload({"x": Secret()})
    assert "payload.x" in str(info.value) and "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "limit"),
    [("type", 255), ("session_id", 255), ("instance_id", 255), ("schema", 128),
     ("entity", 128), ("operation", 64)],
)
def test_validate__field_limits(name: str, limit: int) -> None:
    """A bounded text field passes at its limit and fails one character over it, or when it
    is not a str, naming the field and the limit but never the text (issue 11, row 16)."""
    from sqlalchemy_eventbroker.event import FIELD_LIMITS

    assert FIELD_LIMITS[name] == limit
    e = new_event(EventSource.SYSTEM, "a.b.c")
    setattr(e, name, "s" * limit)
    e.validate()
    setattr(e, name, "s" * (limit + 1))
    with pytest.raises(EventValidationError) as info:
        e.validate()
    assert info.value.field == name
    assert str(limit) in str(info.value) and "sss" not in str(info.value)
    setattr(e, name, 42)
    with pytest.raises(EventValidationError) as info:
        e.validate()
    assert info.value.field == name


def _good_dict() -> dict[str, Any]:
    return new_event(EventSource.SYSTEM, "public.users.create", {"a": 1}).to_dict()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", 5), ("id", None), ("type", ["x"]), ("source", [1]), ("source", "nope"),
        ("status", {}), ("retry_count", "x"), ("retry_count", 1.5), ("retry_count", -1),
        ("retry_count", True), ("error", 0), ("user_id", "7"), ("user_id", True),
        ("session_id", 1), ("instance_id", []), ("schema", 1), ("entity", 2.0),
        ("operation", {}), ("key", 3), ("created_at", 5), ("created_at", "yesterday"),
        ("processed_at", []), ("metadata", "abc"), ("metadata", [["a", 1]]),
        ("metadata", {"k": float("nan")}), ("payload", {"k": b"x"}), ("payload", {1, 2}),
        ("payload", "\ud800"),
    ],
)
def test_from_dict__malformed_field_is_event_validation_error_naming_it(
        field: str, value: object) -> None:
    """A malformed field gives EventValidationError with ``.field`` set, never a raw
    ValueError/TypeError, and never an event that to_json() then fails on (issue 11, row 13)."""
    d = _good_dict()
    d[field] = value
    with pytest.raises(EventValidationError) as info:
        Event.from_dict(d)
    assert info.value.field == field


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"id": "x", "source": "system", "type": "a", "payload": '
     + "[" * 5000 + "]" * 5000 + "}", "NaN", "[1]", "\"s\"", b"\xff\xfe", "{"],
    ids=["deep-array", "deep-payload", "nan", "list", "string", "bad-bytes", "truncated"],
)
def test_from_json__malformed_text_is_event_validation_error(text: str | bytes) -> None:
    """Malformed JSON text, too-deep nesting or a non-object is an EventValidationError, never
    a JSONDecodeError, UnicodeDecodeError or RecursionError."""
    with pytest.raises(EventValidationError):
        Event.from_json(text)


def test_from_dict__not_a_mapping() -> None:
    """A non-mapping is an EventValidationError."""
    with pytest.raises(EventValidationError):
        Event.from_dict(["id", "x"])  # type: ignore[arg-type]
