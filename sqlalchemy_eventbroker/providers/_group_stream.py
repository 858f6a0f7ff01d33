"""A consumer-group member that fetches in batches and hands them out in batches.

Redis and NATS serve ``group_stream`` the same way: a member fetches up to ``batch_size``
leased messages at once into a buffer, and ``receive_many`` hands out as many as its caller
can start on (``receive``: one); acknowledgements are batched by each backend. While a
message waits in the buffer its lease runs, so a message past half its lease gets its lease
renewed together with every other one past a third (one round trip), and one past its whole
lease is dropped (the backend hands it out again, maybe to another member). A failed fetch
is retried with capped backoff while the backend is unreachable.

The backend-specific parts are four hooks: :meth:`BufferedGroupStream._fill` (fetch into the
buffer), ``_ack``, ``_renew`` and ``_shut`` (closing).

**Ordered groups** (``ordered=True``) have one active member at a time, as RabbitMQ's single
active consumer: members compete for the group's leadership, a lease in the backend
(``_lead``/``_resign``), and only the leader fetches; its broker runs different keys on its
workers in parallel and one key at a time. Neither backend can take "the oldest unfinished
event of a key" atomically across members (Redis could in a script, but not without keeping
a queue per key; JetStream cannot), and this keeps one mechanism for both. A new leader
first takes over what the previous one left unacknowledged (``_take_over``), oldest first,
so a key's next event never overtakes the one a killed leader held. The cost: an ordered
group runs at one member's speed, and failover waits for the leadership lease to lapse.
The leadership is renewed with every lease renewal of a delivery, so a leader busy in long
handlers keeps it; a leader cut off from the backend for a whole lease can lose it while a
handler still runs (as every lease without fencing can).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..event import Event
from ..pattern import compile_pattern
from ._backoff import Backoff
from .base import Closeable

if TYPE_CHECKING:
    from ._remote import RemoteProvider

__all__ = ["BufferedDelivery", "BufferedGroupStream"]

log = logging.getLogger(__name__)

TokenT = TypeVar("TokenT")


class BufferedDelivery(Generic[TokenT]):
    """One message leased to one member of a group.

    ``token`` is what the backend needs to settle it (a Redis entry id, a NATS message).
    """

    __slots__ = ("_stream", "done", "event", "received_at", "token")

    def __init__(self, event: Event, token: TokenT, stream: BufferedGroupStream[TokenT]) -> None:
        self.event = event
        self.token = token
        self._stream = stream
        self.received_at = time.monotonic()
        self.done = False

    def ack(self) -> None:
        """The event is done: the group never gets it again. Idempotent."""
        if not self.done:
            self.done = True
            self._stream._ack(self)

    def renew(self) -> None:
        """Extend the lease by its full length from now (no-op once acknowledged)."""
        if not self.done:
            self._stream._renew((self,))
            self.received_at = time.monotonic()
            if self._stream.ordered:
                self._stream._keep_lead(acquire=False)

    def __repr__(self) -> str:
        return f"<{self._stream.kind} delivery {self.event.type} {self.event.id}>"


class BufferedGroupStream(Closeable, Generic[TokenT]):
    """The shared skeleton of a group member; ``receive`` runs in the caller's thread.

    One thread receives at a time; ``close()`` may come from any thread and wakes it.
    """

    #: Names the backend in ``repr`` and log lines ("redis", "nats").
    kind = ""

    def __init__(self, provider: RemoteProvider[Any], pattern: str, group: str, lease: float,
                 *, name: str, reconnect_max_delay: float, ordered: bool = False) -> None:
        self._p = provider
        #: One active member at a time (see the module docstring).
        self.ordered = ordered
        self._lead_token = uuid.uuid4().hex
        self._leading = False
        self._lead_due = 0.0  # time.monotonic() when the leadership is renewed next
        self._lead_lock = threading.Lock()
        self.pattern = pattern
        self.group = group
        self.lease = lease
        #: The backend's name for the group (log lines, ``repr``).
        self.name = name
        self._match = compile_pattern(pattern)
        self._buffer: collections.deque[BufferedDelivery[TokenT]] = collections.deque()
        self._recv_lock = threading.Lock()  # one reader at a time
        self._closed = threading.Event()
        self._backoff = Backoff(reconnect_max_delay)

    def receive(self, timeout: float | None = None) -> BufferedDelivery[TokenT] | None:
        """The next delivery, or ``None`` once ``timeout`` seconds passed.

        Raises:
            StopIteration: the member was closed.
            ProviderError: the backend refused a request (not merely unreachable).
        """
        got = self.receive_many(1, timeout)
        return got[0] if got else None

    def receive_many(self, limit: int, timeout: float | None = None
                     ) -> list[BufferedDelivery[TokenT]]:
        """Up to ``limit`` deliveries: what is buffered, else one fetch's worth; ``[]`` once
        ``timeout`` seconds passed with nothing.

        One call hands a consumer a whole batch (one lock, one count), so the broker can
        dispatch and settle it together instead of paying its bookkeeping per event. It
        never fetches again once it has something: the rest stays buffered, its leases
        running.

        Raises:
            StopIteration: the member was closed.
            ProviderError: the backend refused a request (not merely unreachable).
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._recv_lock:
            first = True
            while True:
                if self._closed.is_set():
                    raise StopIteration
                if self.ordered and not self._keep_lead(acquire=True):
                    # A standby member: look again when the leader's lease may have lapsed.
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return []
                    pause = self.lease / 4
                    self._closed.wait(pause if remaining is None else min(pause, remaining))
                    continue
                self._before_take()
                out: list[BufferedDelivery[TokenT]] = []
                while len(out) < limit:
                    delivery = self._next_buffered()
                    if delivery is None:
                        break
                    out.append(delivery)
                if out:
                    self._p._count_consumed(len(out))
                    return out
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0 and not first:
                    return out
                first = False
                wait = self._p.block if remaining is None else min(self._p.block, remaining)
                try:
                    self._fill(wait)
                    self._backoff.reset()
                except StopIteration:
                    raise
                except Exception as exc:
                    if self._closed.is_set():
                        raise StopIteration from None
                    if self._recovered(exc):
                        continue
                    if not isinstance(exc, self._p.connection_errors):
                        if isinstance(exc, self._p.driver_errors):
                            raise self._p._error(exc) from exc
                        raise
                    delay = self._backoff.next()
                    log.warning("%s group %s: %s; retrying in %.2f s", self.kind, self.name,
                                exc, delay)
                    if deadline is not None:
                        delay = min(delay, max(0.0, deadline - time.monotonic()))
                    self._closed.wait(delay)

    def _next_buffered(self) -> BufferedDelivery[TokenT] | None:
        """The oldest buffered delivery whose lease is still ours, renewing it if it aged."""
        while self._buffer:
            now = time.monotonic()
            age = now - self._buffer[0].received_at
            if age >= self.lease:
                # The backend hands it out again, maybe to another member already.
                self._buffer.popleft()
                continue
            if age >= self.lease / 2:
                stale = [d for d in self._buffer if now - d.received_at >= self.lease / 3]
                ours = self._renew(stale)
                for d in stale:
                    if d in ours:
                        d.received_at = now
                    else:
                        self._buffer.remove(d)
                continue
            return self._buffer.popleft()
        return None

    def _keep_lead(self, *, acquire: bool) -> bool:
        """Ordered groups: whether this member leads the group, renewing the leadership every
        ``lease / 3`` (and taking it when ``acquire`` and it is free or lapsed).

        On becoming the leader it takes over what the previous leader left unacknowledged
        before anything new; on losing it, it drops its buffer (the backend hands those out
        again, to the new leader).
        """
        with self._lead_lock:
            now = time.monotonic()
            if self._leading and now < self._lead_due:
                return True
            if not self._leading and not acquire:
                return False
            try:
                held = self._lead(self._lead_token)
            except Exception as exc:
                log.warning("%s group %s: leadership check failed: %s", self.kind, self.name, exc)
                held = False
            was = self._leading
            self._leading = held
            self._lead_due = now + self.lease / 3
            if held and not was:
                log.info("%s group %s: this member (%s) leads the ordered group", self.kind,
                         self.name, self._lead_token[:8])
                self._take_over()
            elif was and not held:
                log.warning("%s group %s: lost the leadership of the ordered group", self.kind,
                            self.name)
                self._buffer.clear()
            return held

    def close(self) -> None:
        """Stop receiving (idempotent); unacknowledged deliveries go to other members."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._shut()
        if self.ordered and self._leading:
            try:
                self._resign(self._lead_token)
            except Exception as exc:  # it lapses by itself after one lease
                log.debug("%s group %s: resign: %s", self.kind, self.name, exc)
            self._leading = False
        self._p._forget_group(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} group {self.name!r}>"

    # -- hooks -------------------------------------------------------------------------------

    def _before_take(self) -> None:
        """Called before each look at the buffer (holding the receive lock)."""

    def _fill(self, wait: float) -> None:
        """Fetch into ``_buffer``, blocking up to ``wait`` seconds; raise on failure."""
        raise NotImplementedError  # pragma: no cover

    def _recovered(self, exc: Exception) -> bool:
        """After ``_fill`` raised ``exc``: True when it was repaired and may be retried now."""
        return False

    def _ack(self, delivery: BufferedDelivery[TokenT]) -> None:
        raise NotImplementedError  # pragma: no cover

    def _renew(self, deliveries: Sequence[BufferedDelivery[TokenT]]
               ) -> Collection[BufferedDelivery[TokenT]]:
        """Extend the leases of ``deliveries``; return those that are still this member's."""
        raise NotImplementedError  # pragma: no cover

    def _shut(self) -> None:
        """Release the member's resources; ``_closed`` is already set."""
        raise NotImplementedError  # pragma: no cover

    def _lead(self, token: str) -> bool:
        """Ordered groups: take or renew the group's leadership for ``token`` (one lease from
        now); whether ``token`` holds it."""
        raise NotImplementedError  # pragma: no cover

    def _resign(self, token: str) -> None:
        """Ordered groups: give the leadership up, if ``token`` still holds it."""
        raise NotImplementedError  # pragma: no cover

    def _take_over(self) -> None:
        """Ordered groups, on becoming the leader: make what the previous leader left
        unacknowledged come first (oldest first), before anything new is fetched."""
        raise NotImplementedError  # pragma: no cover
