"""What the providers of a network backend (Redis, NATS) share: their bookkeeping.

:class:`RemoteProvider` holds the redacted address, the open streams and group members, the
published/consumed counters, the closed flag and the assembly of :class:`ProviderStats`;
:func:`translate_errors` is the one place a driver's exceptions become ``ProviderError``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from .._types import JSON
from ..errors import ProviderError
from ..pattern import validate_pattern
from ._urls import redact_url
from .base import ProviderBase, ProviderStats, QueueEventStream

if TYPE_CHECKING:
    from ._group_stream import BufferedGroupStream

__all__ = ["RemoteProvider", "driver_error", "translate_errors"]

StreamT = TypeVar("StreamT", bound=QueueEventStream)


def driver_error(backend: str, address: str, exc: BaseException) -> ProviderError:
    """``ProviderError("<backend> at <address>: <what>")`` for a driver's exception.

    Several driver errors have an empty ``str()``; the message names their class then.
    """
    return ProviderError(f"{backend} at {address}: {str(exc) or type(exc).__name__}")


@contextlib.contextmanager
def translate_errors(backend: str, address: str,
                     errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Turn ``errors`` raised inside into :func:`driver_error`; ``ProviderError`` passes."""
    try:
        yield
    except ProviderError:
        raise
    except errors as exc:
        raise driver_error(backend, address, exc) from exc


class RemoteProvider(ProviderBase, Generic[StreamT]):
    """Base of the providers whose backend is a server: state every one of them keeps.

    Subclasses set :attr:`provider_type` and :attr:`driver_errors`, call
    ``super().__init__(url)`` first, and implement :meth:`_open_group`.
    """

    #: ``ProviderStats.provider_type`` and the first word of every error message.
    provider_type: ClassVar[str]
    #: The driver's exceptions (and socket errors) that mean "the backend failed".
    driver_errors: ClassVar[tuple[type[BaseException], ...]]
    #: Of those, the ones a group member rides out by reconnecting with backoff.
    connection_errors: ClassVar[tuple[type[BaseException], ...]]

    #: Longest single blocking read, in seconds.
    block: float
    #: Entries per group read and per batch of writes.
    batch_size: int
    #: The stream, also the namespace of the provider's other server-side objects.
    stream_name: str

    def __init__(self, url: str) -> None:
        self.url = url
        self._address = redact_url(url)
        self._lock = threading.Lock()
        self._closed = False
        self._published = 0
        self._consumed = 0
        self._streams: list[StreamT] = []
        self._groups: list[BufferedGroupStream[Any]] = []

    def _repr_target(self) -> str:
        return f"{self._address!r}, stream_name={self.stream_name!r}"

    def _error(self, exc: BaseException) -> ProviderError:
        return driver_error(self.provider_type, self._address, exc)

    def _translate_errors(self) -> contextlib.AbstractContextManager[None]:
        return translate_errors(self.provider_type, self._address, self.driver_errors)

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError(f"{self.provider_type} at {self._address}: the provider is closed")

    def _count_published(self, n: int) -> None:
        with self._lock:
            self._published += n

    def _count_consumed(self, n: int) -> None:
        with self._lock:
            self._consumed += n

    # -- streams and group members ---------------------------------------------------------

    def _forget_stream(self, s: StreamT) -> None:
        with self._lock:
            if s in self._streams:
                self._streams.remove(s)

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0,
                     ordered: bool = False) -> BufferedGroupStream[Any]:
        """A competing-consumer member of ``(group, pattern)`` (see the module docstring);
        ``ordered``: one active member at a time (see ``_group_stream``)."""
        validate_pattern(pattern)
        if not group:
            raise ValueError("group_stream: group must not be empty")
        if lease <= 0:
            raise ValueError(f"group_stream: lease must be > 0, got {lease}")
        self._check_open()
        g = self._open_group(pattern, group, lease, ordered)
        with self._lock:
            self._groups.append(g)
        return g

    def _open_group(self, pattern: str, group: str, lease: float,
                    ordered: bool) -> BufferedGroupStream[Any]:
        raise NotImplementedError  # pragma: no cover - every subclass defines it

    def _forget_group(self, g: BufferedGroupStream[Any]) -> None:
        with self._lock:
            if g in self._groups:
                self._groups.remove(g)

    # -- stats -----------------------------------------------------------------------------

    def _stats(self, total: int, counts: Mapping[str, Any],
               specific: dict[str, JSON]) -> ProviderStats:
        """``ProviderStats`` from the backend's figures plus this object's counters."""
        with self._lock:
            published, consumed = self._published, self._consumed
            active = len(self._streams) + len(self._groups)
        return ProviderStats(
            provider_type=self.provider_type,
            total_events=int(total),
            pending_events=int(counts.get("pending", 0)),
            processing_events=int(counts.get("processing", 0)),
            completed_events=int(counts.get("completed", 0)),
            failed_events=int(counts.get("failed", 0)),
            events_published=published,
            events_consumed=consumed,
            active_subscribers=active,
            provider_specific=specific,
        )
