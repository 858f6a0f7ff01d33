"""The one JSON encoder: to_jsonable, dumps, loads."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from collections import OrderedDict
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqlalchemy_eventbroker._json import dumps, loads, to_jsonable
from sqlalchemy_eventbroker.errors import PayloadError


class Color(enum.Enum):
    RED = "red"
    ONE = 1


class Flag(enum.IntEnum):
    ON = 1


class MyStr(str):
    pass


@dataclasses.dataclass
class Point:
    x: int
    y: dt.date


UTC = dt.UTC


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (True, True),
        (0, 0),
        (-7, -7),
        (2**70, 2**70),
        (1.25, 1.25),
        ("é", "é"),
        ([], []),
        ({}, {}),
        ((1, "a"), [1, "a"]),
        ({"a": (1, 2)}, {"a": [1, 2]}),
        (dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "2024-01-02T03:04:05.000006+00:00"),
        (dt.date(2024, 1, 2), "2024-01-02"),
        (dt.time(3, 4, 5), "03:04:05"),
        (dt.timedelta(minutes=1, milliseconds=500), 60.5),
        (Decimal("1.10"), "1.10"),
        (uuid.UUID(int=255), "00000000-0000-0000-0000-0000000000ff"),
        (Color.RED, "red"),
        (Color.ONE, 1),
        (Flag.ON, 1),
        (MyStr("s"), "s"),
        (Point(1, dt.date(2024, 1, 1)), {"x": 1, "y": "2024-01-01"}),
        (OrderedDict(b=1, a=2), {"b": 1, "a": 2}),
        ({3, 1, 2}, [1, 2, 3]),
        (frozenset({"b", "a"}), ["a", "b"]),
        ({1: "int", None: "none", 1.5: "float"}, {"1": "int", "null": "none", "1.5": "float"}),
        ({True: "t", False: "f"}, {"true": "t", "false": "f"}),
    ],
    ids=repr,
)
def test_to_jsonable__converts(value: object, expected: Any) -> None:
    """Each supported type becomes its documented JSON form."""
    result = to_jsonable(value)
    assert result == expected
    json.dumps(result, allow_nan=False)


def test_to_jsonable__keys_written_as_json_dumps_writes_them() -> None:
    """Non-string keys become the same text json.dumps would give them."""
    value = {None: 1, True: 2, 3: 3, 2.5: 4}
    assert to_jsonable(value) == json.loads(json.dumps(value))


def test_to_jsonable__mixed_set_kept_unsorted() -> None:
    """A set whose items cannot be ordered still converts (in any order)."""
    assert sorted(map(str, to_jsonable({1, "a"}))) == ["1", "a"]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "path"),
    [
        (b"x", "payload"),
        (bytearray(b"x"), "payload"),
        (object(), "payload"),
        (float("nan"), "payload"),
        (float("-inf"), "payload"),
        (Decimal("Infinity"), "payload"),
        ({"a": {"b": [0, b"x"]}}, "payload.a.b[1]"),
        ([{"k": float("nan")}], "payload[0].k"),
        ({("t",): 1}, "dict key"),
        ({"f": lambda: 1}, "payload.f"),
    ],
    ids=["bytes", "bytearray", "object", "nan", "-inf", "decimal-inf", "nested", "nested-nan",
         "tuple-key", "function"],
)
def test_to_jsonable__unrepresentable_named(value: object, path: str) -> None:
    """What JSON cannot hold raises PayloadError whose message says where."""
    with pytest.raises(PayloadError) as info:
        to_jsonable(value)
    assert path in str(info.value)


def test_dumps__compact_and_unicode() -> None:
    """dumps writes compact JSON and keeps non-ASCII text as it is."""
    assert dumps({"a": [1, 2], "é": "ü"}) == '{"a":[1,2],"é":"ü"}'


def test_dumps__converts_like_to_jsonable() -> None:
    """dumps handles the same extra types."""
    assert loads(dumps({"d": Decimal("2.5"), "u": uuid.UUID(int=0)})) == {
        "d": "2.5", "u": "00000000-0000-0000-0000-000000000000"}


@pytest.mark.parametrize("value", [float("nan"), {"a": float("inf")}, b"x", object()])
def test_dumps__unrepresentable_raises_payload_error(value: object) -> None:
    """dumps raises PayloadError, never a bare ValueError or TypeError from json."""
    with pytest.raises(PayloadError):
        dumps(value)


def test_loads__text_and_bytes() -> None:
    """loads parses text and bytes."""
    assert loads('{"a": 1}') == loads(b'{"a": 1}') == {"a": 1}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(json_values)
def test_property__json_values_unchanged(value: object) -> None:
    """A value that already is JSON comes back equal, and survives dumps/loads."""
    assert to_jsonable(value) == value
    assert loads(dumps(value)) == value


def _nested(depth: int) -> object:
    value: object = 0
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_depth__max_depth_passes_one_more_is_refused() -> None:
    """Payloads nested MAX_DEPTH deep are accepted by set_payload, validate and clone; one level
    more is a PayloadError from both, never a RecursionError (issue 11, row 14)."""
    from sqlalchemy_eventbroker._json import MAX_DEPTH, check_storable, to_jsonable
    from sqlalchemy_eventbroker.errors import PayloadError
    from sqlalchemy_eventbroker.event import EventSource, new_event

    assert MAX_DEPTH == 100
    ok = new_event(EventSource.SYSTEM, "a.b.c", _nested(MAX_DEPTH))
    ok.validate()
    assert ok.clone().payload == ok.payload
    for deep in (_nested(MAX_DEPTH + 1), _nested(5000)):
        with pytest.raises(PayloadError, match="nested deeper than 100"):
            to_jsonable(deep)
        with pytest.raises(PayloadError, match="nested deeper than 100"):
            check_storable(deep)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [float("nan"), b"x", {1}, (1,), object(), "\ud800", {"a\x00": 1}, {2: 1}],
    ids=["nan", "bytes", "set", "tuple", "object", "surrogate", "nul-key", "int-key"],
)
def test_check_storable__refuses_what_is_not_plain_json(value: object) -> None:
    """The one payload check refuses every non-plain value with a PayloadError that names
    the path and never the value."""
    from sqlalchemy_eventbroker._json import check_storable
    from sqlalchemy_eventbroker.errors import PayloadError

    with pytest.raises(PayloadError) as info:
        check_storable({"v": [value]})  # type: ignore[dict-item]
    assert str(info.value).startswith("payload.v")
