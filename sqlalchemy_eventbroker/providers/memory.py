"""In-process provider: a bounded event store plus in-memory fan-out and consumer groups.

Backend: a dict in this process. Delivery: to streams and groups of brokers sharing this
provider *object* (several brokers in one process form one bus); nothing crosses processes
and nothing survives a restart. Ordering: publish order, per stream and per group.
``group``: members of a ``(group, pattern)`` share a queue; an unacknowledged delivery goes
back to the queue when its lease expires. The store keeps at most ``max_events`` events,
evicting the least recently used, and a background sweep drops completed events whose
``completed_at`` is older than ``max_age``.
"""

from __future__ import annotations

import builtins
import collections
import datetime as dt
import itertools
import threading
import time
from collections.abc import Sequence

from .. import _json
from .._threads import QuietThread
from ..errors import ProviderError
from ..event import Event, EventStatus
from ..pattern import compile_pattern, validate_pattern
from .base import Closeable, EventFilter, ProviderBase, ProviderStats, QueueEventStream, StatusUpdate

__all__ = ["MemoryProvider"]

UTC = dt.UTC


class MemoryProvider(ProviderBase):
    """Events in a dict, delivered between brokers of this process.

    Thread-safe. Use it for tests, single-process applications and the quick start; switch to
    a database, Redis or NATS provider for several processes without changing handler code.
    """

    #: Status writes are in-process and cheap: the broker need not batch them.
    in_process = True

    def __init__(
        self, max_events: int = 10000, cleanup_interval: float = 300.0, max_age: float = 86400.0
    ) -> None:
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise ValueError(f"max_events: expected int >= 1, got {max_events!r}")
        if cleanup_interval <= 0:
            raise ValueError(f"cleanup_interval: expected seconds > 0, got {cleanup_interval!r}")
        if max_age < 0:
            raise ValueError(f"max_age: expected seconds >= 0, got {max_age!r}")
        self.max_events = max_events
        self.cleanup_interval = float(cleanup_interval)
        self.max_age = float(max_age)
        self._lock = threading.Lock()
        # id -> (insertion seq, event); OrderedDict order is recency for LRU eviction.
        self._events: collections.OrderedDict[str, tuple[int, Event]] = collections.OrderedDict()
        self._seq = itertools.count(1)
        self._streams: list[_CountingStream] = []
        self._groups: dict[tuple[str, str], _Group] = {}
        # Immutable snapshots for publish, replaced on every change (publish reads lock-free).
        self._targets: tuple[tuple[_CountingStream, ...], tuple[_Group, ...]] = ((), ())
        self._published = 0
        self._consumed = 0
        self._evicted = 0
        self._closed = False
        self._stop = threading.Event()
        self._sweeper = QuietThread(
            target=self._sweep_loop, name="eventbroker-memory-cleanup", daemon=True
        )
        self._sweeper.start()

    # -- store -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError("memory provider is closed")

    def store(self, event: Event) -> None:
        # The one payload check every provider applies (the broker's path ran it in validate).
        _json.check_storable(event.payload, "payload")
        _json.check_storable(event.metadata, "metadata")
        with self._lock:
            self._check_open()
            self._keep((event.clone(),))

    def _keep(self, copies: Sequence[Event]) -> None:
        # Caller holds self._lock. A replaced event keeps its place in the insertion order.
        stored = self._events
        for copy in copies:
            old = stored.pop(copy.id, None)
            stored[copy.id] = (old[0] if old is not None else next(self._seq), copy)
        while len(stored) > self.max_events:
            stored.popitem(last=False)
            self._evicted += 1

    def get(self, event_id: str) -> Event | None:
        with self._lock:
            self._check_open()
            item = self._events.get(event_id)
            if item is None:
                return None
            self._events.move_to_end(event_id)
            return item[1].clone()

    def list(self, filter: EventFilter | None = None) -> builtins.list[Event]:
        flt = filter or EventFilter()
        with self._lock:
            self._check_open()
            found = [item for item in self._events.values() if flt.matches(item[1])]
        found.sort(key=lambda item: (item[1].created_at, item[0]))
        selected = found[flt.offset:]
        if flt.limit:
            selected = selected[: flt.limit]
        return [event.clone() for _, event in selected]

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None:
        now = dt.datetime.now(UTC)
        with self._lock:
            self._check_open()
            for update in updates:
                self._apply(update, now)

    def _apply(self, update: StatusUpdate, now: dt.datetime) -> None:
        event_id, status, error, retry_count = update
        if status.__class__ is not EventStatus:
            status = EventStatus(status)
        item = self._events.get(event_id)
        if item is not None:
            event = item[1]
            event.status = status
            event.error = error
            if retry_count is not None:
                event.retry_count = retry_count
            if status is EventStatus.PROCESSING:
                event.processed_at = now
            elif status in (EventStatus.COMPLETED, EventStatus.FAILED):
                event.completed_at = now
                if event.processed_at is None:
                    event.processed_at = now

    def delete(self, event_id: str) -> None:
        with self._lock:
            self._check_open()
            self._events.pop(event_id, None)

    def cleanup(self) -> int:
        """Drop completed events older than ``max_age``; returns how many went."""
        cutoff = dt.datetime.now(UTC) - dt.timedelta(seconds=self.max_age)
        with self._lock:
            old = [
                eid for eid, (_, e) in self._events.items()
                if e.status is EventStatus.COMPLETED and e.completed_at is not None
                and e.completed_at < cutoff
            ]
            for eid in old:
                del self._events[eid]
        return len(old)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.cleanup_interval):
            try:
                self.cleanup()
            except Exception:  # pragma: no cover - never let the sweeper die
                pass

    # -- transport -------------------------------------------------------------------

    def store_and_publish_many(self, events: Sequence[Event], *, origin: str = "") -> None:
        """Store copies of ``events`` and hand each matching stream and group a copy of its own.

        Streams opened with ``exclude_origin=origin`` are passed over.
        """
        copies = [event.clone() for event in events]
        with self._lock:
            self._check_open()
            self._keep(copies)
            self._published += len(copies)
            streams, groups = self._targets
        if not streams and not groups:
            return
        for event in copies:  # the stored copy changes with update_status: hand out clones
            for stream in streams:
                if stream.wants(event.type) and not (origin and stream.exclude_origin == origin):
                    stream._put(event.clone())
            for group in groups:
                if group.match(event.type):
                    group.push(event.clone())

    def stream(self, pattern: str, *, exclude_origin: str = "") -> QueueEventStream:
        validate_pattern(pattern)
        stream = _CountingStream(self, pattern, on_close=self._drop_stream)
        stream.exclude_origin = exclude_origin
        with self._lock:
            self._check_open()
            self._streams.append(stream)
            self._retarget()
        return stream

    def _drop_stream(self, stream: QueueEventStream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)
                self._retarget()

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0,
                     ordered: bool = False) -> _GroupStream:
        """A member of ``(group, pattern)``; ``ordered`` makes the whole group hand out an
        event only when no earlier event of its key is leased or waiting (for every member)."""
        validate_pattern(pattern)
        if not group:
            raise ValueError("group: must be a non-empty string")
        with self._lock:
            self._check_open()
            state = self._groups.get((group, pattern))
            if state is None:
                state = self._groups[(group, pattern)] = _Group(pattern, group)
                self._retarget()
            state.members += 1
            if ordered:
                state.ordered = True
        return _GroupStream(self, state, lease)

    def _retarget(self) -> None:
        # Caller holds self._lock.
        self._targets = (tuple(self._streams), tuple(self._groups.values()))

    def _count_consumed(self, n: int = 1) -> None:
        with self._lock:
            self._consumed += n

    # -- lifecycle -------------------------------------------------------------------

    def stats(self) -> ProviderStats:
        with self._lock:
            counts = collections.Counter(e.status for _, e in self._events.values())
            return ProviderStats(
                provider_type="memory",
                total_events=len(self._events),
                pending_events=counts[EventStatus.PENDING],
                processing_events=counts[EventStatus.PROCESSING],
                completed_events=counts[EventStatus.COMPLETED],
                failed_events=counts[EventStatus.FAILED],
                events_published=self._published,
                events_consumed=self._consumed,
                active_subscribers=len(self._streams)
                + sum(g.members for g in self._groups.values()),
                provider_specific={
                    "max_events": self.max_events,
                    "evicted_events": self._evicted,
                    "groups": len(self._groups),
                    "group_backlog": sum(g.backlog() for g in self._groups.values()),
                },
            )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = list(self._streams)
            groups = list(self._groups.values())
        self._stop.set()
        for stream in streams:
            stream.close()
        for group in groups:
            group.close()
        if self._sweeper is not threading.current_thread():
            self._sweeper.join(timeout=5)

    def _repr_target(self) -> str:
        return f"max_events={self.max_events}"


