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
  when one opens (the group is durable from the moment it was first opened).

Brokers are the only intended consumers of the transport side; applications subscribe through
a broker. Everything here is a ``Protocol``, so third parties can write providers without
inheriting from us; :class:`ProviderBase` adds context management and a ``repr``.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Self, runtime_checkable

from .._types import JSON
from ..errors import ProviderError
from ..event import Event, EventSource, EventStatus
from ..pattern import compile_pattern, validate_pattern

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = [
    "Closeable",
    "Delivery",
    "EventFilter",
    "EventStream",
    "GroupStream",
    "Provider",
    "ProviderBase",
    "ProviderStats",
    "QueueEventStream",
    "StatusBatchProvider",
    "StatusUpdate",
    "StoreAndPublishProvider",
    "TransactionalProvider",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFilter:
    """What ``Provider.list`` selects. Empty/None fields select everything.

    ``type_pattern`` is a subscription pattern (``public.users.*``); ``start_time`` is
    inclusive and ``end_time`` exclusive, both on ``created_at``. ``limit=0`` means no limit.
    Results are oldest first.
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
class Provider(Protocol):
    """Stores events and carries them between brokers. Implementations are thread-safe."""

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
        """Make a stored event visible to the streams of every broker on this backend."""
        ...

    def stream(self, pattern: str) -> EventStream: ...

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0) -> GroupStream: ...

    def close(self) -> None:
        """Release connections and threads; idempotent; open streams end."""
        ...

    def stats(self) -> ProviderStats: ...


@runtime_checkable
class BatchProvider(Protocol):
    """Optional: store and publish many events in one round trip (the broker prefers it)."""

    def store_many(self, events: Sequence[Event]) -> None: ...

    def publish_many(self, events: Sequence[Event]) -> None: ...


@runtime_checkable
class StoreAndPublishProvider(Protocol):
    """Optional: store events and make them visible to streams in one round trip.

    Equivalent to ``store_many(events)`` followed by ``publish_many(events)``; the broker
    prefers it, so a remote backend needs no second round trip per publish. ``origin`` (only
    passed to providers that set ``supports_origin``) tags the events so the publishing
    broker's own streams can skip them.
    """

    def store_and_publish_many(
        self, events: Sequence[Event], *, origin: str | None = None
    ) -> None: ...


class StatusUpdate(NamedTuple):
    """One final-status write, as the broker batches them for ``update_status_many``."""

    event_id: str
    status: EventStatus
    error: str = ""
    retry_count: int | None = None


@runtime_checkable
class StatusBatchProvider(Protocol):
    """Optional: apply many status updates in one round trip.

    The broker writes the outcome of every event it handled; on a remote backend one round
    trip per event caps a consumer at the backend's round-trip rate, so async brokers collect
    outcomes for a few milliseconds and hand them over together. Same semantics per item as
    ``Provider.update_status``; unknown ids are ignored.
    """

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None: ...


@runtime_checkable
class TransactionalProvider(Protocol):
    """Optional: write events inside the application's own database transaction (the outbox).

    ORM capture asks ``shares_transaction(connection)`` once per transaction; when it says yes,
    capture hands each flush's events to ``write_in_transaction`` on that same connection,
    before commit. The rows then commit or vanish with the user's data, and once committed
    they are both stored and published: the broker neither stores nor publishes them again.
    """

    def shares_transaction(self, connection: Connection) -> bool: ...

    def write_in_transaction(self, connection: Connection, events: Sequence[Event]) -> None: ...


class Closeable:
    """``with x:`` closes ``x`` on the way out: providers, streams and group streams."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


class ProviderBase(Closeable):
    """Optional convenience base: ``with provider:`` closes it; a readable ``repr``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_target()})"

    def _repr_target(self) -> str:
        return ""


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


def provider_error(backend: str, address: str, exc: BaseException) -> ProviderError:
    """The one message shape for driver failures: ``redis at redis://...: <what>``."""
    return ProviderError(f"{backend} at {address}: {exc}")
