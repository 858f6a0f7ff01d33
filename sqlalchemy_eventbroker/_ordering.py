"""Per-key ordering inside one broker: one event per key at a time, in the order they came.

An ordered subscription (API.md section 3, "Ordered subscriptions") may run on many workers,
so two events of one key could otherwise run at once or overtake each other. The gate is
entered where the order is still known, when jobs are queued (in publish order, in the
order a stream delivered them), never by the workers that pop them: two workers popping
``k#1`` and ``k#2`` a microsecond apart could reach any later gate in either order.

A ticket that finds its key held is parked behind the holder, keeping its queue place, and
is handed on (:meth:`KeyGate.leave`) when the holder concluded: after its retries, whether
it completed or failed. Other keys never wait for it. The gate knows nothing of jobs or
threads: a ticket is whatever the caller needs to resume the parked work (a job to queue,
an ``threading.Event`` a caller thread waits on).
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
        #: key -> tickets parked behind the holder (empty deque: held, nobody waiting).
        self._held: dict[str, collections.deque[T]] = {}

    def enter(self, key: str, ticket: T) -> bool:
        """Take ``key`` for ``ticket`` (True: run it now), or park it behind the holder
        (False: it is handed back by :meth:`leave` when its turn comes)."""
        with self._lock:
            waiting = self._held.get(key)
            if waiting is None:
                self._held[key] = collections.deque()
                return True
            waiting.append(ticket)
            return False

    def leave(self, key: str) -> T | None:
        """The holder of ``key`` finished: the next parked ticket now holds the key and is
        returned for the caller to resume; None when nobody waited (the key is free)."""
        with self._lock:
            waiting = self._held.get(key)
            if waiting is None:
                raise RuntimeError(f"KeyGate.leave({key!r}): the key is not held")
            if waiting:
                return waiting.popleft()
            del self._held[key]
            return None

    @property
    def held(self) -> int:
        """How many keys are held now (for stats and tests)."""
        return len(self._held)

    @property
    def parked(self) -> int:
        """How many tickets wait behind a held key."""
        with self._lock:
            return sum(len(w) for w in self._held.values())
