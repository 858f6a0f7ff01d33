"""The provider contract: how events are stored and carried between brokers.

A provider does two jobs. As a **store** it keeps events for audit and replay (``store``,
``get``, ``list``, ``update_status``, ``delete``). As a **transport** it carries events between
brokers that share its backend:

* ``stream(pattern)`` is a *fan-out* subscription: it yields every matching event that
  reaches the backend after the stream was opened, each once, in the backend's order.
* ``group_stream(pattern, group, lease=...)`` is a *competing-consumer* subscription: all
  streams opened with the same ``(group, pattern)`` share the events, each event leased to one
  of them at a time. An event not acknowledged before its lease expires (its consumer died) is
  delivered again; events that reached the backend while no member was open are delivered
  when one opens (the group is durable from the moment it was first opened). With
  ``ordered=True`` no two members hold events of the same non-empty ``key`` at once, and a
  key's events are handed out oldest first: a later one waits until the earlier one is
  acknowledged (or, after its lease ran out, redelivered and acknowledged).

Brokers are the only intended consumers of the transport side; applications subscribe through
a broker. Everything here is a ``Protocol``, so third parties can write providers without
inheriting from us; :class:`ProviderBase` adds context management and a ``repr``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, Self, runtime_checkable

from .._types import JSON
from ..event import Event, EventSource, EventStatus
from ..pattern import compile_pattern, validate_pattern

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = [
    "BusProvider",
    "Closeable",
    "Delivery",
    "EventFilter",
    "EventStream",
    "GroupStream",
    "Provider",
    "ProviderBase",
    "ProviderStats",
    "QueueEventStream",
    "StatusUpdate",
    "TransactionalProvider",
    "bus_provider",
    "paged_events",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFilter:
    """What ``Provider.list`` selects. Empty/None fields select everything.

    ``type_pattern`` is a subscription pattern (``public.users.*``); ``start_time`` is
    inclusive and ``end_time`` exclusive, both on ``created_at``. A naive ``start_time`` or
    ``end_time`` is taken as UTC (it is given ``tzinfo=UTC`` here, so every provider compares
    the same instant); an aware one may be in any zone. ``limit=0`` means no limit.
    Results are oldest first.

    Raises:
        ValueError: a negative ``limit``/``offset``, or a time that is not a ``datetime``.
        PatternError: a malformed ``type_pattern``.
    """

    source: EventSource | None = None
    status: EventStatus | None = None
    user_id: int | None = None
    schema: str = ""
    entity: str = ""
    operation: str = ""
    instance_id: str = ""
    type_pattern: str = ""
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    limit: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        if self.type_pattern:
            validate_pattern(self.type_pattern)
        if self.limit < 0 or self.offset < 0:
            raise ValueError(
                f"EventFilter: limit and offset must be >= 0, got {self.limit}, {self.offset}"
            )
        for name in ("start_time", "end_time"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, dt.datetime):
                raise ValueError(
                    f"EventFilter.{name}: expected a datetime, got {type(value).__name__}")
            if value.tzinfo is None or value.utcoffset() is None:
                object.__setattr__(self, name, value.replace(tzinfo=dt.UTC))

    def matches(self, event: Event) -> bool:
        """Whether ``event`` passes every field of this filter (ignores limit/offset)."""
        if self.source is not None and event.source != self.source:
            return False
        if self.status is not None and event.status != self.status:
            return False
        if self.user_id is not None and event.user_id != self.user_id:
            return False
        if self.schema and event.schema != self.schema:
            return False
        if self.entity and event.entity != self.entity:
            return False
        if self.operation and event.operation != self.operation:
            return False
        if self.instance_id and event.instance_id != self.instance_id:
            return False
        if self.type_pattern and not compile_pattern(self.type_pattern)(event.type):
            return False
        if self.start_time is not None and event.created_at < self.start_time:
            return False
        return self.end_time is None or event.created_at < self.end_time


@dataclass(slots=True, kw_only=True)
class ProviderStats:
    """A snapshot of what a provider holds and has carried."""

    provider_type: str
    total_events: int = 0
    pending_events: int = 0
    processing_events: int = 0
    completed_events: int = 0
    failed_events: int = 0
    events_published: int = 0
    events_consumed: int = 0
    active_subscribers: int = 0
    #: Backend-specific figures (stream length, pending entries, lag, ...).
    provider_specific: dict[str, JSON] = field(default_factory=dict)


@runtime_checkable
class EventStream(Protocol):
    """A fan-out subscription: iterate it for events; ``close()`` ends the iteration.

    Thread-safe: one thread may block in ``receive``/``__next__`` while another calls
    ``close()``, which wakes it.
    """

    def receive(self, timeout: float | None = None) -> Event | None:
        """The next event, or ``None`` when ``timeout`` seconds pass first.

        Raises:
            StopIteration: the stream was closed.
        """
        ...

    def __iter__(self) -> Iterator[Event]: ...

    def __next__(self) -> Event: ...

    def close(self) -> None: ...


@runtime_checkable
class Delivery(Protocol):
    """One event leased to one member of a consumer group."""

    event: Event

    def ack(self) -> None:
        """The event is done (handled or given up on): never deliver it to the group again."""
        ...

    def renew(self) -> None:
        """Extend the lease by its full length from now; the consumer is still working."""
        ...


@runtime_checkable
class GroupStream(Protocol):
    """A competing-consumer subscription (see the module docstring)."""

    def receive(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery, or ``None`` when ``timeout`` seconds pass first.

        Raises:
            StopIteration: the stream was closed.
        """
        ...

    def close(self) -> None:
        """Stop receiving. Unacknowledged deliveries are redelivered when their lease ends."""
        ...


