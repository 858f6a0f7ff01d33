"""Fixtures for broker tests: brokers stopped at teardown, deadline polling, quick retries."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sqlalchemy_eventbroker import Broker, MemoryProvider, RetryPolicy

#: Retries that keep tests fast; tests about delays build their own policy.
QUICK_RETRIES = RetryPolicy(max_retries=2, initial_delay=0.01, max_delay=0.02)

Waiter = Callable[..., None]


def _wait_for(condition: Callable[[], object], timeout: float = 10.0,
              message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.005)


@pytest.fixture
def wait_for() -> Waiter:
    """``wait_for(condition, timeout=10, message=...)``: poll until true, fail at the deadline."""
    return _wait_for


@pytest.fixture
def make_broker() -> Iterator[Callable[..., Broker]]:
    """Build started brokers (each with its own metrics registry).

    At teardown every broker is stopped, then every provider they used is closed.
    """
    made: list[Broker] = []
    providers: list[Any] = []

    def make(start: bool = True, **kwargs: Any) -> Broker:
        if "provider" not in kwargs:
            kwargs["provider"] = MemoryProvider()
        providers.append(kwargs["provider"])
        kwargs.setdefault("retry_policy", QUICK_RETRIES)
        kwargs.setdefault("registry", CollectorRegistry())
        kwargs.setdefault("worker_count", 4)
        broker = Broker(**kwargs)
        made.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in made:
        broker.stop(timeout=5)
    for provider in providers:
        provider.close()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Both processing modes."""
    return str(request.param)
