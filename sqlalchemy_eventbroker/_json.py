"""The one JSON encoder: turns Python values into what JSON can hold.

Every payload, ORM row and stored event passes through here, so it is written for speed on
the common case (str, int, float, bool, None, dict, list) and strict on the rest: a value
JSON cannot hold raises :class:`PayloadError` at the point where the user handed it to us,
never later inside a provider.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from ._types import JSON
from .errors import PayloadError

__all__ = ["check_storable", "copy_json", "dumps", "loads", "to_jsonable"]

_SCALARS = (str, int, bool, type(None))


def to_jsonable(value: object, _path: str = "payload") -> JSON:
    """Return the JSON form of ``value``.

    datetimes, dates and times become ISO-8601 strings, ``Decimal`` and ``UUID`` strings,
    enums their value, dataclasses dicts, tuples and sets lists.

    Raises:
        PayloadError: ``value`` holds something JSON cannot represent (bytes, an arbitrary
            object, a non-finite float, a non-string dict key); the message names where.
    """
    cls = type(value)
    if cls in _SCALARS:
        return value  # type: ignore[return-value]
    if cls is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise PayloadError(f"{_path}: {value!r} is not a finite number and JSON cannot hold it")
        return value  # type: ignore[return-value]
    if cls is dict:
        out: dict[str, JSON] = {}
        for k, v in value.items():  # type: ignore[attr-defined]
            out[_key(k, _path)] = to_jsonable(v, f"{_path}.{k}")
        return out
    if cls is list or cls is tuple:
        seq: list[object] | tuple[object, ...] = value  # type: ignore[assignment]
        return [to_jsonable(v, f"{_path}[{i}]") for i, v in enumerate(seq)]
    return _convert(value, _path)


def _key(key: object, path: str) -> str:
    if isinstance(key, str):
        return key
    # Non-string keys are written as json.dumps writes them: true/false/null, not Python's.
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, (int, float, uuid.UUID, Decimal)):
        return str(key)
    raise PayloadError(f"{path}: a dict key of type {type(key).__name__} is not a string")


def _convert(value: object, path: str) -> JSON:
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, path)
    if isinstance(value, bool | int | str):
        return value  # subclasses of the scalars
    if isinstance(value, float):
        return to_jsonable(float(value), path)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise PayloadError(f"{path}: {value!r} is not a finite number and JSON cannot hold it")
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(
            {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, path
        )
    if isinstance(value, Mapping):
        return {_key(k, path): to_jsonable(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        items = [to_jsonable(v, f"{path}[]") for v in value]
        try:
            items.sort()  # type: ignore[type-var,unused-ignore]
        except TypeError:
            pass
        return items
    # The type, never the value: error messages and logs carry no payload data.
    raise PayloadError(f"{path}: a {type(value).__name__} value is not JSON serializable")


_NUL = "\x00"


def check_storable(value: JSON, path: str = "payload") -> None:
    """Refuse a JSON value that some backend cannot store, the same way on every backend.

    U+0000 (NUL) in a string or a key is the one such value: PostgreSQL ``jsonb`` cannot
    hold it, so one NUL would fail a whole outbox statement there. Refusing it everywhere
    keeps an event's fate independent of the provider it happens to travel through.

    Raises:
        PayloadError: naming the path of the offending string (never its text).
    """
    cls = type(value)
    if cls is str:
        if _NUL in value:  # type: ignore[operator]
            raise PayloadError(f"{path}: a string holds U+0000 (NUL), which is refused on "
                               f"every backend (PostgreSQL jsonb cannot store it)")
    elif cls is dict:
        for k, v in value.items():  # type: ignore[union-attr]
            if _NUL in k:
                raise PayloadError(f"{path}: a key holds U+0000 (NUL), which is refused on "
                                   f"every backend (PostgreSQL jsonb cannot store it)")
            t = type(v)
            if (t is str and _NUL in v) or t is dict or t is list:  # type: ignore[operator]
                check_storable(v, f"{path}.{k}")
    elif cls is list:
        for i, v in enumerate(value):  # type: ignore[arg-type]
            t = type(v)
            if (t is str and _NUL in v) or t is dict or t is list:  # type: ignore[operator]
                check_storable(v, f"{path}[{i}]")



def _default(value: object) -> Any:
    return _convert(value, "payload")


def dumps(value: object) -> str:
    """Compact JSON text of ``value``, converting as :func:`to_jsonable` does."""
    try:
        return json.dumps(value, separators=(",", ":"), default=_default, allow_nan=False,
                          ensure_ascii=False)
    except ValueError as exc:
        raise PayloadError(f"payload: {exc}") from exc


def loads(text: str | bytes) -> Any:
    """Parse JSON text."""
    return json.loads(text)


def copy_json(value: JSON) -> JSON:
    """A deep copy of a JSON value, several times faster than ``copy.deepcopy``.

    Only dicts and lists are copied; everything else in a JSON value is immutable.
    """
    cls = type(value)
    if cls is dict:
        return {k: (v if type(v) not in _CONTAINERS else copy_json(v))
                for k, v in value.items()}  # type: ignore[union-attr]
    if cls is list:
        return [v if type(v) not in _CONTAINERS else copy_json(v) for v in value]  # type: ignore[union-attr]
    return value


_CONTAINERS = (dict, list)