@runtime_checkable
class BatchGroupStream(GroupStream, Protocol):
    """The group member the broker reads: it also hands out deliveries in batches, so the
    broker dispatches and settles a batch together (its bookkeeping paid per batch)."""

    def receive_many(self, limit: int, timeout: float | None = None) -> Sequence[Delivery]:
        """Up to ``limit`` deliveries, at least one unless ``timeout`` passed (then ``[]``).

        Raises:
            StopIteration: the stream was closed.
        """
        ...


@runtime_checkable
class Provider(Protocol):
    """API.md section 4: what a third-party provider must implement, at the least.

    Implementations are thread-safe. A provider that also implements :class:`BusProvider`
    (every provider of this package does) is used by the broker as it is; any other is
    adapted once, by :func:`bus_provider`.
    """

    def store(self, event: Event) -> None:
        """Keep ``event`` (a copy of it: later changes to the object are not seen)."""
        ...

    def get(self, event_id: str) -> Event | None: ...

    def list(self, filter: EventFilter) -> list[Event]:
        """Stored events that pass ``filter``, oldest first."""
        ...

    def update_status(
        self, event_id: str, status: EventStatus, error: str = "", *, retry_count: int | None = None
    ) -> None:
        """Set the stored event's status, error and (when given) retry count.

        ``processing`` sets ``processed_at``; ``completed``/``failed`` set ``completed_at``
        (and ``processed_at`` if it was never set). Unknown ids are ignored.
        """
        ...

    def delete(self, event_id: str) -> None: ...

    def publish(self, event: Event) -> None:
        """Store ``event`` if needed and make it visible to the streams of every broker."""
        ...

    def stream(self, pattern: str) -> EventStream: ...

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0,
                     ordered: bool = False) -> GroupStream: ...

    def close(self) -> None:
        """Release connections and threads; idempotent; open streams end."""
        ...

    def stats(self) -> ProviderStats: ...


class StatusUpdate(NamedTuple):
    """One final-status write, as the broker batches them for ``update_status_many``."""

    event_id: str
    status: EventStatus
    error: str = ""
    retry_count: int | None = None


@runtime_checkable
class BusProvider(Provider, Protocol):
    """The contract the broker talks to: section 4 plus one batch write and one status batch.

    Every way an event enters a broker ends in ONE call to :meth:`store_and_publish_many`,
    and every outcome in :meth:`update_status_many`; the single-event methods of section 4
    are thin wrappers over these two. Where backends truly differ, the difference is a
    class attribute declared here (as SQLAlchemy dialects declare theirs), never a probe.
    """

    #: The backend lives in this process, so a status write costs no round trip: the broker
    #: writes each outcome at once instead of batching outcomes for a few milliseconds.
    in_process: ClassVar[bool]

    def store_and_publish_many(self, events: Sequence[Event], *, origin: str = "") -> None:
        """Store ``events`` and make them visible to every stream on the backend.

        One round trip for the batch. ``origin`` tags the events: a stream opened with
        ``exclude_origin=origin`` never yields them, which is how a broker skips its own
        events (the same way on every backend). Storing an id that is already stored
        replaces it, and the event travels again (a redrive).
        """
        ...

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None:
        """Apply each update as :meth:`Provider.update_status` would; unknown ids are ignored."""
        ...

    def iter_events(self, filter: EventFilter | None = None) -> Iterator[Event]:
        """What ``list(filter)`` returns, oldest first, read in pages so that memory stays
        flat for any number of events (``Broker.replay``). :func:`paged_events` is the
        default; a backend with a cheaper order (keyset paging in SQL) declares its own."""
        ...

    def stream(self, pattern: str, *, exclude_origin: str = "") -> EventStream:
        """A fan-out stream; events published with ``origin == exclude_origin`` are skipped."""
        ...

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0,
                     ordered: bool = False) -> BatchGroupStream:
        """A member of ``(group, pattern)`` that also hands out batches."""
        ...


