"""Helpers for testing code that publishes or handles events.

``EventRecorder`` is a handler that keeps what it receives and lets a test wait for it
without sleeping::

    recorder = EventRecorder()
    broker.subscribe("public.users.*", recorder)
    ...
    events = recorder.wait_for(3, timeout=5)     # raises AssertionError on timeout
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .event import Event

__all__ = ["EventRecorder"]


class EventRecorder:
    """A thread-safe handler that records every event it is called with."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    @property
    def events(self) -> list[Event]:
        """A snapshot of the events received so far, in arrival order."""
        with self._cond:
            return list(self._events)

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def __len__(self) -> int:
        with self._cond:
            return len(self._events)

    def clear(self) -> None:
        with self._cond:
            self._events.clear()

    def wait_until(
        self, condition: Callable[[list[Event]], bool], timeout: float = 10.0
    ) -> list[Event]:
        """Wait until ``condition(events)`` holds; return the events.

        Raises:
            AssertionError: ``timeout`` seconds passed first (the message shows what arrived).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition(self._events):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s; received {len(self._events)} events: "
                        f"{[e.type for e in self._events][:20]}"
                    )
                self._cond.wait(remaining)
            return list(self._events)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Event]:
        """Wait until at least ``count`` events arrived; return them."""
        return self.wait_until(lambda events: len(events) >= count, timeout)
