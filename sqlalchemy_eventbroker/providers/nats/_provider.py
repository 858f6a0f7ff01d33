"""``NatsProvider``: the store, publishing, fan-out and the wiring (see the package docstring)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import re
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, ClassVar

import nats.errors
import nats.js.errors
import nats.js.kv
from nats.aio.msg import Msg
from nats.js import api

from ... import _json
from ..._types import JSON
from ...errors import ProviderError
from ...event import Event, EventStatus
from .._loop import LoopClosed, LoopThread
from .._remote import RemoteProvider
from ..base import EventFilter, ProviderStats, QueueEventStream, StatusUpdate
from ._connection import connect, ensure_bucket, ensure_stream
from ._group import NatsGroupStream
from ._names import (
    BAD_SUBJECT,
    bucket_name,
    lead_bucket_name,
    status_bucket_name,
    stored_prefix,
    subject_filter,
    unique_safe_name,
)
from ._store import (
    CLOCK_MARGIN,
    ID_HEADER,
    STATUS_HISTORY,
    StatusEntries,
    build_event,
    fetch_statuses,
    fold_status_messages,
    id_time,
    read_stream,
    status_entry,
)

__all__ = ["NatsProvider"]

log = logging.getLogger("sqlalchemy_eventbroker.providers.nats")

_ORIGIN = "Eventbroker-Origin"
_STATUS_LOOKUPS = 64  # list(): up to this many events, their statuses are looked up one by one
#: Longest a scan (get, list, stats, delete) may run in all; each read also fails after twice
#: ``request_timeout`` seconds without progress.
_SCAN_BUDGET = 3600.0
#: ``get``/``delete`` first read from this long before the time in the event's id.
_NEAR = dt.timedelta(seconds=2)
#: Longest subject sent, in bytes: the server's default ``max_control_line`` (4,096 bytes) less
#: room for the rest of the ``HPUB`` line (reply inbox, sizes). A longer one makes the server
#: drop the whole connection, so it is refused here, before anything is sent.
MAX_SUBJECT_BYTES = 3840
#: Bytes kept free in ``max_payload`` for the headers of a stream message: the event id and the
#: origin (an instance id, up to 255 characters).
_HEADER_ROOM = 512
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
        self.stored_prefix = stored_prefix(stream_name)
        #: The key-value bucket of status entries.
        self.bucket = status_bucket_name(stream_name)
        self._kv_stream = f"KV_{self.bucket}"
        self._status_pre = f"$KV.{self.bucket}."
        # Status writes: their own connection and loop thread, made on first use.
        self._status_lock = threading.Lock()
        self._status_loop: LoopThread | None = None
        self._status_nc: Any = None
        self._status_js: Any = None
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
            await ensure_stream(self._js, self.stream_name,
                                [f"{self.subject_prefix}.>", f"{self.stored_prefix}.>"],
                                storage=self.storage, max_age=self.max_age,
                                max_msgs=self.max_msgs)
            self._kv = await ensure_bucket(self._js, self.bucket, self.stream_name,
                                           storage=self.storage, max_age=self.max_age,
                                           history=STATUS_HISTORY)
        except BaseException:
            await self._nc.close()
            raise

    async def _connect_status(self) -> None:  # on the status loop
        nc = await self._open(f"eventbroker:{self.stream_name}:status")
        self._status_nc, self._status_js = nc, nc.jetstream(timeout=self.request_timeout)

    def _run_status(self, make: Callable[[Any], Coroutine[Any, Any, None]],
                    timeout: float | None = None) -> None:
        """Run ``make(js)`` (a coroutine on the status connection's JetStream context) on the
        status loop, connecting it first if this is the first status write."""
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
            loop.run(make(self._status_js), timeout or self.request_timeout * 3)

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        if self._closed:
            coro.close()
            self._check_open()
        with self._translate_errors():
            return self._loop.run(coro, timeout or self.request_timeout * 3)

    # -- store ---------------------------------------------------------------------------------

    def _bodies(self, events: Sequence[Event]) -> list[bytes]:
        """Each event's JSON, checked against the server's ``max_payload`` and its id against
        what a status key may hold, before anything is sent (the server refuses a message
        over ``max_payload``)."""
        self._check_open()
        limit = int(getattr(self._nc, "max_payload", 0) or 0) - _HEADER_ROOM
        bodies = []
        for e in events:
            if not nats.js.kv._is_key_valid(e.id):
                raise ProviderError(f"nats at {self._address}: invalid event id {e.id!r}")
            value = e.to_json().encode()
            if limit > 0 and len(value) > limit:
                raise ProviderError(
                    f"nats at {self._address}: event {e.id} is {len(value)} bytes as JSON, over "
                    f"the server's max_payload of {limit + _HEADER_ROOM} bytes (less "
                    f"{_HEADER_ROOM} for headers); nothing was sent")
            bodies.append(value)
        return bodies

    def store(self, event: Event) -> None:
        """Store ``event`` without publishing it: one message on its stored-only subject
        (``_eventbroker_stored.<stream>.<type>``, which no stream or group reads), acknowledged
        before this returns."""
        _json.check_storable(event.payload, "payload")
        _json.check_storable(event.metadata, "metadata")
        subject = self._subject(event, self.stored_prefix)
        (body,) = self._bodies((event,))

        async def put() -> None:
            await (await self._js.publish_async(subject, body, headers={ID_HEADER: event.id}))

        self._run(put(), self.request_timeout)

    def _scan_timeout(self) -> float:
        return self.request_timeout * 2

    async def _locate(self, event_id: str, *, every: bool = False) -> list[int]:
        """The stream sequences of the messages of ``event_id``, oldest first: a read of the
        headers stored since the id's time (see ``_store``).

        First from ``_NEAR`` before that time: an event is nearly always stored within it, and
        every later copy of it is stored later still, so a hit there is the whole answer. Only
        a miss reads again from ``CLOCK_MARGIN`` before (or, for an id without a time, from the
        stream's start). With ``every`` (``delete``), only the wide read: a copy stored before
        the near start, by a server whose clock is behind, is found too.
        """
        made = id_time(event_id)
        starts: list[dt.datetime | None] = \
            [None] if made is None else [made - dt.timedelta(seconds=CLOCK_MARGIN)]
        if made is not None and not every:
            starts.insert(0, made - _NEAR)
        for start in starts:
            # "": no subject filter, both subject spaces in one read.
            msgs = await read_stream(self._js, self.stream_name, "", start=start,
                                     headers_only=True, progress_timeout=self._scan_timeout())
            found = [m.metadata.sequence.stream for m in msgs
                     if m.headers and m.headers.get(ID_HEADER) == event_id]
            if found:
                return found
        return []

    async def _get(self, event_id: str) -> Event | None:
        if not nats.js.kv._is_key_valid(event_id):
            return None  # store() refuses such ids: never stored
        seqs, entries = await asyncio.gather(
            self._locate(event_id),
            fetch_statuses(self._js, self._kv_stream, self._status_pre + event_id))
        if not seqs:
            return None
        try:
            msg = await self._js.get_msg(self.stream_name, seq=seqs[-1])
        except nats.js.errors.NotFoundError:
            return None  # deleted meanwhile
        return build_event(msg.data or b"", event_id, msg.time, entries,
                           f"stream {self.stream_name}")

    def get(self, event_id: str) -> Event | None:
        """The stored event with its current status, or ``None``.

        Reads the headers of the messages stored since the id's UUIDv7 time (less
        ``CLOCK_MARGIN``), then the one message by sequence; an id without a time reads the
        headers of the whole stream. See the package docstring.
        """
        return self._run(self._get(event_id), _SCAN_BUDGET)  # type: ignore[no-any-return]

    async def _statuses_of(self, ids: Sequence[str]) -> dict[str, StatusEntries]:
        """The status entries of ``ids``: looked up one by one for a few events, else one read
        of the whole status bucket."""
        if len(ids) <= _STATUS_LOOKUPS:
            found = await asyncio.gather(*(
                fetch_statuses(self._js, self._kv_stream, self._status_pre + i) for i in ids))
            return dict(zip(ids, found, strict=True))
        msgs = await read_stream(self._js, self._kv_stream, f"{self._status_pre}>",
                                 progress_timeout=self._scan_timeout())
        return fold_status_messages(msgs, set(ids))

    async def _read_events(self, flt: EventFilter) -> list[Event]:
        """Every stored event that ``flt``'s type pattern and start time may select (the
        latest copy of each id), with its status: the server filters by subject and starts
        at ``start_time`` less ``CLOCK_MARGIN``; the rest is filtered here."""
        start = None if flt.start_time is None else \
            flt.start_time - dt.timedelta(seconds=CLOCK_MARGIN)
        # No pattern: one read of the whole stream; else one per subject space, filtered.
        subjects = [""] if not flt.type_pattern else [
            subject_filter(prefix, flt.type_pattern)
            for prefix in (self.subject_prefix, self.stored_prefix)]
        parts = await asyncio.gather(*(
            read_stream(self._js, self.stream_name, subject, start=start,
                        progress_timeout=self._scan_timeout())
            for subject in subjects))
        latest: dict[str, tuple[int, Msg]] = {}
        for part in parts:
            for m in part:
                event_id = m.headers.get(ID_HEADER) if m.headers else None
                if event_id is None:
                    continue  # not written by this provider
                seq = m.metadata.sequence.stream
                if event_id not in latest or latest[event_id][0] < seq:
                    latest[event_id] = (seq, m)
        entries = await self._statuses_of(list(latest))
        where = f"stream {self.stream_name}"
        events = []
        for event_id, (_, m) in latest.items():
            e = build_event(m.data, event_id, m.metadata.timestamp,
                            entries.get(event_id, []), where)
            if e is not None:
                events.append(e)
        return events

    def list(self, filter: EventFilter) -> list[Event]:
        """Stored events passing ``filter``, oldest ``created_at`` first (ties by id).

        A scan: it reads every message on the subjects the type pattern selects, from
        ``start_time`` (less ``CLOCK_MARGIN``) on, and the status entries of what it read;
        the other fields, the sort and ``limit``/``offset`` are applied here (stream order is
        publish order, not ``created_at`` order, so a limit cannot end the read early). See
        the package docstring.
        """
        events = [e for e in self._run(self._read_events(filter), _SCAN_BUDGET)
                  if filter.matches(e)]
        events.sort(key=lambda e: (e.created_at, e.id))
        events = events[filter.offset:]
        return events[:filter.limit] if filter.limit else events

    def iter_events(self, filter: EventFilter | None = None) -> Iterator[Event]:
        """What ``list(filter)`` returns, from ONE read: paging by ``list`` would read the
        stream once per page (stream order is not ``created_at`` order, so a page cannot start
        where the last ended). Memory holds the selected events, as one ``list`` would."""
        yield from self.list(filter or EventFilter())

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None:
        """Append one status entry per update (see ``update_status``), all in flight at once,
        in order; nothing is read first. An unknown id gets an entry that no read ever
        shows (it expires with ``max_age``)."""
        entries = [(self._status_pre + u.event_id, status_entry(EventStatus(u.status), u.error,
                                                                u.retry_count))
                   for u in updates if nats.js.kv._is_key_valid(u.event_id)]
        if not entries:
            return
        timeout = self.request_timeout

        async def write(js: Any) -> None:
            publish_async = js.publish_async
            for i in range(0, len(entries), _PUTS_IN_FLIGHT):
                futures = [await publish_async(subject, value)
                           for subject, value in entries[i:i + _PUTS_IN_FLIGHT]]
                await (futures[0] if len(futures) == 1 else asyncio.gather(*futures))

        self._run_status(write, timeout * (1 + len(entries) // _PUTS_IN_FLIGHT))

    def delete(self, event_id: str) -> None:
        """Delete every message of ``event_id`` (found as ``get`` finds it) and purge its
        status entries."""
        if not nats.js.kv._is_key_valid(event_id):
            return

        async def remove() -> None:
            for seq in await self._locate(event_id, every=True):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self._js.delete_msg(self.stream_name, seq)
            await self._kv.purge(event_id)

        self._run(remove(), _SCAN_BUDGET)

    # -- transport -----------------------------------------------------------------------------

    def _subject(self, event: Event, prefix: str) -> str:
        if BAD_SUBJECT.search(event.type):
            raise ProviderError(
                f"nats at {self._address}: event type {event.type[:80]!r} is not a valid NATS "
                "subject (no whitespace, '*', '>' or empty segments)"
            )
        subject = f"{prefix}.{event.type}"
        if len(subject) > MAX_SUBJECT_BYTES // 4 and \
                len(subject.encode("utf-8", "surrogatepass")) > MAX_SUBJECT_BYTES:
            raise ProviderError(
                f"nats at {self._address}: event {event.id}: the subject for type "
                f"{event.type[:40]!r}... has {len(subject.encode('utf-8', 'surrogatepass'))} "
                f"bytes, over the {MAX_SUBJECT_BYTES} a NATS subject may have here; nothing "
                "was sent")
        return subject

    def store_and_publish_many(self, events: Sequence[Event], *, origin: str = "") -> None:
        """Store and publish ``events`` in one round trip: one message per event on
        ``<prefix>.<type>`` (the message is the stored copy), all in flight at once (up to
        ~1000 at a time), the acks awaited together. The event id and ``origin`` go in
        headers (see the package docstring)."""
        if not events:
            return
        prefix = self.subject_prefix
        subjects = [self._subject(e, prefix) for e in events]
        bodies = self._bodies(events)
        if origin:
            headers = [{ID_HEADER: e.id, _ORIGIN: origin} for e in events]
        else:
            headers = [{ID_HEADER: e.id} for e in events]
        size = max(self.batch_size, _PUTS_IN_FLIGHT)
        timeout = self.request_timeout

        async def send() -> None:
            publish_async = self._js.publish_async
            for i in range(0, len(events), size):
                futures = [await publish_async(subjects[j], bodies[j], headers=headers[j])
                           for j in range(i, min(i + size, len(events)))]
                await (futures[0] if len(futures) == 1 else asyncio.gather(*futures))

        # The acks' deadline is this call's (no timer per batch: ~10 % of a lone publish).
        self._run(send(), timeout * (1 + len(events) // size))
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

    def _open_group(self, pattern: str, group: str, lease: float,
                    ordered: bool) -> NatsGroupStream:
        return NatsGroupStream(self, pattern, group, lease, ordered=ordered)

    # -- lifecycle -----------------------------------------------------------------------------

    def stats(self) -> ProviderStats:

        async def gather() -> tuple[list[Event], Any, Any, list[Any]]:
            events = await self._read_events(EventFilter())
            sinfo = await self._js.stream_info(self.stream_name)
            kinfo = await self._js.stream_info(self._kv_stream)
            consumers = await self._js.consumers_info(self.stream_name)
            return events, sinfo, kinfo, consumers

        events, sinfo, kinfo, consumers = self._run(gather(), _SCAN_BUDGET)
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
            "status_bucket": self.bucket,
            "status_messages": kinfo.state.messages,
            "groups": groups,
        })

    def drop(self) -> None:
        """Delete the stream (with its consumers), the status bucket and the key-value store
        of earlier versions. For tests."""

        async def delete() -> None:
            for name in (self.stream_name, self._kv_stream,
                         f"KV_{bucket_name(self.stream_name)}",
                         f"KV_{lead_bucket_name(self.stream_name)}"):
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