class _CountingStream(QueueEventStream):
    def __init__(self, provider: MemoryProvider, pattern: str, on_close: object) -> None:
        super().__init__(pattern, on_close=on_close)
        self._provider = provider
        self.exclude_origin = ""

    def receive(self, timeout: float | None = None) -> Event | None:
        event = super().receive(timeout)
        if event is not None:
            self._provider._count_consumed()
        return event


class _Group:
    """One consumer group's shared state: a queue and the leases out."""

    def __init__(self, pattern: str, name: str) -> None:
        self.match = compile_pattern(pattern)
        self.name = name
        self.members = 0
        self.cond = threading.Condition()
        self.ready: collections.deque[Event] = collections.deque()
        #: event id -> (lease deadline on the monotonic clock, event, lease token)
        self.leased: dict[str, tuple[float, Event, int]] = {}
        self.tokens = itertools.count(1)
        self.closed = False
        #: Once a member asked for order: an event is handed out only when no event of its
        #: key is leased (events wait in ``ready`` in publish order, so the oldest goes first).
        self.ordered = False
        #: key -> how many of its events are leased (ordered groups only).
        self.keys_out: collections.Counter[str] = collections.Counter()

    def push(self, event: Event) -> None:
        with self.cond:
            self.ready.append(event)
            self.cond.notify()

    def backlog(self) -> int:
        with self.cond:
            return len(self.ready) + len(self.leased)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _requeue_expired(self, now: float) -> float | None:
        """Put expired leases back in front; return the next deadline, if any."""
        next_deadline: float | None = None
        expired = []
        for eid, (deadline, _event, _) in self.leased.items():
            if deadline <= now:
                expired.append(eid)
            elif next_deadline is None or deadline < next_deadline:
                next_deadline = deadline
        # Back to the front, in their original order, so redelivery keeps publish order.
        requeued = [self.leased.pop(eid)[1] for eid in expired]
        for event in requeued:
            self.release_key(event)
        self.ready.extendleft(reversed(requeued))
        return next_deadline

    def take(self) -> Event | None:
        """The next event to lease: the oldest ready one, or in an ordered group the oldest
        whose key has no event leased (caller holds ``cond``)."""
        ready = self.ready
        if not ready:
            return None
        if not self.ordered:
            return ready.popleft()
        out = self.keys_out
        for i, event in enumerate(ready):
            key = event.key
            if not key or not out[key]:
                del ready[i]
                if key:
                    out[key] += 1
                return event
        return None

    def release_key(self, event: Event) -> None:
        """A leased event of an ordered group was acknowledged or its lease ran out."""
        key = event.key
        if key and self.keys_out[key]:
            self.keys_out[key] -= 1
            if not self.keys_out[key]:
                del self.keys_out[key]


