"""Per-key ordering inside one broker: one event per key at a time, in the order they came.

An ordered subscription (API.md section 3, "Ordered subscriptions") may run on many workers,
so two events of one key could otherwise run at once or overtake each other. The gate is
entered where the order is still known, when jobs are queued (in publish order, in the
order a stream delivered them), never by the workers that pop them: two workers popping
``k#1`` and ``k#2`` a microsecond apart could reach any later gate in either order.

A ticket that finds its key held is parked behind the holder, keeping its queue place, and
is handed on (:meth:`KeyGate.leave`) when the holder concluded: after its retries, whether
it completed or failed. Other keys never wait for it. A ticket is whatever the caller
needs to resume the parked work (a job to queue); a caller thread that runs its work itself
waits its turn in :meth:`KeyGate.wait_turn`, and :meth:`KeyGate.leave` wakes it.
"""

from __future__ import annotations

import collections
import threading
from typing import Generic, TypeVar

__all__ = ["KeyGate"]

T = TypeVar("T")


class KeyGate(Generic[T]):
    """Grants each key to one ticket at a time, first come first served. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: key -> tickets (or waiting threads' events) parked behind the holder (empty
        #: deque: held, nobody waiting).
        self._held: dict[str, collections.deque[T | threading.Event]] = {}

    def enter(self, key: str, ticket: T) -> bool:
        """Take ``key`` for ``ticket`` (True: run it now), or park it behind the holder
        (False: it is handed back by :meth:`leave` when its turn comes)."""
        return self._enter(key, ticket)

    def wait_turn(self, key: str) -> None:
        """Block the calling thread until it holds ``key`` (it then runs its work itself and
        calls :meth:`leave` like any holder)."""
        turn = threading.Event()
        if not self._enter(key, turn):
            turn.wait()

    def _enter(self, key: str, ticket: T | threading.Event) -> bool:
        with self._lock:
            waiting = self._held.get(key)
            if waiting is None:
                self._held[key] = collections.deque()
                return True
            waiting.append(ticket)
            return False

    def leave(self, key: str) -> T | None:
        """The holder of ``key`` finished: the next parked ticket now holds the key and is
        returned for the caller to resume; None when nobody waited (the key is free) or the
        next in line was a thread in :meth:`wait_turn` (woken here)."""
        with self._lock:
            waiting = self._held.get(key)
            if waiting is None:
                raise RuntimeError(f"KeyGate.leave({key!r}): the key is not held")
            if not waiting:
                del self._held[key]
                return None
            nxt = waiting.popleft()
        if isinstance(nxt, threading.Event):
            nxt.set()
            return None
        return nxt
