"""The error tree: one base, stable codes, builtin mixins, messages and attributes."""

from __future__ import annotations

import pickle

import pytest

from sqlalchemy_eventbroker import errors
from sqlalchemy_eventbroker.errors import (
    BrokerError,
    BrokerStopped,
    ConfigError,
    EventValidationError,
    HandlerError,
    PatternError,
    PayloadError,
    ProviderError,
    PublishDepthExceeded,
    QueueFull,
    SubscriptionNotFound,
)

CODES = {
    BrokerError: "broker_error",
    BrokerStopped: "worker_pool_stopped",
    QueueFull: "queue_full",
    PatternError: "invalid_pattern",
    PayloadError: "invalid_payload",
    EventValidationError: "invalid_event",
    SubscriptionNotFound: "subscription_not_found",
    HandlerError: "handler_failed",
    ConfigError: "invalid_config",
    ProviderError: "provider_error",
    PublishDepthExceeded: "publish_depth_exceeded",
}


@pytest.mark.parametrize(("cls", "code"), CODES.items(), ids=lambda v: getattr(v, "__name__", v))
def test_code__stable_per_class(cls: type[BrokerError], code: str) -> None:
    """Each error class has its documented .code, on the class and on instances."""
    assert cls.code == code
    assert cls().code == code


def test_codes__unique() -> None:
    """No two error classes share a code."""
    assert len(set(CODES.values())) == len(CODES)


@pytest.mark.parametrize("cls", list(CODES)[1:], ids=lambda c: c.__name__)
def test_hierarchy__all_subclass_broker_error(cls: type[BrokerError]) -> None:
    """Every error is a BrokerError, so one except clause catches them all."""
    assert issubclass(cls, BrokerError) and issubclass(cls, Exception)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (PatternError, ValueError),
        (PayloadError, TypeError),
        (EventValidationError, ValueError),
        (PublishDepthExceeded, RecursionError),
        (SubscriptionNotFound, LookupError),
        (ConfigError, ValueError),
    ],
    ids=lambda v: v.__name__,
)
def test_hierarchy__builtin_mixins(cls: type[BrokerError], builtin: type[Exception]) -> None:
    """Errors users already catch as builtins keep being caught that way."""
    assert issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("x")


def test_hierarchy__not_key_error() -> None:
    """SubscriptionNotFound is a LookupError but not a KeyError (which quotes its message)."""
    assert not issubclass(SubscriptionNotFound, KeyError)
    assert str(SubscriptionNotFound("no subscription 'x'")) == "no subscription 'x'"


def test_all__lists_every_error() -> None:
    """errors.__all__ names exactly the error classes, sorted."""
    assert errors.__all__ == sorted(c.__name__ for c in CODES)


@pytest.mark.parametrize("cls", list(CODES), ids=lambda c: c.__name__)
def test_message__docstring_is_default(cls: type[BrokerError]) -> None:
    """Raised bare, an error says the first line of its docstring."""
    assert cls.__doc__ is not None
    first = cls.__doc__.strip().splitlines()[0]
    assert str(cls()) == first == cls().message


def test_message__given_text_kept() -> None:
    """A given message is the str() and .message."""
    err = QueueFull("queue of 10 is full")
    assert str(err) == err.message == "queue of 10 is full"


def test_attributes__context_kept() -> None:
    """Context travels in attributes: .pattern, .field, .path, .subscription_id, .failures."""
    assert PatternError("bad", pattern="a..b").pattern == "a..b"
    assert EventValidationError("bad", field="type").field == "type"
    assert ConfigError("bad", path="event_broker.mode").path == "event_broker.mode"
    assert SubscriptionNotFound(subscription_id="s1").subscription_id == "s1"
    boom = RuntimeError("boom")
    err = HandlerError("failed", event_id="e1", failures=[("s1", boom)])
    assert err.event_id == "e1" and err.failures == [("s1", boom)]


def test_attributes__defaults() -> None:
    """Context attributes default to empty."""
    assert ConfigError().path == "" and HandlerError().failures == []
    assert PatternError().pattern == "" and EventValidationError().field == ""


def test_handler_error__failures_copied() -> None:
    """HandlerError keeps its own list of failures."""
    failures = [("s1", ValueError("x"))]
    err = HandlerError(failures=failures)
    failures.clear()
    assert len(err.failures) == 1


@pytest.mark.parametrize("err", [QueueFull("q"), BrokerError(), ProviderError("redis at x: y")],
                         ids=lambda e: type(e).__name__)
def test_pickle__round_trip(err: BrokerError) -> None:
    """Errors without required context survive pickling (e.g. across processes)."""
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
