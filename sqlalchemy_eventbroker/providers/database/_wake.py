"""Local wake-ups between the provider's own threads, and capped backoff."""

from __future__ import annotations

import threading

__all__ = ["Waker"]


class Waker:
    """A generation counter readers wait on: "something may have changed, look again".

    A reader takes :meth:`generation` BEFORE it looks, and then :meth:`wait` returns at once
    if anything woke in between, so no wake-up is ever missed between the look and the wait.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._gen = 0
        self._closed = False

    def generation(self) -> int:
        with self._cond:
            return self._gen

    def wake(self) -> None:
        """Wake every waiting reader (cheap; called from any thread)."""
        with self._cond:
            self._gen += 1
            self._cond.notify_all()

    def wait(self, gen: int, timeout: float) -> None:
        """Wait up to ``timeout`` seconds unless a wake-up came after ``gen`` was taken."""
        with self._cond:
            if self._gen == gen and not self._closed:
                self._cond.wait(timeout)

    def close(self) -> None:
        """Wake everyone, and never wait again."""
        with self._cond:
            self._closed = True
            self._gen += 1
            self._cond.notify_all()
