"""Deferred stores: ``store(e)`` waits a few milliseconds for the ``publish(e)`` that follows it.

The broker always calls ``store`` and then ``publish`` (or ``publish_many``) for the same
events, back to back. On a remote backend each is a round trip; holding the store back until
the publish lets a provider send both in one round trip (Redis: one script doing the store
and the ``XADD``; NATS: the key-value put and the stream publish in flight together).

Rules that keep the store contract:

* A deferred store is visible to every call of the same provider object: an operation that
  reads or changes a stored event (``get``, ``update_status``, ``delete``, ``list``,
  ``stats``, ...) first *settles* the deferred stores it depends on (sends them, usually in
  the same round trip as its own command). Read-your-writes holds within a provider.
* A store whose publish does not follow is written by a flusher thread after ``delay``
  seconds, or at ``close()``: other provider objects (other processes) see it at most
  ``delay`` later than before.
* Ordering: a store is always on the backend before the publish of the same event can be;
  whoever *claims* a deferred entry writes it, and anyone else needing it waits for that
  write to finish first.
* More than ``limit`` deferred entries make ``store`` settle them at once (in the caller,
  so that errors surface and memory stays bounded).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["DeferredStores", "Entry"]

log = logging.getLogger(__name__)


class Entry:
    """One deferred store: ``item`` is whatever the provider prepared for writing it."""

    __slots__ = ("claimed", "done", "item", "key", "since")

    def __init__(self, key: str, item: Any) -> None:
        self.key = key
        self.item = item
        self.since = time.monotonic()
        self.claimed: object | None = None  # the claiming acquire() call's token
        self.done: threading.Event | None = None  # made when claimed


class DeferredStores:
    """Deferred store entries by key, claimed by whoever writes them (thread-safe).

    ``write(items)`` sends the prepared items to the backend (raising on failure); it is
    called by :meth:`settle`, by the flusher thread and by :meth:`close`.
    """

    def __init__(self, write: Callable[[list[Any]], None], *, delay: float, limit: int = 10_000,
                 name: str = "eventbroker-deferred") -> None:
        self._write = write
        self.delay = delay
        self.limit = limit
        self._name = name
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._idle = False  # the flusher waits for an entry, with no timeout
        self.failures = 0  # background writes that failed (for stats)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    # -- adding --------------------------------------------------------------------------------

    def add(self, key: str, item: Any) -> None:
        """Defer the store of ``key``; replaces an unclaimed earlier store of the same key."""
        entry = Entry(key, item)
        while True:
            with self._lock:
                if self._closed:
                    closed, over = True, False
                    break
                old = self._entries.get(key)
                if old is None or old.claimed is None:
                    self._entries[key] = entry
                    if self._thread is None:
                        self._thread = threading.Thread(target=self._flush_loop,
                                                        name=self._name, daemon=True)
                        self._thread.start()
                    elif self._idle:
                        self._wake.notify()
                    closed, over = False, len(self._entries) > self.limit
                    break
                done = old.done
            assert done is not None
            done.wait()  # an earlier version is being written: keep the order of the two
        if closed:
            self._write([item])  # closing or closed: no deferral any more
        elif over:
            self.settle(None)

    # -- claiming ------------------------------------------------------------------------------

    def acquire(self, keys: Iterable[str] | None) -> list[Entry]:
        """Claim the deferred entries of ``keys`` (all when ``None``) for writing them.

        Entries another thread is writing now are waited for first (so that, once the caller
        has written what it got, every store of ``keys`` is on the backend). The caller must
        pass the result to :meth:`release` (or :meth:`drop`) whatever happens.
        """
        if not self._entries:
            return []
        token = object()
        wanted = None if keys is None else list(keys)
        mine: list[Entry] = []
        while True:
            waits: list[threading.Event] = []
            with self._lock:
                if wanted is None:
                    candidates: Iterable[Entry] = list(self._entries.values())
                else:
                    get = self._entries.get
                    candidates = [e for e in map(get, wanted) if e is not None]
                for e in candidates:
                    if e.claimed is None:
                        e.claimed = token
                        e.done = threading.Event()
                        mine.append(e)
                    elif e.claimed is not token:
                        waits.append(e.done)  # type: ignore[arg-type]
            if not waits:
                return mine
            for w in waits:
                w.wait()

    def release(self, entries: list[Entry], *, written: bool) -> None:
        """Finish claimed entries: drop them once ``written``, else make them claimable again.

        Either way, threads waiting for them are woken.
        """
        if not entries:
            return
        with self._lock:
            for e in entries:
                if written and self._entries.get(e.key) is e:
                    del self._entries[e.key]
                e.claimed = None
                done, e.done = e.done, None
                if done is not None:
                    done.set()

    def settle(self, keys: Iterable[str] | None) -> None:
        """Write the deferred stores of ``keys`` (all when ``None``) now, after those another
        thread is writing. Raises what ``write`` raises (the entries stay deferred)."""
        if not self._entries:
            return
        mine = self.acquire(keys)
        if mine:
            try:
                self._write([e.item for e in mine])
            except BaseException:
                self.release(mine, written=False)
                raise
            self.release(mine, written=True)

    # -- the flusher ---------------------------------------------------------------------------

    def _flush_loop(self) -> None:
        failures = 0
        while True:
            with self._lock:
                while not self._closed:
                    if not self._entries:
                        self._idle = True
                        self._wake.wait()
                        self._idle = False
                        continue
                    oldest = min((e.since for e in self._entries.values() if e.claimed is None),
                                 default=None)
                    if oldest is None:
                        self._wake.wait(self.delay)
                        continue
                    wait = oldest + self.delay * (1 + min(failures, 20)) - time.monotonic()
                    if wait <= 0:
                        break
                    self._wake.wait(wait)
                if self._closed:
                    return
                cutoff = time.monotonic() - self.delay
                due = [e.key for e in self._entries.values()
                       if e.claimed is None and e.since <= cutoff]
            try:
                self.settle(due)
                failures = 0
            except Exception as exc:
                failures += 1
                self.failures += 1
                log.warning("eventbroker: deferred store of %d events failed (will retry): %s",
                            len(due), exc)

    def close(self) -> None:
        """Stop the flusher and write what is still deferred (failures are logged)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread, self._thread = self._thread, None
            self._wake.notify_all()
        if thread is not None:
            thread.join()
        try:
            self.settle(None)
        except Exception as exc:
            self.failures += 1
            log.error("eventbroker: %d deferred stores were lost at close: %s",
                      len(self._entries), exc)
            with self._lock:
                self._entries.clear()