@runtime_checkable
class TransactionalProvider(Protocol):
    """Optional, and the only optional protocol: the transactional outbox.

    ORM capture asks ``shares_transaction(connection)`` once per transaction; when it says
    yes, capture hands each flush's events to :meth:`write_in_transaction` on that same
    connection, before commit. The rows commit or vanish with the user's data. After the
    commit the broker calls :meth:`announce_committed`, so wake-ups travel outside the
    application's transaction (on PostgreSQL a transaction that ran NOTIFY serialises its
    commit behind every other notifying commit).
    """

    def shares_transaction(self, connection: Connection) -> bool: ...

    def write_in_transaction(self, connection: Connection, events: Sequence[Event], *,
                             origin: str = "") -> None:
        """Write ``events`` with ONE statement on ``connection``, inside its transaction.

        The provider isolates its own write: when it fails, only the write is undone (a
        savepoint of its own), the caller's transaction stays usable, and this raises
        :class:`~sqlalchemy_eventbroker.errors.ProviderError` (or ``PayloadError`` for an
        event the backend cannot hold). No wake-up is sent from inside the transaction.
        """
        ...

    def announce_committed(self, events: Sequence[Event]) -> None:
        """The transaction that wrote ``events`` committed: wake the readers (coalesced)."""
        ...


