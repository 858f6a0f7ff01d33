"""RetryPolicy: defaults, the capped exponential delay, jitter, and checked arguments."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqlalchemy_eventbroker.errors import ConfigError
from sqlalchemy_eventbroker.retry import RetryPolicy


def test_defaults__three_retries_one_second_thirty_cap_doubling() -> None:
    """RetryPolicy() is 3 retries, 1 s, capped at 30 s, x2.0, no jitter."""
    p = RetryPolicy()
    assert (p.max_retries, p.initial_delay, p.max_delay, p.backoff_factor, p.jitter) == (
        3, 1.0, 30.0, 2.0, False)


def test_constructor__positional_arguments() -> None:
    """The four numbers may be given positionally, in contract order."""
    assert RetryPolicy(5, 0.5, 10.0, 3.0) == RetryPolicy(
        max_retries=5, initial_delay=0.5, max_delay=10.0, backoff_factor=3.0)


def test_frozen__cannot_change() -> None:
    """A policy is immutable and hashable."""
    p = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_retries = 1  # type: ignore[misc]
    assert hash(p) == hash(RetryPolicy())


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 30.0), (50, 30.0)],
)
def test_delay__doubles_then_caps(attempt: int, seconds: float) -> None:
    """Retry n waits min(initial * factor ** (n - 1), max_delay)."""
    assert RetryPolicy().delay(attempt) == seconds


@pytest.mark.parametrize("attempt", [0, -1])
def test_delay__no_wait_before_first_retry(attempt: int) -> None:
    """Attempts below 1 wait nothing."""
    assert RetryPolicy().delay(attempt) == 0.0


def test_delay__huge_attempt_does_not_overflow() -> None:
    """A very large attempt number gives the cap rather than an OverflowError."""
    assert RetryPolicy(initial_delay=1.0, max_delay=7.0, backoff_factor=10.0).delay(10_000) == 7.0


def test_delay__factor_one_is_constant() -> None:
    """backoff_factor 1 gives the same delay every time."""
    p = RetryPolicy(initial_delay=0.25, backoff_factor=1.0)
    assert [p.delay(n) for n in (1, 2, 10)] == [0.25, 0.25, 0.25]


def test_delay__zero_delays() -> None:
    """initial_delay 0 retries at once."""
    assert RetryPolicy(initial_delay=0.0).delay(3) == 0.0


@given(
    st.floats(min_value=0, max_value=100),
    st.floats(min_value=0, max_value=1000),
    st.floats(min_value=1, max_value=10),
    st.integers(min_value=1, max_value=200),
)
def test_delay__formula_property(initial: float, cap: float, factor: float, n: int) -> None:
    """For any valid policy the delay follows the formula and never exceeds the cap."""
    p = RetryPolicy(initial_delay=initial, max_delay=cap, backoff_factor=factor)
    d = p.delay(n)
    assert 0 <= d <= cap
    try:
        expected = min(initial * factor ** (n - 1), cap)
    except OverflowError:
        expected = cap
    assert d == pytest.approx(expected)


@given(st.integers(min_value=1, max_value=40))
def test_delay__jitter_within_half_to_full(n: int) -> None:
    """With jitter, each delay lies in [delay / 2, delay]."""
    plain = RetryPolicy().delay(n)
    jittered = RetryPolicy(jitter=True).delay(n)
    assert plain / 2 <= jittered <= plain


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"max_retries": -1}, "retry_policy.max_retries"),
        ({"max_retries": 1.5}, "retry_policy.max_retries"),
        ({"max_retries": True}, "retry_policy.max_retries"),
        ({"initial_delay": -0.1}, "retry_policy.initial_delay"),
        ({"initial_delay": "1s"}, "retry_policy.initial_delay"),
        ({"max_delay": -1}, "retry_policy.max_delay"),
        ({"backoff_factor": 0.5}, "retry_policy.backoff_factor"),
        ({"backoff_factor": False}, "retry_policy.backoff_factor"),
    ],
)
def test_constructor__bad_values_name_the_field(kwargs: dict[str, object], path: str) -> None:
    """A wrong argument raises ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: expected")


def test_constructor__zero_retries_allowed() -> None:
    """max_retries=0 means a failure is final at once."""
    assert RetryPolicy(max_retries=0).max_retries == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("field", ["initial_delay", "max_delay", "backoff_factor"])
def test_constructor__nan_and_infinity_refused(field: str, value: float) -> None:
    """NaN and infinity are refused at construction, naming the field (issue 11, row 12)."""
    with pytest.raises(ConfigError) as info:
        RetryPolicy(**{field: value})  # type: ignore[arg-type]
    assert info.value.path == f"retry_policy.{field}"
    assert "finite" in str(info.value)
