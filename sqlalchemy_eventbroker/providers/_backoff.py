"""Capped exponential backoff between reconnection attempts."""

from __future__ import annotations

__all__ = ["Backoff"]


class Backoff:
    """Delays of ``base``, ``2 * base``, ``4 * base``, ... up to ``cap`` seconds.

    Not thread-safe: one per reconnecting loop. ``reset()`` after a success starts over.
    """

    def __init__(self, cap: float, base: float = 0.05) -> None:
        self.cap = cap
        self.base = base
        self.failures = 0

    def next(self) -> float:
        """The delay before the next attempt (and count one more failure)."""
        delay = min(self.cap, self.base * 2.0**self.failures)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
