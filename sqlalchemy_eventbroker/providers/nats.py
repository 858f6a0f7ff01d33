"""NATS JetStream provider: one stream carries events, a key-value bucket stores them.

Backend
    nats-server ≥ 2.9 with JetStream enabled. URL form ``nats://[user:password@]host:port``
    (several servers separated by commas). nats-py is asyncio-only: each provider runs one
    :class:`~._loop.LoopThread` with one connection (plus one more of each for status writes,
    see Store), and the synchronous API waits on it.

Subjects and streams
    Events are published to ``<prefix>.<event type>`` in the JetStream stream ``stream_name``
    (subjects ``<prefix>.>``, file storage by default); ``prefix`` defaults to the stream name,
    so two providers with different stream names never see each other's events. A
    subscription pattern becomes a subject filter evaluated by the server: ``*`` →
    ``<prefix>.>``, a ``*`` segment → ``*``, a trailing ``**`` → ``>``. An event type that is not
    a valid subject (whitespace, ``*``, ``>``, empty segments) cannot be published here.

Store
    A key-value bucket (``<stream_name>_store``, history 1) maps event id → event JSON.
    ``update_status`` is a compare-and-set on the key's revision (retried on conflict);
    ``update_status_many`` runs the updates of different events concurrently. Status writes
    (read, then compare-and-set) go through a second connection on a second loop thread,
    made on the first status write: a consumer writing back thousands of statuses never
    queues its fan-out messages behind the key-value replies on one connection and loop.
    ``store``/``store_many`` put at once (all puts in flight together, acks awaited
    together). ``store_and_publish_many``, which the broker uses for every publish, writes
    the puts and then the stream publishes to the connection in one go and awaits all the
    acks together: one round trip for store + publish. Put and publish go to two JetStream
    streams: the server receives the put first, and a consumer's status write-back (after
    receiving and handling the event) finds it stored; the call returns only when both are
    acknowledged.
    ``list`` and ``stats`` read the latest value of every key (a KV watch), then filter and
    sort oldest ``created_at`` first in Python: their cost grows with the number of stored
    events. ``max_age`` bounds how long the stream and the bucket keep events.

Fan-out (``stream``)
    One ordered push consumer per stream, filtered by the pattern's subject, starting at new
    messages (``DeliverPolicy.NEW``, resolved by the server when the consumer is created, before
    ``stream()`` returns). Ordered consumers detect gaps (reconnects, server restarts) and
    re-create themselves from the last stream sequence they saw: no loss, no duplicates.

Groups (``group_stream``)
    One durable pull consumer per ``(group, pattern)`` (named from ``consumer_group``, the
    group and a hash of the pattern), explicit ack, ``ack_wait`` = the lease, unlimited
    redeliveries. Created at new messages on first open, it keeps its position while no
    member is open. ``Delivery.renew`` sends ``+WPI`` (in progress), resetting ``ack_wait``.
    Members fetch ``batch_size`` messages at a time; buffered messages nearing their lease
    are renewed, expired ones skipped (the server redelivers them), and on ``close()`` the
    unread ones are nak'ed so another member gets them at once.

Guarantees and limits
    * Everything the server acknowledged (``publish`` returned) survives a server restart with
      file storage and is delivered to groups and to open fan-out streams afterwards.
    * Group delivery is at least once; fan-out delivery is exactly once per open stream.
    * Order is the stream's order (per publisher: publish order).
    * Ack, renew and nak are fire-and-forget messages, queued and sent in batches (one task
      on the loop per batch): one lost during a disconnect means a redelivery after the
      lease, never a loss.

Errors from nats-py surface as ``ProviderError("nats at <url>: ...")`` from one place,
:func:`_translate_errors`. ``close()`` drains the connection and stops the loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from .._json import dumps, loads
from .._types import JSON
from ..errors import ProviderError
from ..event import Event, EventStatus
from ..pattern import compile_pattern, validate_pattern
from ._loop import LoopClosed, LoopThread
from .base import Closeable, EventFilter, ProviderBase, ProviderStats, QueueEventStream, StatusUpdate

__all__ = ["NatsProvider"]

log = logging.getLogger(__name__)

_DRIVER_ERRORS = (nats.errors.Error, asyncio.TimeoutError, TimeoutError, OSError, LoopClosed)
_BAD_SUBJECT = re.compile(r"[\s*>]|^\.|\.\.|\.$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")
_UTC = dt.UTC
_ORIGIN = "Eventbroker-Origin"
_ACK, _NAK, _WPI, _TERM = b"+ACK", b"-NAK", b"+WPI", b"+TERM"
_STATUS_CONCURRENCY = 32  # status updates in flight at once in update_status_many


def _safe_url(url: str) -> str:
    """``url`` with any password replaced, for messages and ``repr``."""
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        if parts.password:
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            one = urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
        out.append(one)
    return ",".join(out)


@contextlib.contextmanager
def _translate_errors(address: str) -> Iterator[None]:
    """Turn every nats-py (and socket/timeout) error into ``ProviderError("nats at ...")``."""
    try:
        yield
    except ProviderError:
        raise
    except _DRIVER_ERRORS as exc:
        # Several nats-py errors have an empty str(); name the class then.
        what = str(exc) if str(exc) else type(exc).__name__
        raise ProviderError(f"nats at {address}: {what}") from exc


def subject_filter(prefix: str, pattern: str) -> str:
    """The JetStream subject filter for a subscription ``pattern`` under ``prefix``."""
    validate_pattern(pattern)
    if pattern == "*":
        return f"{prefix}.>"
    return prefix + "." + ".".join(">" if s == "**" else s for s in pattern.split("."))


def _safe_name(text: str) -> str:
    return _UNSAFE_NAME.sub("_", text)


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


class _NatsDelivery:
    """One JetStream message leased to one member of a group (a durable pull consumer)."""

    __slots__ = ("_stream", "done", "event", "msg", "received_at")

    def __init__(self, event: Event, msg: Msg, stream: _NatsGroupStream) -> None:
        self.event = event
        self.msg = msg
        self._stream = stream
        self.received_at = time.monotonic()
        self.done = False

    @property
    def attempt(self) -> int:
        """How many times the server has delivered this message (1 on the first delivery)."""
        return int(self.msg.metadata.num_delivered)

    def ack(self) -> None:
        if not self.done:
            self.done = True
            self._stream._reply(self.msg, _ACK)

    def renew(self) -> None:
        if not self.done:
            self._stream._reply(self.msg, _WPI)
            self.received_at = time.monotonic()

    def __repr__(self) -> str:
        return f"<NatsDelivery {self.event.type} {self.event.id}>"


class _NatsGroupStream(Closeable):
    """A member of a group: a pull subscription bound to the group's durable consumer."""

    def __init__(self, provider: NatsProvider, pattern: str, group: str, lease: float) -> None:
        self._p = provider
        self.pattern = pattern
        self.group = group
        self.lease = lease
        self._match = compile_pattern(pattern)
        digest = hashlib.sha1(f"{group}\0{pattern}".encode()).hexdigest()[:12]
        self.durable = f"{_safe_name(provider.consumer_group)}-{_safe_name(group)[:64]}-{digest}"
        self.subject = subject_filter(provider.subject_prefix, pattern)
        self._buffer: collections.deque[_NatsDelivery] = collections.deque()
        self._recv_lock = threading.Lock()
        self._closed = threading.Event()
        self._fetching: concurrent.futures.Future[Any] | None = None
        self._replies: list[tuple[str, bytes]] = []
        self._replies_lock = threading.Lock()
        with _translate_errors(provider._address):
            self._sub = provider._loop.run(self._bind(), provider.request_timeout * 2)

    async def _bind(self) -> Any:
        js = self._p._js
        stream = self._p.stream_name
        try:
            info = await js.consumer_info(stream, self.durable)
            if info.config.ack_wait is not None and abs(info.config.ack_wait - self.lease) > 1e-3:
                # The first opener chose the lease; let the latest member's lease win.
                info.config.ack_wait = self.lease
                try:
                    await js.add_consumer(stream, config=info.config)
                except nats.js.errors.APIError as exc:
                    log.warning("nats group %s: keeping ack_wait %.1f s: %s", self.durable,
                                info.config.ack_wait, exc)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(stream, config=api.ConsumerConfig(
                durable_name=self.durable,
                description=f"eventbroker group {self.group!r} pattern {self.pattern!r}",
                filter_subject=self.subject,
                deliver_policy=api.DeliverPolicy.NEW,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.lease,
                max_deliver=-1,
                max_ack_pending=self._p.max_ack_pending,
            ))
        return await js.pull_subscribe_bind(durable=self.durable, stream=stream)

    def _reply(self, msg: Msg, payload: bytes) -> None:
        """Queue an ack (``+ACK``), renew (``+WPI``), nak or term for ``msg``; replies queued
        together go out in one task on the loop, in order (one cross-thread hop per batch
        instead of one per message). Fire-and-forget like ``_send``."""
        if not msg.reply:
            return
        with self._replies_lock:
            first = not self._replies
            self._replies.append((msg.reply, payload))
        if first:
            try:
                self._p._loop.call_soon(self._flush_replies)
            except LoopClosed:
                pass

    def _flush_replies(self) -> None:  # on the loop
        with self._replies_lock:
            replies, self._replies = self._replies, []
        if replies:
            task = self._p._loop.loop.create_task(self._send_replies(replies))
            task.add_done_callback(self._log_task_failure)

    async def _send_replies(self, replies: list[tuple[str, bytes]]) -> None:
        publish = self._p._nc.publish
        for subject, payload in replies:
            await publish(subject, payload)

    def _log_task_failure(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("nats group %s: %s", self.durable, task.exception())

    def receive(self, timeout: float | None = None) -> _NatsDelivery | None:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._recv_lock:
            first = True
            while True:
                if self._closed.is_set():
                    raise StopIteration
                delivery = self._next_buffered()
                if delivery is not None:
                    self._p._count_consumed(1)
                    return delivery
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0 and not first:
                    return None
                first = False
                wait = self._p.block if remaining is None else min(self._p.block, remaining)
                self._fetch(max(wait, 0.01))

    def _fetch(self, wait: float) -> None:
        try:
            future = self._p._loop.submit(self._sub.fetch(self._p.batch_size, timeout=wait))
        except LoopClosed:
            raise StopIteration from None
        self._fetching = future
        try:
            msgs = future.result(wait + self._p.request_timeout)
        except (TimeoutError, nats.errors.TimeoutError, concurrent.futures.TimeoutError):
            return
        except concurrent.futures.CancelledError:
            raise StopIteration from None
        except nats.errors.Error as exc:
            if self._closed.is_set():
                raise StopIteration from None
            # Disconnected or reconnecting: nats-py reconnects by itself; wait a little.
            log.warning("nats group %s: %s", self.durable, exc)
            self._closed.wait(min(wait, 0.5))
            return
        finally:
            self._fetching = None
        for msg in msgs:
            subject = msg.subject
            etype = subject[len(self._p.subject_prefix) + 1:]
            if not self._match(etype):  # the server filters; this only guards odd subjects
                self._reply(msg, _ACK)
                continue
            try:
                event = Event.from_json(msg.data)
            except Exception:
                log.exception("nats group %s: unreadable message on %s", self.durable, subject)
                self._reply(msg, _TERM)
                continue
            self._buffer.append(_NatsDelivery(event, msg, self))

    def _next_buffered(self) -> _NatsDelivery | None:
        while self._buffer:
            now = time.monotonic()
            delivery = self._buffer[0]
            age = now - delivery.received_at
            if age >= self.lease:
                self._buffer.popleft()  # the server redelivers it (maybe to another member)
                continue
            if age >= self.lease / 2:
                for d in self._buffer:
                    if now - d.received_at >= self.lease / 3:
                        d.renew()
            return self._buffer.popleft()
        return None

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        fetching = self._fetching
        if fetching is not None:
            fetching.cancel()
        with self._recv_lock:
            buffered, self._buffer = list(self._buffer), collections.deque()
        for d in buffered:  # hand what we never read to another member at once
            if not d.done:
                d.done = True
                self._reply(d.msg, _NAK)
        with contextlib.suppress(*_DRIVER_ERRORS):
            self._p._loop.run(self._sub.unsubscribe(), self._p.request_timeout)
        self._p._forget_group(self)

    def __repr__(self) -> str:
        return f"<NatsGroupStream durable={self.durable!r} subject={self.subject!r}>"


class NatsProvider(ProviderBase):
    """Events on NATS JetStream (see the module docstring for subjects and guarantees).

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
    #: ``publish_many(origin=)`` tags messages and ``stream(exclude_origin=)`` skips them
    #: unparsed, so a broker never pays for reading back its own events.
    supports_origin = True

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
        self.url = url
        self.stream_name = stream_name
        self.subject_prefix = subject_prefix or stream_name
        if _BAD_SUBJECT.search(self.subject_prefix):
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
        self.bucket = f"{_safe_name(stream_name)}_store"
        self._address = _safe_url(url)
        self._lock = threading.Lock()
        self._closed = False
        self._published = 0
        self._consumed = 0
        self._streams: list[_NatsFanoutStream] = []
        self._groups: list[_NatsGroupStream] = []
        # Status writes: their own connection and loop thread, made on first use.
        self._status_lock = threading.Lock()
        self._status_loop: LoopThread | None = None
        self._status_nc: Any = None
        self._status_kv: Any = None
        self._loop = LoopThread(name=f"eventbroker-nats-{stream_name}")
        try:
            with _translate_errors(self._address):
                self._loop.run(self._connect(), connect_timeout + request_timeout * 3)
        except BaseException:
            self._loop.close()
            raise

    # -- connection ----------------------------------------------------------------------------

    async def _open(self, name: str) -> Any:
        """A new nats-py connection that reconnects forever (after a fail-fast probe)."""
        async def on_error(exc: Exception) -> None:
            log.warning("nats at %s: %s", self._address, exc)

        async def on_disconnect() -> None:
            if not self._closed:
                log.warning("nats at %s: %s disconnected; reconnecting", self._address, name)

        async def on_reconnect() -> None:
            log.info("nats at %s: %s reconnected", self._address, name)

        await self._probe()
        return await nats.connect(
            servers=[u.strip() for u in self.url.split(",")],
            connect_timeout=self.connect_timeout,
            reconnect_time_wait=self.reconnect_wait,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            name=name,
        )

    async def _connect(self) -> None:
        self._nc = await self._open(f"eventbroker:{self.stream_name}")
        try:
            self._js = self._nc.jetstream(timeout=self.request_timeout)
            await self._ensure_stream()
            self._kv = await self._ensure_bucket()
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

    def _run_status(self, make: Any, timeout: float | None = None) -> Any:
        """Run ``make(kv)`` (a coroutine on the status bucket handle) on the status loop,
        connecting it first if this is the first status write."""
        if self._closed:
            raise ProviderError(f"nats at {self._address}: the provider is closed")
        loop = self._status_loop
        if loop is None:
            with self._status_lock:
                if self._closed:
                    raise ProviderError(f"nats at {self._address}: the provider is closed")
                loop = self._status_loop
                if loop is None:
                    loop = LoopThread(name=f"eventbroker-nats-status-{self.stream_name}")
                    try:
                        with _translate_errors(self._address):
                            loop.run(self._connect_status(),
                                     self.connect_timeout + self.request_timeout * 2)
                    except BaseException:
                        loop.close()
                        raise
                    self._status_loop = loop
        with _translate_errors(self._address):
            return loop.run(make(self._status_kv), timeout or self.request_timeout * 3)

    async def _probe(self) -> None:
        """Fail fast when no server listens: nats-py would retry the first connect forever."""
        errors = []
        for server in self.url.split(","):
            parts = urlsplit(server.strip() if "://" in server else f"nats://{server.strip()}")
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222),
                    self.connect_timeout,
                )
            except (TimeoutError, OSError) as exc:
                errors.append(str(exc) or type(exc).__name__)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        raise OSError(f"cannot connect: {'; '.join(errors)}")

    async def _ensure_stream(self) -> None:
        storage = api.StorageType.FILE if self.storage == "file" else api.StorageType.MEMORY
        config = api.StreamConfig(
            name=self.stream_name,
            subjects=[f"{self.subject_prefix}.>"],
            storage=storage,
            retention=api.RetentionPolicy.LIMITS,
            max_age=self.max_age or None,
            max_msgs=self.max_msgs or None,
            discard=api.DiscardPolicy.OLD,
        )
        try:
            await self._js.stream_info(self.stream_name)
        except nats.js.errors.NotFoundError:
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await self._js.stream_info(self.stream_name)  # created concurrently: fine

    async def _ensure_bucket(self) -> Any:
        try:
            return await self._js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            storage = api.StorageType.FILE if self.storage == "file" else api.StorageType.MEMORY
            try:
                return await self._js.create_key_value(api.KeyValueConfig(
                    bucket=self.bucket, history=1, ttl=self.max_age or None, storage=storage,
                    description=f"eventbroker store of stream {self.stream_name}",
                ))
            except nats.js.errors.BadRequestError:
                return await self._js.key_value(self.bucket)

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        if self._closed:
            coro.close()
            raise ProviderError(f"nats at {self._address}: the provider is closed")
        with _translate_errors(self._address):
            return self._loop.run(coro, timeout or self.request_timeout * 3)

    def _repr_target(self) -> str:
        return f"{self._address!r}, stream_name={self.stream_name!r}"

    def _count_consumed(self, n: int) -> None:
        with self._lock:
            self._consumed += n

    # -- store ---------------------------------------------------------------------------------

    async def _put_all(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Put ``(id, json)`` items with every put in flight at once, then wait for the acks."""
        pre = self._kv._pre
        publish_async = self._js.publish_async
        for i in range(0, len(items), 1000):
            futures = [await publish_async(pre + key, value) for key, value in items[i:i + 1000]]
            await asyncio.wait_for(asyncio.gather(*futures), self.request_timeout)

    def _write_stored(self, items: Sequence[tuple[str, bytes]]) -> None:
        self._run(self._put_all(items), self.request_timeout * (2 + len(items) // 1000))

    def _store_items(self, events: Sequence[Event]) -> list[tuple[str, bytes]]:
        if self._closed:
            raise ProviderError(f"nats at {self._address}: the provider is closed")
        items = []
        for e in events:
            if not nats.js.kv._is_key_valid(e.id):
                raise ProviderError(f"nats at {self._address}: invalid key {e.id!r}")
            items.append((e.id, e.to_json().encode()))
        return items

    def store(self, event: Event) -> None:
        """Store ``event`` now (one put, acknowledged)."""
        self._write_stored(self._store_items((event,)))

    def store_many(self, events: Sequence[Event]) -> None:
        """Store ``events`` with every put in flight at once, then wait for the acks."""
        if not events:
            return
        self._write_stored(self._store_items(events))

    async def _get(self, event_id: str) -> tuple[Event, int] | None:
        try:
            entry = await self._kv.get(event_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except nats.js.errors.InvalidKeyError:
            return None
        if entry.value is None:
            return None
        return Event.from_json(entry.value), int(entry.revision or 0)

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
                events.append(Event.from_json(msg.data))
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

        Reads every stored event (see the module docstring): cost grows with the bucket.
        """
        events = [e for e in self._run(self._scan(), None) if filter.matches(e)]
        events.sort(key=lambda e: (e.created_at, e.id))
        events = events[filter.offset:]
        return events[:filter.limit] if filter.limit else events

    async def _update(self, kv: Any, event_id: str, status: EventStatus, error: str,
                      retry_count: int | None) -> None:
        """Read the stored JSON, patch the status fields, compare-and-set on its revision.

        The JSON is patched as a dict (no ``Event`` built and re-encoded): a consumer writes
        a status for every event it handles, so this is on a hot path.
        """
        for _ in range(50):
            try:
                entry = await kv.get(event_id)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError,
                    nats.js.errors.InvalidKeyError):
                return
            if entry.value is None:
                return
            d = loads(entry.value)
            now = dt.datetime.now(_UTC).isoformat()
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

    def update_status(
        self, event_id: str, status: EventStatus, error: str = "", *,
        retry_count: int | None = None,
    ) -> None:
        status = EventStatus(status)
        self._run_status(lambda kv: self._update(kv, event_id, status, error, retry_count))

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
                        await self._update(kv, u.event_id, EventStatus(u.status), u.error,
                                           u.retry_count)

            await asyncio.gather(*(one(c) for c in by_id.values()))

        self._run_status(apply, self.request_timeout * (3 + len(by_id) // 100))

    def delete(self, event_id: str) -> None:
        async def purge() -> None:
            with contextlib.suppress(nats.js.errors.InvalidKeyError):
                await self._kv.purge(event_id)

        self._run(purge())

    # -- transport -----------------------------------------------------------------------------

    def _subject(self, event: Event) -> str:
        if _BAD_SUBJECT.search(event.type):
            raise ProviderError(
                f"nats at {self._address}: event type {event.type!r} is not a valid NATS "
                "subject (no whitespace, '*', '>' or empty segments)"
            )
        return f"{self.subject_prefix}.{event.type}"

    def publish(self, event: Event) -> None:
        self.publish_many((event,))

    def publish_many(self, events: Sequence[Event], *, origin: str | None = None) -> None:
        """Publish ``events`` asynchronously and wait for all the server's acks.

        ``origin`` goes in a header, so that a stream opened with the same
        ``exclude_origin`` skips these messages (a broker ignoring its own events).
        """
        self._send(events, (), origin)

    def store_and_publish_many(self, events: Sequence[Event], *,
                               origin: str | None = None) -> None:
        """``store_many(events)`` then ``publish_many(events, origin=origin)`` in one round
        trip: every put is written to the connection ahead of the publishes and all the acks
        are awaited together (the server receives each put before its publish)."""
        self._send(events, self._store_items(events), origin)

    def _send(self, events: Sequence[Event], stored: Sequence[tuple[str, bytes]],
              origin: str | None) -> None:
        """Put ``stored`` and publish ``events``, all in flight at once, up to ~1000 messages
        (puts and publishes) at a time, then wait for every ack of the chunk."""
        if not events:
            return
        if self._closed:
            raise ProviderError(f"nats at {self._address}: the provider is closed")
        subjects = [self._subject(e) for e in events]
        payloads = ([v for _, v in stored] if stored
                    else [e.to_json().encode() for e in events])
        headers = {_ORIGIN: origin} if origin else None
        pre = self._kv._pre
        stream = self.stream_name
        size = max(self.batch_size, 1000) // (2 if stored else 1)
        timeout = self.request_timeout

        async def send() -> None:
            publish_async = self._js.publish_async
            for i in range(0, len(events), size):
                futures = []
                for key, value in stored[i:i + size]:
                    futures.append(await publish_async(pre + key, value))
                for j in range(i, min(i + size, len(events))):
                    futures.append(await publish_async(
                        subjects[j], payloads[j], stream=stream,
                        headers=dict(headers) if headers else None))
                await asyncio.wait_for(asyncio.gather(*futures), timeout)

        self._run(send(), timeout * (3 + len(events) // size))
        with self._lock:
            self._published += len(events)

    def stream(self, pattern: str, *, exclude_origin: str | None = None) -> _NatsFanoutStream:
        """A fan-out stream of events published after this call returns (see module doc).

        With ``exclude_origin``, messages published with that ``origin`` are skipped unread.
        """
        subject = subject_filter(self.subject_prefix, pattern)
        s = _NatsFanoutStream(pattern, on_close=self._forget_stream)
        skip = len(self.subject_prefix) + 1

        async def on_msg(msg: Msg) -> None:
            if exclude_origin is not None and msg.headers \
                    and msg.headers.get(_ORIGIN) == exclude_origin:
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
        with self._lock:
            if s in self._streams:
                self._streams.remove(s)
            closing = self._closed
        if s.sub is not None and not closing:
            with contextlib.suppress(*_DRIVER_ERRORS):
                self._loop.run(s.sub.unsubscribe(), self.request_timeout)

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0) -> _NatsGroupStream:
        """A competing-consumer member of ``(group, pattern)`` (see the module docstring)."""
        validate_pattern(pattern)
        if not group:
            raise ValueError("group_stream: group must not be empty")
        if lease <= 0:
            raise ValueError(f"group_stream: lease must be > 0, got {lease}")
        if self._closed:
            raise ProviderError(f"nats at {self._address}: the provider is closed")
        g = _NatsGroupStream(self, pattern, group, lease)
        with self._lock:
            self._groups.append(g)
        return g

    def _forget_group(self, g: _NatsGroupStream) -> None:
        with self._lock:
            if g in self._groups:
                self._groups.remove(g)

    # -- lifecycle -----------------------------------------------------------------------------

    def stats(self) -> ProviderStats:

        async def gather() -> tuple[list[Event], Any, Any, list[Any]]:
            events = await self._scan()
            sinfo = await self._js.stream_info(self.stream_name)
            kinfo = await self._js.stream_info(f"KV_{self.bucket}")
            consumers = await self._js.consumers_info(self.stream_name)
            return events, sinfo, kinfo, consumers

        events, sinfo, kinfo, consumers = self._run(gather(), None)
        counts = collections.Counter(str(e.status) for e in events)
        prefix = _safe_name(self.consumer_group) + "-"
        groups: dict[str, JSON] = {
            c.name: {"pending": c.num_pending, "ack_pending": c.num_ack_pending,
                     "redelivered": c.num_redelivered, "waiting": c.num_waiting}
            for c in consumers if c.name and c.name.startswith(prefix)
        }
        with self._lock:
            published, consumed = self._published, self._consumed
            active = len(self._streams) + len(self._groups)
        return ProviderStats(
            provider_type=self.provider_type,
            total_events=len(events),
            pending_events=counts["pending"],
            processing_events=counts["processing"],
            completed_events=counts["completed"],
            failed_events=counts["failed"],
            events_published=published,
            events_consumed=consumed,
            active_subscribers=active,
            provider_specific={
                "stream": self.stream_name,
                "stream_messages": sinfo.state.messages,
                "stream_bytes": sinfo.state.bytes,
                "first_seq": sinfo.state.first_seq,
                "last_seq": sinfo.state.last_seq,
                "consumer_count": sinfo.state.consumer_count,
                "bucket": self.bucket,
                "bucket_messages": kinfo.state.messages,
                "groups": groups,
            },
        )

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
