"""A minimal third-party provider for tests: API.md section 4's methods and nothing else.

A plain module (no assertions), so test modules anywhere can import it without touching
modules that pytest rewrites.
"""

from __future__ import annotations

from sqlalchemy_eventbroker.event import Event, EventStatus
from sqlalchemy_eventbroker.providers.base import EventFilter, EventStream, GroupStream, ProviderStats
from sqlalchemy_eventbroker.providers.memory import MemoryProvider

__all__ = ["Section4Only"]


class Section4Only:
    """A minimal third-party provider: API.md section 4's methods and nothing else,
    each delegated to a ``MemoryProvider``."""

    def __init__(self, inner: MemoryProvider) -> None:
        self._inner = inner

    def store(self, event: Event) -> None:
        self._inner.store(event)

    def get(self, event_id: str) -> Event | None:
        return self._inner.get(event_id)

    def list(self, filter: EventFilter) -> list[Event]:
        return self._inner.list(filter)

    def update_status(self, event_id: str, status: EventStatus, error: str = "", *,
                      retry_count: int | None = None) -> None:
        self._inner.update_status(event_id, status, error, retry_count=retry_count)

    def delete(self, event_id: str) -> None:
        self._inner.delete(event_id)

    def publish(self, event: Event) -> None:
        self._inner.publish(event)

    def stream(self, pattern: str) -> EventStream:
        return self._inner.stream(pattern)

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0) -> GroupStream:
        return self._inner.group_stream(pattern, group, lease=lease)

    def close(self) -> None:
        self._inner.close()

    def stats(self) -> ProviderStats:
        return self._inner.stats()