class Closeable:
    """``with x:`` closes ``x`` on the way out: providers, streams and group streams."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


class ProviderBase(Closeable):
    """Optional convenience base: ``with provider:`` closes it, a readable ``repr``, and the
    single-event methods of section 4 as thin wrappers over the batch calls of
    :class:`BusProvider`, so that a provider writes each path once."""

    #: See :attr:`BusProvider.in_process`.
    in_process: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_target()})"

    def _repr_target(self) -> str:
        return ""

    def publish(self, event: Event) -> None:
        """Store ``event`` (replacing a stored copy) and make it visible to every stream."""
        self.store_and_publish_many((event,))

    def update_status(
        self, event_id: str, status: EventStatus, error: str = "", *, retry_count: int | None = None
    ) -> None:
        """See :meth:`Provider.update_status`."""
        self.update_status_many((StatusUpdate(event_id, status, error, retry_count),))

    def iter_events(self, filter: EventFilter | None = None) -> Iterator[Event]:
        """See :meth:`BusProvider.iter_events`: pages of :meth:`list` by default."""
        return paged_events(self, filter or EventFilter())  # type: ignore[arg-type]

    def store_and_publish_many(self, events: Sequence[Event], *, origin: str = "") -> None:
        raise NotImplementedError  # pragma: no cover - every provider defines it

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None:
        raise NotImplementedError  # pragma: no cover - every provider defines it


def paged_events(provider: Provider, flt: EventFilter, page: int = 1000) -> Iterator[Event]:
    """``provider.list(flt)`` in pages of ``page`` events (``limit``/``offset`` honoured)."""
    offset = flt.offset
    remaining = flt.limit or None
    while True:
        size = page if remaining is None else min(page, remaining)
        if size <= 0:
            return
        batch = provider.list(dataclasses.replace(flt, limit=size, offset=offset))
        yield from batch
        if len(batch) < size:
            return
        offset += len(batch)
        if remaining is not None:
            remaining -= len(batch)


#: How many ids of its own events an adapted provider remembers to skip their echo.
MAX_OWN_IDS = 100_000


def bus_provider(provider: Provider) -> BusProvider:
    """``provider`` as the broker talks to it: itself, or adapted once when it implements
    only API.md section 4 (a third-party provider)."""
    if isinstance(provider, BusProvider):
        return provider
    return _SectionFourAdapter(provider)


class _SectionFourAdapter:
    """Serves :class:`BusProvider` over a provider that has only section 4's methods.

    Batches become loops, and echo suppression, which such a provider cannot do by origin,
    is done here by id: the adapter remembers (boundedly) which ids it wrote with which
    origin, and its streams drop them.
    """

    in_process: ClassVar[bool] = False

    def __init__(self, provider: Provider) -> None:
        self._inner = provider
        self._own: dict[str, str] = {}
        self._own_lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return repr(self._inner)

    def store_and_publish_many(self, events: Sequence[Event], *, origin: str = "") -> None:
        if origin:
            with self._own_lock:
                own = self._own
                for e in events:
                    own[e.id] = origin
                while len(own) > MAX_OWN_IDS:
                    del own[next(iter(own))]
        for e in events:
            self._inner.store(e)
            self._inner.publish(e)

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None:
        for u in updates:
            self._inner.update_status(u.event_id, u.status, u.error, retry_count=u.retry_count)

    def iter_events(self, filter: EventFilter | None = None) -> Iterator[Event]:
        return paged_events(self._inner, filter or EventFilter())

    def stream(self, pattern: str, *, exclude_origin: str = "") -> EventStream:
        inner = self._inner.stream(pattern)
        if not exclude_origin:
            return inner
        return _SkipOwnStream(inner, self, exclude_origin)

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0,
                     ordered: bool = False) -> BatchGroupStream:
        if ordered:  # only then: a section-4 provider may not know the option
            inner = self._inner.group_stream(pattern, group, lease=lease, ordered=True)
        else:
            inner = self._inner.group_stream(pattern, group, lease=lease)
        return _OneAtATime(inner)

    def _is_own(self, event_id: str, origin: str) -> bool:
        with self._own_lock:
            if self._own.get(event_id) == origin:
                del self._own[event_id]
                return True
            return False


class _OneAtATime(Closeable):
    """A section-4 provider's group stream, serving ``receive_many`` one delivery a call."""

    def __init__(self, inner: GroupStream) -> None:
        self._inner = inner

    def receive(self, timeout: float | None = None) -> Delivery | None:
        return self._inner.receive(timeout)

    def receive_many(self, limit: int, timeout: float | None = None) -> Sequence[Delivery]:
        delivery = self._inner.receive(timeout)
        return () if delivery is None else (delivery,)

    def close(self) -> None:
        self._inner.close()


class _SkipOwnStream(Closeable):
    """A section-4 provider's stream without the events its broker wrote itself."""

    def __init__(self, inner: EventStream, adapter: _SectionFourAdapter, origin: str) -> None:
        self._inner = inner
        self._adapter = adapter
        self._origin = origin

    def receive(self, timeout: float | None = None) -> Event | None:
        # A skipped event does not end the wait: None only once the timeout has passed.
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = self._inner.receive(left)
            if event is None or not self._adapter._is_own(event.id, self._origin):
                return event

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        while True:
            event = self.receive(None)
            if event is not None:
                return event

    def close(self) -> None:
        self._inner.close()


_CLOSED: Any = object()


class QueueEventStream(Closeable):
    """An :class:`EventStream` fed by a provider's background reader through a queue.

    The provider calls ``_put(event)`` for every matching event; ``close()`` (from any thread)
    wakes a blocked reader. ``on_close`` lets the provider unregister the stream.
    """

    def __init__(self, pattern: str, on_close: Any = None, maxsize: int = 0) -> None:
        self.pattern = pattern
        self._match = compile_pattern(pattern)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._closed = threading.Event()
        self._on_close = on_close

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wants(self, event_type: str) -> bool:
        return self._match(event_type)

    def _put(self, event: Event) -> None:
        if not self._closed.is_set():
            self._queue.put(event)

    def receive(self, timeout: float | None = None) -> Event | None:
        if self._closed.is_set() and self._queue.empty():
            raise StopIteration
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _CLOSED:
            self._queue.put(_CLOSED)  # wake any other reader too
            raise StopIteration
        return item  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        while True:
            item = self.receive(timeout=None)
            if item is not None:
                return item

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        # Drop what was never read: close means "stop", not "drain".
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._queue.put(_CLOSED)
        if self._on_close is not None:
            self._on_close(self)
