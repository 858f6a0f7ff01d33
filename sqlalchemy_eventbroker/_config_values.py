"""Checkers for configuration values: each takes the raw value and its dotted path and
returns the normalised value or raises :class:`~sqlalchemy_eventbroker.errors.ConfigError`.

Kept apart from ``config.py`` so that module reads as the shape of a configuration and this
one as the rules for a single value. The config dataclasses run these in ``__post_init__``,
so objects built in Python are checked exactly like loaded ones.
"""

from __future__ import annotations

import math
import re
import reprlib

from .errors import ConfigError

__all__ = ["as_bool", "as_choice", "as_float", "as_int", "as_str", "fail", "parse_duration",
           "set_field"]

# -- value checkers ------------------------------------------------------------------------
#
# Each takes the raw value and its dotted path and returns the normalised value or raises
# ConfigError. The dataclasses run them in __post_init__, so objects built in Python are
# checked exactly like loaded ones.


_SHORT = reprlib.Repr()
_SHORT.maxstring = 80
_SHORT.maxother = 80
_SHORT.maxlevel = 3


def fail(path: str, expected: str, value: object) -> ConfigError:
    # A bounded repr: the value may be huge, deeply nested or full of shared references.
    return ConfigError(f"{path}: expected {expected}, got {_SHORT.repr(value)}", path=path)


def as_int(value: object, path: str, *, minimum: int, maximum: int | None = None) -> int:
    expected = f"int >= {minimum}" if maximum is None else f"int from {minimum} to {maximum}"
    result: int
    if isinstance(value, bool):
        raise fail(path, expected, value)
    if isinstance(value, int):
        result = value
    elif (isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value)
    ):
        result = int(value)
    else:
        raise fail(path, expected, value)
    if result < minimum or (maximum is not None and result > maximum):
        raise fail(path, expected, value)
    return result


def as_float(value: object, path: str, *, minimum: float) -> float:
    expected = f"a number >= {minimum:g}"
    result: float
    if isinstance(value, bool):
        raise fail(path, expected, value)
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value)
        except ValueError:
            raise fail(path, expected, value) from None
    else:
        raise fail(path, expected, value)
    if not math.isfinite(result) or result < minimum:
        raise fail(path, expected, value)
    return result


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def as_bool(value: object, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise fail(path, "a boolean (true or false)", value)


def as_str(value: object, path: str, *, required: bool = True) -> str:
    # Numbers are accepted because YAML turns `instance_id: 42` into an int.
    if isinstance(value, bool) or (value is not None and not isinstance(value, str | int | float)):
        raise fail(path, "a string", value)
    text = "" if value is None else str(value)
    if required and not text.strip():
        raise fail(path, "a non-empty string", value)
    return text


def as_choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    expected = "one of " + ", ".join(choices)
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise fail(path, expected, value)


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_DURATION_EXPECTED = "a duration (seconds, or a number with ms, s, m, h or d such as '500ms' or '2m')"


def parse_duration(value: object, path: str = "duration", *, positive: bool = False) -> float:
    """Seconds in ``value``: a number, or a string such as ``"500ms"``, ``"1s"``, ``"2m"``,
    ``"24h"``, ``"1d"`` (a bare number string means seconds).

    Raises:
        ConfigError: the value is not a duration, or is negative (or zero when ``positive``).
    """
    expected = _DURATION_EXPECTED + (" > 0" if positive else "")
    seconds: float
    if isinstance(value, bool):
        raise fail(path, expected, value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise fail(path, expected, value)
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        raise fail(path, expected, value)
    return seconds


def set_field(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


