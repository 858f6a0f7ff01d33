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
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from ._types import JSON
from .errors import PayloadError

__all__ = ["MAX_DEPTH", "check_storable", "copy_json", "dumps", "loads", "to_jsonable"]

_SCALARS = (str, int, bool, type(None))


def to_jsonable(value: object, _path: str = "payload", _depth: int = 0) -> JSON:
    """Return the JSON form of ``value``.

    datetimes, dates and times become ISO-8601 strings, ``Decimal`` and ``UUID`` strings,
    enums their value, dataclasses dicts, tuples and sets lists.

    Raises:
        PayloadError: ``value`` holds something JSON cannot represent (bytes, an arbitrary
            object, a non-finite float, a non-string dict key) or is nested deeper than
            :data:`MAX_DEPTH`; the message names where.
    """
    cls = type(value)
    if cls in _SCALARS:
        return value  # type: ignore[return-value]
    if cls is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise PayloadError(f"{_path}: {value!r} is not a finite number and JSON cannot hold it")
        return value  # type: ignore[return-value]
    if cls is dict:
        if _depth >= MAX_DEPTH:
            raise _too_deep(_path)
        out: dict[str, JSON] = {}
        for k, v in value.items():  # type: ignore[attr-defined]
            out[_key(k, _path)] = to_jsonable(v, f"{_path}.{k}", _depth + 1)
        return out
    if cls is list or cls is tuple:
        if _depth >= MAX_DEPTH:
            raise _too_deep(_path)
        seq: list[object] | tuple[object, ...] = value  # type: ignore[assignment]
        return [to_jsonable(v, f"{_path}[{i}]", _depth + 1) for i, v in enumerate(seq)]
    return _convert(value, _path, _depth)


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


def _convert(value: object, path: str, depth: int = 0) -> JSON:
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, path, depth)
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
    if depth >= MAX_DEPTH and isinstance(value, Mapping | list | tuple | set | frozenset):
        raise _too_deep(path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(
            {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, path, depth
        )
    if isinstance(value, Mapping):
        return {_key(k, path): to_jsonable(v, f"{path}.{k}", depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        items = [to_jsonable(v, f"{path}[]", depth + 1) for v in value]
        try:
            items.sort()  # type: ignore[type-var,unused-ignore]
        except TypeError:
            pass
        return items
    # The type, never the value: error messages and logs carry no payload data.
    raise PayloadError(f"{path}: a {type(value).__name__} value is not JSON serializable")


#: The deepest nesting of dicts and lists a payload or metadata may have: the outermost
#: container is level 1. Deeper values are refused with :class:`PayloadError` on every
#: provider, before Python's recursion limit could turn them into a ``RecursionError``
#: anywhere on the way (encoding, copying for each handler, decoding on another host).
MAX_DEPTH = 100

_NUL = "\x00"
_SURROGATE = re.compile("[\ud800-\udfff]").search
_PLAIN = frozenset((int, bool, type(None)))


def _bad_text(text: str) -> str | None:
    # NUL: PostgreSQL jsonb cannot store it. A lone surrogate: no UTF-8 form, so no backend
    # can store or send it. The ASCII test first: it is what nearly every string is.
    if _NUL in text:
        return "U+0000 (NUL), which PostgreSQL jsonb cannot store"
    if not text.isascii() and _SURROGATE(text) is not None:
        return "a lone surrogate (U+D800..U+DFFF), which has no UTF-8 form"
    return None


def check_storable(value: object, path: str = "payload", _depth: int = 0) -> None:
    """Refuse what is not plain, storable JSON, the same way on every provider.

    The one payload check, run where an event is handed over (``Event.validate``, hence every
    publish) and where it is rebuilt (``Event.from_dict``). Plain JSON is ``dict`` (``str``
    keys), ``list``, ``str``, ``int``, finite ``float``, ``bool`` and ``None``, nested at most
    :data:`MAX_DEPTH` deep; strings (and keys) must not hold U+0000 or a lone surrogate.
    Anything else (NaN, bytes, a set, a tuple, any other object) is refused: convert it with
    ``Event.set_payload`` first. Refusing it everywhere keeps an event's fate independent of
    the provider it happens to travel through.

    Raises:
        PayloadError: naming the path of the offending value (never its text).
    """
    bad = _walk(value, _depth)
    if bad is not None:
        reason, where = bad
        steps = "".join(f"[{k}]" if type(k) is int else f".{k}" for k in reversed(where))
        raise PayloadError(f"{path}{steps}: {reason}")


_Bad = tuple[str, list[str | int]]


def _walk(value: object, depth: int) -> _Bad | None:
    """The first thing :func:`check_storable` refuses in ``value``: ``(reason, the path's
    steps innermost first)``, or None. The path is built only on the way out of a failure,
    so a good payload costs no string formatting at all."""
    cls = type(value)
    if cls is dict:
        if depth >= MAX_DEPTH:
            return _TOO_DEEP, []
        for k, v in value.items():  # type: ignore[attr-defined]
            if k.__class__ is not str:
                return f"a dict key of type {type(k).__name__} is not a str", []
            if _NUL in k or not k.isascii():
                text = _bad_text(k)
                if text is not None:
                    return f"a key holds {text}; refused on every backend", []
            t = v.__class__
            if t is str:
                if _NUL in v or not v.isascii():
                    text = _bad_text(v)
                    if text is not None:
                        return f"a string holds {text}; refused on every backend", [k]
            elif t is float:
                if v - v != 0:  # inf - inf and nan - nan are nan; finite - itself is 0
                    return f"{v!r} is not a finite number and JSON cannot hold it", [k]
            elif t not in _PLAIN:
                bad = _walk(v, depth + 1)
                if bad is not None:
                    bad[1].append(k)
                    return bad
    elif cls is list:
        if depth >= MAX_DEPTH:
            return _TOO_DEEP, []
        for i, v in enumerate(value):  # type: ignore[arg-type]
            t = v.__class__
            if t is str:
                if _NUL in v or not v.isascii():
                    text = _bad_text(v)
                    if text is not None:
                        return f"a string holds {text}; refused on every backend", [i]
            elif t is float:
                if v - v != 0:
                    return f"{v!r} is not a finite number and JSON cannot hold it", [i]
            elif t not in _PLAIN:
                bad = _walk(v, depth + 1)
                if bad is not None:
                    bad[1].append(i)
                    return bad
    elif cls is str:
        text = _bad_text(value)  # type: ignore[arg-type]
        if text is not None:
            return f"a string holds {text}; refused on every backend", []
    elif cls is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            return f"{value!r} is not a finite number and JSON cannot hold it", []
    elif cls not in _PLAIN:
        # The type, never the value: error messages and logs carry no payload data.
        return (f"a {cls.__name__} is not plain JSON (dict, list, str, int, float, bool, "
                f"None); convert it with Event.set_payload"), []
    return None


_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels of dicts and lists"


def _check_text(text: str, path: str) -> None:
    bad = _bad_text(text)
    if bad is not None:
        raise PayloadError(f"{path}: a string holds {bad}; refused on every backend")


def _too_deep(path: str) -> PayloadError:
    return PayloadError(f"{path}: nested deeper than {MAX_DEPTH} levels of dicts and lists")


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