class _Delivery:
    __slots__ = ("_acked", "_group", "_lease", "_token", "event")

    def __init__(self, group: _Group, event: Event, lease: float, token: int) -> None:
        self.event = event
        self._group = group
        self._lease = lease
        self._token = token
        self._acked = False

    def _current(self) -> bool:
        item = self._group.leased.get(self.event.id)
        return item is not None and item[2] == self._token

    def ack(self) -> None:
        g = self._group
        with g.cond:
            if self._current():
                _, event, _ = g.leased.pop(self.event.id)
                g.release_key(event)
                g.cond.notify_all()  # a member may wait for this key
            self._acked = True

    def renew(self) -> None:
        with self._group.cond:
            if self._current():
                _, event, token = self._group.leased[self.event.id]
                self._group.leased[self.event.id] = (time.monotonic() + self._lease, event, token)


class _GroupStream(Closeable):
    def __init__(self, provider: MemoryProvider, group: _Group, lease: float) -> None:
        if lease <= 0:
            raise ValueError(f"lease: expected seconds > 0, got {lease!r}")
        self._provider = provider
        self._group = group
        self._lease = float(lease)
        self._closed = False

    def receive(self, timeout: float | None = None) -> _Delivery | None:
        got = self.receive_many(1, timeout)
        return got[0] if got else None

    def receive_many(self, limit: int, timeout: float | None = None) -> list[_Delivery]:
        """Up to ``limit`` deliveries leased under one lock; ``[]`` once ``timeout`` passed."""
        g = self._group
        end = None if timeout is None else time.monotonic() + timeout
        with g.cond:
            while True:
                if self._closed or g.closed:
                    raise StopIteration
                now = time.monotonic()
                next_deadline = g._requeue_expired(now)
                out: list[_Delivery] = []
                while len(out) < limit and (event := g.take()) is not None:
                    token = next(g.tokens)
                    g.leased[event.id] = (now + self._lease, event, token)
                    out.append(_Delivery(g, event.clone(), self._lease, token))
                if out:
                    self._provider._count_consumed(len(out))
                    return out
                wait_until = end
                if next_deadline is not None and (wait_until is None or next_deadline < wait_until):
                    wait_until = next_deadline
                if end is not None and now >= end:
                    return []
                g.cond.wait(None if wait_until is None else max(0.0, wait_until - now))

    def close(self) -> None:
        with self._group.cond:
            if self._closed:
                return
            self._closed = True
            self._group.members -= 1
            self._group.cond.notify_all()
