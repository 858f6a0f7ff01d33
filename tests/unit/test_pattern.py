"""Subscription patterns: the API.md table, invalid patterns, and Hypothesis properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sqlalchemy_eventbroker.errors import PatternError
from sqlalchemy_eventbroker.pattern import compile_pattern, matches, validate_pattern

TABLE = [
    # pattern, event type, matches?
    ("*", "public.users.create", True),
    ("*", "anything", True),
    ("*", "a.b.c.d.e", True),
    ("public.users.*", "public.users.create", True),
    ("public.users.*", "public.users", False),
    ("public.users.*", "public.users.create.extra", False),
    ("public.users.*", "public.orders.create", False),
    ("*.*.create", "auth.sessions.create", True),
    ("*.*.create", "auth.sessions.delete", False),
    ("*.*.create", "sessions.create", False),
    ("*.users.*", "public.users.update", True),
    ("public.**", "public.users", True),
    ("public.**", "public.users.create", True),
    ("public.**", "public.users.create.extra.more", True),
    ("public.**", "public", False),
    ("public.**", "other.users.create", False),
    ("public.*.**", "public.users.create", True),
    ("public.*.**", "public.users", False),
    ("**", "a", True),
    ("**", "a.b.c", True),
    ("public.users.create", "public.users.create", True),
    ("public.users.create", "Public.users.create", False),
    ("public.users.create", "public.users.CREATE", False),
    ("public.users.create", "public.users.create.x", False),
    ("users", "users", True),
    ("users", "users.create", False),
]


@pytest.mark.parametrize(("pattern", "event_type", "expected"), TABLE)
def test_matches__api_table(pattern: str, event_type: str, expected: bool) -> None:
    """matches() follows the rules of API.md section 2."""
    assert matches(pattern, event_type) is expected
    assert compile_pattern(pattern)(event_type) is expected


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("", "empty"),
        ("a..b", "empty segment"),
        (".a", "empty segment"),
        ("a.", "empty segment"),
        ("**.a", "'**' may only be the last segment"),
        ("a.**.b", "'**' may only be the last segment"),
        ("us*rs", "'*' must be a whole segment"),
        ("public.users*", "'*' must be a whole segment"),
        ("*a", "'*' must be a whole segment"),
        ("***", "'*' must be a whole segment"),
        ("a.***", "'*' must be a whole segment"),
    ],
)
def test_compile_pattern__invalid_raises(pattern: str, says: str) -> None:
    """Malformed patterns raise PatternError (a ValueError) carrying the pattern."""
    with pytest.raises(PatternError) as info:
        compile_pattern(pattern)
    assert says in str(info.value)
    assert info.value.pattern == pattern
    assert isinstance(info.value, ValueError)
    with pytest.raises(PatternError):
        matches(pattern, "a.b")


@pytest.mark.parametrize("pattern", [None, 3, b"a.b"])
def test_compile_pattern__non_string_raises(pattern: object) -> None:
    """A pattern that is not a str raises PatternError."""
    with pytest.raises(PatternError, match="must be a string"):
        compile_pattern(pattern)  # type: ignore[arg-type]


def test_validate_pattern__returns_segments() -> None:
    """validate_pattern splits a valid pattern into its segments."""
    assert validate_pattern("public.*.**") == ["public", "*", "**"]


def test_compile_pattern__reusable_and_cached() -> None:
    """A compiled matcher is reusable; compiling the same pattern again gives the same one."""
    m = compile_pattern("a.*")
    assert m("a.b") and m("a.c") and not m("b.c")
    assert compile_pattern("a.*") is m


# -- properties ----------------------------------------------------------------------------------

segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789_-", min_size=1, max_size=8)
segments = st.lists(segment, min_size=1, max_size=6)


def reference(pattern: str, event_type: str) -> bool:
    """An independent, regex-based reading of the rules."""
    if pattern == "*":
        return True
    parts = []
    for seg in pattern.split("."):
        if seg == "*":
            parts.append(r"[^.]+")
        elif seg == "**":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(seg))
    return re.fullmatch(r"\.".join(parts), event_type) is not None


@given(segments)
def test_property__type_matches_itself(parts: list[str]) -> None:
    """A type used as a pattern matches exactly itself."""
    t = ".".join(parts)
    assert matches(t, t)


@given(segments, st.data())
def test_property__stars_replacing_segments_still_match(parts: list[str], data: st.DataObject) -> None:
    """Replacing any segments of a type with '*' gives a pattern that matches it."""
    mask = data.draw(st.lists(st.booleans(), min_size=len(parts), max_size=len(parts)))
    pattern = ".".join("*" if star else p for p, star in zip(parts, mask, strict=True))
    assert matches(pattern, ".".join(parts))


@given(segments, st.data())
def test_property__double_star_tail_matches(parts: list[str], data: st.DataObject) -> None:
    """Replacing the last k >= 1 segments with '**' gives a pattern that matches."""
    k = data.draw(st.integers(min_value=1, max_value=len(parts)))
    pattern = ".".join([*parts[: len(parts) - k], "**"])
    assert matches(pattern, ".".join(parts))


@given(segments, segment)
def test_property__extra_segment_breaks_exact_match(parts: list[str], extra: str) -> None:
    """A pattern without '**' never matches a type with one more segment."""
    pattern = ".".join(parts)
    assume(pattern != "*")
    assert not matches(pattern, f"{pattern}.{extra}")
    starred = ".".join("*" for _ in parts)
    assume(starred != "*")
    assert not matches(starred, f"{pattern}.{extra}")


@given(segments)
def test_property__double_star_needs_one_segment(parts: list[str]) -> None:
    """'prefix.**' does not match the bare prefix."""
    prefix = ".".join(parts)
    assert not matches(f"{prefix}.**", prefix)


@given(
    st.lists(st.one_of(segment, st.just("*")), min_size=1, max_size=5),
    st.booleans(),
    segments,
)
def test_property__agrees_with_reference(pattern_parts: list[str], tail: bool,
                                         type_parts: list[str]) -> None:
    """matches() agrees with an independent regex reading of the rules."""
    pattern = ".".join([*pattern_parts, "**"] if tail else pattern_parts)
    event_type = ".".join(type_parts)
    assert matches(pattern, event_type) == reference(pattern, event_type)


@given(segments, st.data())
def test_property__agrees_with_reference_on_near_misses(parts: list[str],
                                                       data: st.DataObject) -> None:
    """Patterns derived from the type, with one segment changed, agree with the reference."""
    i = data.draw(st.integers(min_value=0, max_value=len(parts) - 1))
    changed = [*parts]
    changed[i] = data.draw(st.one_of(segment, st.just("*")))
    pattern = ".".join(changed)
    assert matches(pattern, ".".join(parts)) == reference(pattern, ".".join(parts))


@given(segments, st.integers(min_value=0, max_value=5), st.sampled_from(["", "**", "a*", "*b"]))
def test_property__invalid_patterns_raise(parts: list[str], where: int, bad: str) -> None:
    """Inserting an empty segment, a non-final '**' or a partial '*' makes a pattern invalid."""
    where = min(where, len(parts) - 1)
    broken = [*parts[:where], bad, *parts[where:]]  # bad is never last
    with pytest.raises(PatternError):
        compile_pattern(".".join(broken))
