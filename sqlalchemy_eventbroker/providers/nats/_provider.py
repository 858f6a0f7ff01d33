"""``NatsProvider``: the store, publishing, fan-out and the wiring (see the package docstring)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import re
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ClassVar

import nats.errors
import nats.js.errors
import nats.js.kv
from nats.aio.msg import Msg
from nats.js import api

from ... import _json
from ..._json import dumps, loads
from ..._types import JSON
from ...errors import EventValidationError, ProviderError
from ...event import Event, EventStatus
from .._loop import LoopClosed, LoopThread
from .._remote import RemoteProvider
from ..base import EventFilter, ProviderStats, QueueEventStream, StatusUpdate
from ._connection import connect, ensure_bucket, ensure_stream
from ._group import NatsGroupStream
from ._names import BAD_SUBJECT, bucket_name, subject_filter, unique_safe_name

__all__ = ["NatsProvider"]

log = logging.getLogger("sqlalchemy_eventbroker.providers.nats")

_ORIGIN = "Eventbroker-Origin"
_STATUS_CONCURRENCY = 32  # status updates in flight at once in update_status_many
#: Longest subject sent, in bytes: the server's default ``max_control_line`` (4,096 bytes) less
#: room for the rest of the ``HPUB`` line (reply inbox, sizes). A longer one makes the server
#: drop the whole connection, so it is refused here, before anything is sent.
MAX_SUBJECT_BYTES = 3840
#: Bytes kept free in ``max_payload`` for the headers of a stream message (origin, ids).
_HEADER_ROOM = 256
_PUTS_IN_FLIGHT = 1000  # puts (and publishes) written before their acks are awaited


class _NatsFanoutStream(QueueEventStream):
    """A fan-out stream fed by one ordered consumer; ``close()`` unsubscribes it.

    The loop thread only queues the raw message body; the reader's thread parses it, so the
    one loop thread that serves every call of the provider stays free for I/O.
    """

    sub: Any = None

    def receive(self, timeout: float | None = None) -> Event | None:
        while True:
            item: Any = super().receive(timeout)
            if not isinstance(item, bytes):
                return item  # type: ignore[no-any-return]
            try:
                return Event.from_json(item)
            except Exception:
                log.exception("nats: unreadable message in stream %r", self.pattern)


class NatsProvider(RemoteProvider[_NatsFanoutStream]):
    """Events on NATS JetStream (see the package docstring for subjects and guarantees).

    Args:
        url: ``nats://host:port``; unreachable at construction raises ``ProviderError``.
        stream_name: the JetStream stream (created if missing); also names the KV bucket.
        subject_prefix: first subject token(s); defaults to ``stream_name``.
        consumer_group: prefix of the durable consumer names made for group streams.
        storage: ``"file"`` (survives restarts) or ``"memory"``.
        max_age: seconds the stream and the store keep events; 0 = forever.
        max_msgs: cap on stream messages (oldest dropped); 0 = unlimited.
        batch_size: messages per group fetch and per pipelined publish/store.
        block: longest single fetch wait in seconds.
        request_timeout: seconds to wait for a JetStream API answer (publish acks included).
        connect_timeout: seconds to wait for the first connection.
        reconnect_wait: seconds between reconnection attempts (nats-py retries forever).
        max_ack_pending: cap on unacknowledged messages per group.

    Raises:
        ProviderError: no server answers at ``url``, or JetStream is not enabled there.
    """

    provider_type = "nats"
    driver_errors: ClassVar[tuple[type[BaseException], ...]] = (
        nats.errors.Error, TimeoutError, OSError, LoopClosed)
    #: A fetch failing with these is retried (nats-py reconnects by itself).
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (nats.errors.Error,)

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        stream_name: str = "EVENTBROKER_EVENTS",
        subject_prefix: str | None = None,
        *,
        consumer_group: str = "eventbroker-workers",
        storage: str = "file",
        max_age: float = 0.0,
        max_msgs: int = 0,
        batch_size: int = 100,
        block: float = 1.0,
        request_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        reconnect_wait: float = 0.5,
        max_ack_pending: int = 10_000,
    ) -> None:
        if not stream_name or re.search(r"[\s.*>/\\]", stream_name):
            raise ValueError(f"NatsProvider: invalid stream_name {stream_name!r}")
        if storage not in ("file", "memory"):
            raise ValueError(f"NatsProvider: storage must be 'file' or 'memory', got {storage!r}")
        super().__init__(url)
        self.stream_name = stream_name
        self.subject_prefix = subject_prefix or stream_name
        if BAD_SUBJECT.search(self.subject_prefix):
            raise ValueError(f"NatsProvider: invalid subject_prefix {self.subject_prefix!r}")
        self.consumer_group = consumer_group
        self.storage = storage
        self.max_age = max_age
        self.max_msgs = max_msgs
        self.batch_size = batch_size
        self.block = block
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.max_ack_pending = max_ack_pending
        self.bucket = bucket_name(stream_name)
        # Status writes: their own connection and loop thread, made on first use.
        self._status_lock = threading.Lock()
        self._status_loop: LoopThread | None = None
        self._status_nc: Any = None
        self._status_kv: Any = None
        self._loop = LoopThread(name=f"eventbroker-nats-{stream_name}")
        try:
            with self._translate_errors():
                self._loop.run(self._connect(), connect_timeout + request_timeout * 3)
        except BaseException:
            self._loop.close()
            raise

    # -- connection ----------------------------------------------------------------------------

    async def _open(self, name: str) -> Any:
        return await connect(self.url, self._address, name, connect_timeout=self.connect_timeout,
                             reconnect_wait=self.reconnect_wait, is_closing=lambda: self._closed)

    async def _connect(self) -> None:
        self._nc = await self._open(f"eventbroker:{self.stream_name}")
        try:
            self._js = self._nc.jetstream(timeout=self.request_timeout)
            await ensure_stream(self._js, self.stream_name, self.subject_prefix,
                                storage=self.storage, max_age=self.max_age,
                                max_msgs=self.max_msgs)
            self._kv = await ensure_bucket(self._js, self.bucket, self.stream_name,
                                           storage=self.storage, max_age=self.max_age)
        except BaseException:
            await self._nc.close()
            raise

    async def _connect_status(self) -> None:  # on the status loop
        nc = await self._open(f"eventbroker:{self.stream_name}:status")
        try:
            kv = await nc.jetstream(timeout=self.request_timeout).key_value(self.bucket)
        except BaseException:
            await nc.close()
            raise
        self._status_nc, self._status_kv = nc, kv

    def _run_status(self, make: Callable[[Any], Coroutine[Any, Any, None]],
                    timeout: float | None = None) -> None:
        """Run ``make(kv)`` (a coroutine on the status bucket handle) on the status loop,
        connecting it first if this is the first status write."""
        self._check_open()
        loop = self._status_loop
        if loop is None:
            with self._status_lock:
                self._check_open()
                loop = self._status_loop
                if loop is None:
                    loop = LoopThread(name=f"eventbroker-nats-status-{self.stream_name}")
                    try:
                        with self._translate_errors():
                            loop.run(self._connect_status(),
                                     self.connect_timeout + self.request_timeout * 2)
                    except BaseException:
                        loop.close()
                        raise
                    self._status_loop = loop
        with self._translate_errors():
            loop.run(make(self._status_kv), timeout or self.request_timeout * 3)

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        if self._closed:
            coro.close()
            self._check_open()
        with self._translate_errors():
            return self._loop.run(coro, timeout or self.request_timeout * 3)

    # -- store ---------------------------------------------------------------------------------

    def _store_items(self, events: Sequence[Event]) -> list[tuple[str, bytes]]:
        """Each event's key and JSON, checked against the server's ``max_payload`` before
        anything is sent (a message over it is refused by the server)."""
        self._check_open()
        limit = int(getattr(self._nc, "max_payload", 0) or 0) - _HEADER_ROOM
        items = []
        for e in events:
            if not nats.js.kv._is_key_valid(e.id):
                raise ProviderError(f"nats at {self._address}: invalid key {e.id!r}")
            value = e.to_json().encode()
            if limit > 0 and len(value) > limit:
                raise ProviderError(
                    f"nats at {self._address}: event {e.id} is {len(value)} bytes as JSON, over "
                    f"the server's max_payload of {limit + _HEADER_ROOM} bytes (less "
                    f"{_HEADER_ROOM} for headers); nothing was sent")
            items.append((e.id, value))
        return items

    def store(self, event: Event) -> None:
        """Store ``event`` now (one put, acknowledged)."""
        _json.check_storable(event.payload, "payload")
        _json.check_storable(event.metadata, "metadata")
        ((key, value),) = self._store_items((event,))

        async def put() -> None:
            ack = await self._js.publish_async(self._kv._pre + key, value)
            await asyncio.wait_for(ack, self.request_timeout)

        self._run(put(), self.request_timeout * 2)

    async def _get(self, event_id: str) -> tuple[Event, int] | None:
        try:
            entry = await self._kv.get(event_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError,
                nats.js.errors.InvalidKeyError):
            return None
        if entry.value is None:
            return None
        try:
            return Event.from_json(entry.value), int(entry.revision or 0)
        except EventValidationError as exc:
            # A corrupt entry is logged with its id and treated as absent, never fatal.
            log.error("nats: stored event %s in bucket %s is unreadable and skipped: %s",
                      event_id, self.bucket, exc)
            return None

    def get(self, event_id: str) -> Event | None:
        found = self._run(self._get(event_id))
        return found[0] if found else None

    async def _scan(self) -> list[Event]:
        """The latest value of every key in the bucket, read with one ordered consumer.

        Reads up to the bucket's last sequence as of the start (not the consumer's pending
        count, which nats-server 2.9 does not always report exactly for last-per-subject).
        """
        stream = f"KV_{self.bucket}"
        state = (await self._js.stream_info(stream)).state
        if not state.messages:
            return []
        last = state.last_seq
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        events: list[Event] = []

        async def on_msg(msg: Msg) -> None:
            op = msg.headers.get("KV-Operation") if msg.headers else None
            if op is None and msg.data:
                try:
                    events.append(Event.from_json(msg.data))
                except EventValidationError as exc:
                    log.error("nats: stored event %s in bucket %s is unreadable and skipped: %s",
                              msg.subject.rpartition(".")[2], self.bucket, exc)
            if msg.metadata.sequence.stream >= last and not done.done():
                done.set_result(None)

        sub = await self._js.subscribe(
            f"$KV.{self.bucket}.>", stream=stream, cb=on_msg, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        )
        try:
            await asyncio.wait_for(done, self.request_timeout + state.messages / 5000)
        finally:
            await sub.unsubscribe()
        return events

    def list(self, filter: EventFilter) -> list[Event]:
        """Stored events passing ``filter``, oldest ``created_at`` first (ties by id).

        Reads every stored event (see the package docstring): cost grows with the bucket.
        """
        events = [e for e in self._run(self._scan(), None) if filter.matches(e)]
        events.sort(key=lambda e: (e.created_at, e.id))
        events = events[filter.offset:]
        return events[:filter.limit] if filter.limit else events

    async def _update(self, kv: Any, update: StatusUpdate) -> None:
        """Read the stored JSON, patch the status fields, compare-and-set on its revision.

        The JSON is patched as a dict (no ``Event`` built and re-encoded): a consumer writes
        a status for every event it handles, so this is on a hot path.
        """
        event_id, status, error, retry_count = update
        status = EventStatus(status)
        for _ in range(50):
            try:
                entry = await kv.get(event_id)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError,
                    nats.js.errors.InvalidKeyError):
                return
            if entry.value is None:
                return
            d = loads(entry.value)
            now = dt.datetime.now(dt.UTC).isoformat()
            d["status"] = str(status)
            d["error"] = error
            if retry_count is not None:
                d["retry_count"] = int(retry_count)
            if status is EventStatus.PROCESSING:
                d["processed_at"] = now
            elif status in (EventStatus.COMPLETED, EventStatus.FAILED):
                d["completed_at"] = now
                if not d.get("processed_at"):
                    d["processed_at"] = now
            try:
                await kv.update(event_id, dumps(d).encode(), last=int(entry.revision or 0))
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # someone else changed it meanwhile: read again
        raise ProviderError(f"nats at {self._address}: update_status({event_id}) kept conflicting")

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None:
        """Apply ``updates`` (same semantics as ``update_status`` each), the updates of
        different events concurrently, those of one event in order."""
        if not updates:
            return
        by_id: dict[str, list[StatusUpdate]] = {}
        for u in updates:
            by_id.setdefault(u.event_id, []).append(u)

        # At most _STATUS_CONCURRENCY events in flight: enough to hide the round trips
        # without flooding the status connection's outbound buffer.
        async def apply(kv: Any) -> None:
            limit = asyncio.Semaphore(_STATUS_CONCURRENCY)

            async def one(chain: list[StatusUpdate]) -> None:
                async with limit:
                    for u in chain:
                        await self._update(kv, u)

            await asyncio.gather(*(one(c) for c in by_id.values()))

        self._run_status(apply, self.request_timeout * (3 + len(by_id) // 100))

    def delete(self, event_id: str) -> None:
        async def purge() -> None:
            with contextlib.suppress(nats.js.errors.InvalidKeyError):
                await self._kv.purge(event_id)

        self._run(purge())

    # -- transport -----------------------------------------------------------------------------

    def _subject(self, event: Event) -> str:
        if BAD_SUBJECT.search(event.type):
            raise ProviderError(
                f"nats at {self._address}: event type {event.type[:80]!r} is not a valid NATS "
                "subject (no whitespace, '*', '>' or empty segments)"
            )
        subject = f"{self.subject_prefix}.{event.type}"
        if len(subject) > MAX_SUBJECT_BYTES // 4 and \
                len(subject.encode("utf-8", "surrogatepass")) > MAX_SUBJECT_BYTES:
            raise ProviderError(
                f"nats at {self._address}: event {event.id}: the subject for type "
                f"{event.type[:40]!r}... has {len(subject.encode('utf-8', 'surrogatepass'))} "
                f"bytes, over the {MAX_SUBJECT_BYTES} a NATS subject may have here; nothing "
                "was sent")
        return subject

    def store_and_publish_many(self, events: Sequence[Event], *, origin: str = "") -> None:
        """Put ``events`` in the bucket and publish them to the stream in one round trip:
        every put is written to the connection ahead of its publish, all in flight at once
        (up to ~1000 messages at a time), and the acks are awaited together. ``origin``
        goes in a header (see the package docstring)."""
        if not events:
            return
        subjects = [self._subject(e) for e in events]
        stored = self._store_items(events)
        headers = {_ORIGIN: origin} if origin else None
        pre = self._kv._pre
        stream = self.stream_name
        size = max(self.batch_size, _PUTS_IN_FLIGHT) // 2
        timeout = self.request_timeout

        async def send() -> None:
            publish_async = self._js.publish_async
            for i in range(0, len(events), size):
                futures = []
                for key, value in stored[i:i + size]:
                    futures.append(await publish_async(pre + key, value))
                for j in range(i, min(i + size, len(events))):
                    futures.append(await publish_async(
                        subjects[j], stored[j][1], stream=stream,
                        headers=dict(headers) if headers else None))
                await asyncio.wait_for(asyncio.gather(*futures), timeout)

        self._run(send(), timeout * (3 + len(events) // size))
        self._count_published(len(events))

    def stream(self, pattern: str, *, exclude_origin: str = "") -> _NatsFanoutStream:
        """A fan-out stream of events published after this call returns (see the package
        docstring); messages published with ``origin == exclude_origin`` are skipped unread."""
        subject = subject_filter(self.subject_prefix, pattern)
        s = _NatsFanoutStream(pattern, on_close=self._forget_stream)
        skip = len(self.subject_prefix) + 1

        async def on_msg(msg: Msg) -> None:
            if exclude_origin and msg.headers and msg.headers.get(_ORIGIN) == exclude_origin:
                return
            if s.wants(msg.subject[skip:]):
                s._put(msg.data)  # type: ignore[arg-type]
                self._count_consumed(1)

        async def subscribe() -> Any:
            return await self._js.subscribe(
                subject, stream=self.stream_name, cb=on_msg, ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.NEW, idle_heartbeat=2.0,
            )

        s.sub = self._run(subscribe())
        with self._lock:
            if self._closed:
                s.close()
            else:
                self._streams.append(s)
        return s

    def _forget_stream(self, s: _NatsFanoutStream) -> None:
        super()._forget_stream(s)
        if s.sub is not None and not self._closed:
            with contextlib.suppress(*self.driver_errors):
                self._loop.run(s.sub.unsubscribe(), self.request_timeout)

    def _open_group(self, pattern: str, group: str, lease: float) -> NatsGroupStream:
        return NatsGroupStream(self, pattern, group, lease)

    # -- lifecycle -----------------------------------------------------------------------------

    def stats(self) -> ProviderStats:

        async def gather() -> tuple[list[Event], Any, Any, list[Any]]:
            events = await self._scan()
            sinfo = await self._js.stream_info(self.stream_name)
            kinfo = await self._js.stream_info(f"KV_{self.bucket}")
            consumers = await self._js.consumers_info(self.stream_name)
            return events, sinfo, kinfo, consumers

        events, sinfo, kinfo, consumers = self._run(gather(), None)
        prefix = unique_safe_name(self.consumer_group) + "-"
        groups: dict[str, JSON] = {
            c.name: {"pending": c.num_pending, "ack_pending": c.num_ack_pending,
                     "redelivered": c.num_redelivered, "waiting": c.num_waiting}
            for c in consumers if c.name and c.name.startswith(prefix)
        }
        return self._stats(len(events), collections.Counter(str(e.status) for e in events), {
            "stream": self.stream_name,
            "stream_messages": sinfo.state.messages,
            "stream_bytes": sinfo.state.bytes,
            "first_seq": sinfo.state.first_seq,
            "last_seq": sinfo.state.last_seq,
            "consumer_count": sinfo.state.consumer_count,
            "bucket": self.bucket,
            "bucket_messages": kinfo.state.messages,
            "groups": groups,
        })

    def drop(self) -> None:
        """Delete the stream (with its consumers) and the store bucket. For tests."""

        async def delete() -> None:
            for name in (self.stream_name, f"KV_{self.bucket}"):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self._js.delete_stream(name)

        self._run(delete())

    def close(self) -> None:
        """End every open stream, close both connections and stop both loop threads."""
        with self._lock:
            if self._closed:
                return
            streams, self._streams = list(self._streams), []
            groups = list(self._groups)
        for g in groups:
            g.close()
        with self._lock:
            self._closed = True
        for s in streams:
            s.close()
        with self._status_lock:  # a status write starting now sees _closed
            status_loop, self._status_loop = self._status_loop, None
            status_nc, self._status_nc = self._status_nc, None

        async def disconnect(nc: Any) -> None:
            with contextlib.suppress(Exception):
                await nc.flush(timeout=1)
            await nc.close()

        for loop, nc in ((status_loop, status_nc), (self._loop, self._nc)):
            if loop is None:
                continue
            if nc is not None:
                try:
                    loop.run(disconnect(nc), self.request_timeout)
                except Exception as exc:
                    log.debug("nats at %s: close: %s", self._address, exc)
            loop.close()
