"""Subscription patterns over dot-separated event types. Pure, no I/O.

``*`` alone matches every type; otherwise ``*`` matches exactly one whole segment and ``**``
(last only) one or more trailing segments; anything else matches literally and
case-sensitively. Patterns are checked when compiled, so a bad one fails at ``subscribe``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from .errors import PatternError

__all__ = ["Matcher", "compile_pattern", "matches", "validate_pattern"]

#: A compiled pattern: call it with an event type.
Matcher = Callable[[str], bool]


def validate_pattern(pattern: str) -> list[str]:
    """Split ``pattern`` into segments, raising :class:`PatternError` if it is malformed."""
    if not isinstance(pattern, str):
        raise PatternError(
            f"pattern must be a string, got {type(pattern).__name__}", pattern=str(pattern)
        )
    if not pattern:
        raise PatternError("pattern '' is empty", pattern=pattern)
    segments = pattern.split(".")
    for i, seg in enumerate(segments):
        if not seg:
            raise PatternError(f"pattern {pattern!r} has an empty segment", pattern=pattern)
        if seg == "**":
            if i != len(segments) - 1:
                raise PatternError(
                    f"pattern {pattern!r}: '**' may only be the last segment", pattern=pattern
                )
        elif "*" in seg and seg != "*":
            raise PatternError(
                f"pattern {pattern!r}: '*' must be a whole segment, not part of {seg!r}",
                pattern=pattern,
            )
    return segments


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Matcher:
    """Compile ``pattern`` into a reusable matcher ``(event_type) -> bool``.

    Raises:
        PatternError: the pattern is empty, has an empty segment, a ``**`` that is not last,
            or a ``*`` mixed into a segment.
    """
    segments = validate_pattern(pattern)
    if pattern == "*":
        return lambda event_type: True
    if "*" not in pattern:
        return pattern.__eq__
    trailing = segments[-1] == "**"
    fixed = segments[:-1] if trailing else segments
    n = len(fixed)
    checks = [(i, seg) for i, seg in enumerate(fixed) if seg != "*"]

    def match(event_type: str) -> bool:
        parts = event_type.split(".")
        if trailing:
            if len(parts) <= n:
                return False
        elif len(parts) != n:
            return False
        return all(parts[i] == seg for i, seg in checks)

    match.__name__ = f"match_{pattern}"
    return match


def matches(pattern: str, event_type: str) -> bool:
    """Whether ``event_type`` matches ``pattern`` (see the module docstring for the rules).

    Raises:
        PatternError: the pattern is malformed.
    """
    return compile_pattern(pattern)(event_type)
