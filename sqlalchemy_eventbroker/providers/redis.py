"""Redis Streams provider: one stream carries events between brokers, hashes store them.

Backend
    Redis ≥ 6.2 (``XAUTOCLAIM``), single node or a replicated primary; not Redis Cluster (the
    scripts touch several keys that need not share a slot). URL form
    ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS).

Keys (``S`` = ``stream_name``)
    ``S``               the stream: one entry per published event (fields ``t`` type, ``e`` JSON),
                        trimmed approximately to ``maxlen`` entries on every ``XADD``.
    ``S:ev:<id>``       one hash per stored event: its JSON plus the mutable status fields, so
                        ``get``/``update_status``/``delete`` are O(1) and never scan the stream.
    ``S:index``         a sorted set of stored ids scored by ``created_at`` (microseconds); it
                        orders ``list`` and evicts the oldest events past ``max_events``.
    ``S:counts``        per-status counters kept exact by the same Lua scripts.

Writes
    One Lua script (``_WRITE``) stores events (hash, index, counts, eviction past
    ``max_events``) and appends them to the stream, stores first, so a reader never sees an
    entry whose event is not stored yet. ``store``/``store_many`` write at once (one script
    call); ``store_and_publish_many``, which the broker uses for every publish, stores and
    ``XADD``s in the same script call: one round trip per publish, the JSON sent once (one
    script call per ``batch_size`` events, pipelined). ``update_status_many`` applies a
    batch of status changes in one script call.

Fan-out (``stream``)
    One reader thread per provider blocks on ``XREAD`` (``block`` seconds, up to
    ``max(batch_size, 1000)`` entries at a time) and hands each entry to every open stream whose
    pattern matches. A stream starts at the stream's last id when it is opened (``$`` resolved
    at open), so it sees exactly the events published after it opened, in stream order (=
    publish order per publisher). Patterns are filtered in the client: Redis cannot filter a
    stream.

Groups (``group_stream``)
    A Redis consumer group named ``<consumer_group>:<group>:<pattern>`` per ``(group, pattern)``,
    created with id ``$`` on first open, so it is durable from then on. Members read with
    ``XREADGROUP`` and acknowledge with ``XACK``; entries whose type does not match the pattern
    are acknowledged unseen. Every member reclaims entries idle longer than the lease with
    ``XAUTOCLAIM`` (at most every ``lease / 4`` seconds), which is how the event of a member that
    died is handled by another one: at least once, never lost while Redis keeps the entry.
    ``Delivery.renew`` re-claims the entry for its own consumer only if it still owns it.

Guarantees and limits
    * Delivery is at least once for groups, at most once for fan-out readers that are not
      connected (a fan-out stream sees what is published while it is open and Redis is up).
    * Redis without persistence (no AOF/RDB) loses everything on restart: stored events, the
      stream, and the groups with their pending entries. Readers then resume on the new, empty
      stream (groups are re-created from its start, so events published after the restart are
      not lost). With ``appendonly yes`` (``appendfsync always`` for no loss at all) a restart
      loses nothing that was acknowledged by Redis.
    * An entry trimmed by ``maxlen`` before a reader got to it is never delivered.
    * ``list`` reads the ``created_at`` range of the index (``start_time``/``end_time``), then
      filters the other fields in Python: cost grows with the events in that range.

Connection handling
    Commands retry once on a broken pooled connection; readers and group members reconnect
    with capped exponential backoff (``reconnect_max_delay``) and resume at their position.
    Every driver error surfaces as ``ProviderError("redis at <url>: ...")`` from one place,
    :func:`_translate_errors`. ``close()`` stops the reader thread and closes every connection.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from .._json import loads
from .._threads import QuietThread
from ..errors import ProviderError
from ..event import Event, EventStatus
from ..pattern import compile_pattern, validate_pattern
from .base import (
    Closeable,
    EventFilter,
    ProviderBase,
    ProviderStats,
    QueueEventStream,
    StatusUpdate,
    provider_error,
)

__all__ = ["RedisProvider"]

log = logging.getLogger(__name__)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US = dt.timedelta(microseconds=1)
_STATUS_FIELDS = ("status", "retry_count", "error", "processed_at", "completed_at")
_DRIVER_ERRORS = (redis.RedisError, OSError)
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
_ACK_DELAY = 0.05  # longest a batched XACK waits while its member keeps receiving

# Store and publish in one script (one round trip).
# KEYS: index, counts, stream, then one event hash per stored event.
# ARGV: max_events, key prefix, maxlen (0 = no trimming), origin ('' = none), nstore,
#   then 8 per stored event: id, score, json, status, retry_count, error, processed_at,
#   completed_at; then 3 per published event: type, k, json, where k > 0 means "the json of
#   the k-th stored event" (sent once) and k = 0 means json is given.
# Every store lands before any XADD of the call, so a reader never sees an event unstored.
_WRITE = """
local n = tonumber(ARGV[5])
for i = 0, n - 1 do
  local key = KEYS[4 + i]
  local a = 6 + i * 8
  local old = redis.call('HGET', key, 'status')
  if old then redis.call('HINCRBY', KEYS[2], old, -1) end
  redis.call('HSET', key, 'json', ARGV[a + 2], 'status', ARGV[a + 3], 'retry_count', ARGV[a + 4],
             'error', ARGV[a + 5], 'processed_at', ARGV[a + 6], 'completed_at', ARGV[a + 7])
  redis.call('HINCRBY', KEYS[2], ARGV[a + 3], 1)
  redis.call('ZADD', KEYS[1], ARGV[a + 1], ARGV[a])
end
local max = tonumber(ARGV[1])
if n > 0 and max > 0 then
  local excess = redis.call('ZCARD', KEYS[1]) - max
  if excess > 0 then
    local ids = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
    for _, id in ipairs(ids) do
      local key = ARGV[2] .. id
      local st = redis.call('HGET', key, 'status')
      if st then redis.call('HINCRBY', KEYS[2], st, -1) end
      redis.call('DEL', key)
    end
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
  end
end
local maxlen = tonumber(ARGV[3])
local origin = ARGV[4]
local p = 6 + n * 8
while p + 2 <= #ARGV do
  local k = tonumber(ARGV[p + 1])
  local json = ARGV[p + 2]
  if k > 0 then json = ARGV[6 + (k - 1) * 8 + 2] end
  if maxlen > 0 then
    if origin ~= '' then
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', 't', ARGV[p], 'e', json, 'o', origin)
    else
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', 't', ARGV[p], 'e', json)
    end
  elseif origin ~= '' then
    redis.call('XADD', KEYS[3], '*', 't', ARGV[p], 'e', json, 'o', origin)
  else
    redis.call('XADD', KEYS[3], '*', 't', ARGV[p], 'e', json)
  end
  p = p + 3
end
return n
"""

# KEYS: counts, then one event hash per update; ARGV: now (ISO-8601), then 3 per update:
# status, error, retry_count ('' = keep). Unknown events are skipped.
_UPDATE = """
local now = ARGV[1]
for i = 2, #KEYS do
  local key = KEYS[i]
  local a = 2 + (i - 2) * 3
  local status = ARGV[a]
  local old = redis.call('HGET', key, 'status')
  if old then
    redis.call('HINCRBY', KEYS[1], old, -1)
    redis.call('HINCRBY', KEYS[1], status, 1)
    redis.call('HSET', key, 'status', status, 'error', ARGV[a + 1])
    if ARGV[a + 2] ~= '' then redis.call('HSET', key, 'retry_count', ARGV[a + 2]) end
    if status == 'processing' then
      redis.call('HSET', key, 'processed_at', now)
    elseif status == 'completed' or status == 'failed' then
      redis.call('HSET', key, 'completed_at', now)
      local p = redis.call('HGET', key, 'processed_at')
      if not p or p == '' then redis.call('HSET', key, 'processed_at', now) end
    end
  end
end
return #KEYS - 1
"""

# KEYS: event hash, index, counts; ARGV: id
_DELETE = """
local old = redis.call('HGET', KEYS[1], 'status')
if old then redis.call('HINCRBY', KEYS[3], old, -1) end
redis.call('DEL', KEYS[1])
return redis.call('ZREM', KEYS[2], ARGV[1])
"""

# KEYS: stream; ARGV: group, consumer, ids... -> the ids still owned by consumer, re-claimed
# (idle time reset to 0). An id another member already reclaimed is left alone.
_RENEW = """
local renewed = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed[#renewed + 1] = ARGV[i]
  end
end
return renewed
"""

# KEYS: stream; ARGV: group, consumer -> delete the consumer if it holds no pending entries.
_RETIRE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if p[1] then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) + 1
"""


def _safe_url(url: str) -> str:
    """``url`` with any password replaced, for messages and ``repr``."""
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    return url


@contextlib.contextmanager
def _translate_errors(address: str) -> Iterator[None]:
    """Turn every redis-py (and socket) error into ``ProviderError("redis at <url>: ...")``."""
    try:
        yield
    except ProviderError:
        raise
    except _DRIVER_ERRORS as exc:
        raise provider_error("redis", address, exc) from exc


def _interrupt(client: Any) -> None:
    """Wake a thread blocked in a read on ``client`` from another thread.

    Shutting the socket down (without closing it) makes the blocked ``recv`` return at once;
    the reading thread then sees "connection closed" and cleans up its own connection.
    Closing the socket from here instead would race with the reader's buffers.
    """
    pool = client.connection_pool
    try:
        conns = list(getattr(pool, "_in_use_connections", ()))
    except RuntimeError:  # changed size while copying: take a second look
        conns = list(getattr(pool, "_in_use_connections", ()))
    for conn in conns:
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _micros(t: dt.datetime) -> int:
    return (t - _EPOCH) // _US


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _iso(t: dt.datetime | None) -> str:
    return t.isoformat() if t is not None else ""


def _event_from_hash(h: dict[str, str]) -> Event:
    d = loads(h["json"])
    d["status"] = h.get("status") or d.get("status")
    d["retry_count"] = int(h.get("retry_count") or 0)
    d["error"] = h.get("error") or ""
    d["processed_at"] = h.get("processed_at") or None
    d["completed_at"] = h.get("completed_at") or None
    return Event.from_dict(d)


class _Backoff:
    """Capped exponential backoff: 0.05 s, 0.1 s, ... up to ``cap``."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        delay = min(self.cap, 0.05 * 2.0**self.failures)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class _FanoutStream(QueueEventStream):
    """A fan-out stream that only accepts entries after ``start`` (the last id at open)."""

    def __init__(self, pattern: str, start: tuple[int, int], on_close: Any,
                 exclude_origin: str | None = None) -> None:
        super().__init__(pattern, on_close=on_close)
        self.start = start
        self.exclude_origin = exclude_origin


class _RedisDelivery:
    """One stream entry leased to one member of a consumer group."""

    __slots__ = ("_stream", "done", "entry_id", "event", "received_at")

    def __init__(self, event: Event, entry_id: str, stream: _RedisGroupStream) -> None:
        self.event = event
        self.entry_id = entry_id
        self._stream = stream
        self.received_at = time.monotonic()
        self.done = False

    def ack(self) -> None:
        if not self.done:
            self.done = True
            self._stream._ack(self.entry_id)

    def renew(self) -> None:
        if not self.done:
            self._stream._renew([self.entry_id])
            self.received_at = time.monotonic()

    def __repr__(self) -> str:
        return f"<RedisDelivery {self.event.type} {self.event.id} entry={self.entry_id}>"


class _RedisGroupStream(Closeable):
    """A member of a Redis consumer group; ``receive`` reads in the caller's thread.

    Each member has its own connection for the blocking ``XREADGROUP`` so that ``close()`` from
    another thread can wake it by closing that connection. Acknowledgements issued while the
    member is blocked in a read are batched and sent when the read returns (at most ``block``
    seconds later); otherwise ``ack`` sends its ``XACK`` at once.
    """

    def __init__(self, provider: RedisProvider, pattern: str, group: str, lease: float) -> None:
        self._p = provider
        self.pattern = pattern
        self.group = group
        self.lease = lease
        self._match = compile_pattern(pattern)
        self.redis_group = f"{provider.consumer_group}:{group}:{pattern}"
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._client = provider._new_client(retries=0)
        self._buffer: collections.deque[_RedisDelivery] = collections.deque()
        self._pending_acks: list[str] = []
        self._acks_since = 0.0
        self._lock = threading.Lock()  # acks and state
        self._recv_lock = threading.Lock()  # one reader at a time
        self._receiving = False
        self._closed = threading.Event()
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._claim_every = max(0.05, lease / 4)
        self._backoff = _Backoff(provider.reconnect_max_delay)
        with _translate_errors(provider._address):
            self._create_group("$")

    # -- setup ---------------------------------------------------------------------------------

    def _create_group(self, start: str) -> None:
        try:
            self._p._client.xgroup_create(self._p.stream_name, self.redis_group, id=start,
                                          mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> _RedisDelivery | None:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._recv_lock:
            first = True
            while True:
                if self._closed.is_set():
                    raise StopIteration
                if self._pending_acks and (time.monotonic() - self._acks_since >= _ACK_DELAY
                                           or not self._buffer):
                    with contextlib.suppress(*_DRIVER_ERRORS):  # kept for the next try
                        self._flush_acks(translate=False)
                delivery = self._next_buffered()
                if delivery is not None:
                    self._p._count_consumed(1)
                    return delivery
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0 and not first:
                    return None
                first = False
                wait = self._p.block if remaining is None else min(self._p.block, remaining)
                try:
                    self._fill(wait)
                    self._backoff.reset()
                except Exception as exc:
                    if self._closed.is_set():
                        raise StopIteration from None
                    if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                        # Redis lost the group (restart without persistence, or the stream
                        # was deleted): all in the stream is new since, so start it at 0.
                        log.warning("redis group %s vanished; re-creating it", self.redis_group)
                        with _translate_errors(self._p._address):
                            self._create_group("0")
                        continue
                    if not isinstance(exc, _CONNECTION_ERRORS):
                        if isinstance(exc, _DRIVER_ERRORS):
                            raise provider_error("redis", self._p._address, exc) from exc
                        raise
                    delay = self._backoff.next()
                    log.warning("redis group %s: %s; retrying in %.2f s", self.redis_group, exc,
                                delay)
                    if remaining is not None:
                        delay = min(delay, max(0.0, deadline - time.monotonic()))  # type: ignore[operator]
                    self._closed.wait(delay)

    def _next_buffered(self) -> _RedisDelivery | None:
        """The oldest buffered delivery whose lease is still ours, renewing it if it aged."""
        while self._buffer:
            now = time.monotonic()
            delivery = self._buffer[0]
            age = now - delivery.received_at
            if age >= self.lease:
                # Another member may have reclaimed it already: let XAUTOCLAIM hand it out.
                self._buffer.popleft()
                continue
            if age >= self.lease / 2:
                stale = [d for d in self._buffer if now - d.received_at >= self.lease / 3]
                owned = set(self._renew([d.entry_id for d in stale]))
                for d in stale:
                    if d.entry_id in owned:
                        d.received_at = now
                    else:
                        self._buffer.remove(d)
                continue
            return self._buffer.popleft()
        return None

    def _fill(self, wait: float) -> None:
        """One round of reclaiming and reading into the buffer (blocks up to ``wait``)."""
        p = self._p
        self._flush_acks(translate=False)
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + self._claim_every
            res = self._client.xautoclaim(p.stream_name, self.redis_group, self.consumer,
                                          min_idle_time=int(self.lease * 1000),
                                          start_id=self._claim_cursor, count=p.batch_size)
            self._claim_cursor = res[0]
            if self._claim_cursor != "0-0":
                self._next_claim = now  # more to reclaim: keep going on the next round
            if self._accept(res[1]):
                return
        block = int(wait * 1000)
        self._receiving = True
        try:
            resp = self._client.xreadgroup(self.redis_group, self.consumer,
                                           {p.stream_name: ">"}, count=p.batch_size,
                                           block=block if block > 0 else None)
        finally:
            self._receiving = False
        for _name, entries in resp or ():
            self._accept(entries)
        self._flush_acks(translate=False)

    def _accept(self, entries: Sequence[tuple[str, dict[str, str] | None]]) -> int:
        """Buffer the matching entries; queue acks for the rest. Returns how many matched."""
        skipped: list[str] = []
        accepted = 0
        for entry_id, fields in entries:
            if not fields:  # deleted or trimmed while pending
                skipped.append(entry_id)
                continue
            if self._match(fields.get("t", "")):
                try:
                    event = Event.from_json(fields["e"])
                except Exception:
                    log.exception("redis group %s: unreadable entry %s", self.redis_group,
                                  entry_id)
                    skipped.append(entry_id)
                    continue
                self._buffer.append(_RedisDelivery(event, entry_id, self))
                accepted += 1
            else:
                skipped.append(entry_id)
        if skipped:
            with self._lock:
                self._pending_acks.extend(skipped)
        return accepted

    # -- acknowledging ---------------------------------------------------------------------

    def _ack(self, entry_id: str) -> None:
        # Batched: while the member still works through a fetched batch (or is blocked in a
        # read) the XACK waits for the next receive(), at most _ACK_DELAY seconds in a busy
        # loop; otherwise it is sent now. One XACK per batch is ~25x cheaper than one each.
        with self._lock:
            if not self._pending_acks:
                self._acks_since = time.monotonic()
            self._pending_acks.append(entry_id)
            now = ((not self._receiving and not self._buffer)
                   or len(self._pending_acks) >= self._p.batch_size)
        if now:
            self._flush_acks()

    def _flush_acks(self, *, translate: bool = True) -> None:
        with self._lock:
            ids, self._pending_acks = self._pending_acks, []
        if ids:
            try:
                self._p._client.xack(self._p.stream_name, self.redis_group, *ids)
            except _DRIVER_ERRORS as exc:
                with self._lock:  # keep them for the next attempt
                    self._pending_acks[:0] = ids
                if translate:
                    raise provider_error("redis", self._p._address, exc) from exc
                raise

    def _renew(self, entry_ids: list[str]) -> list[str]:
        with _translate_errors(self._p._address):
            return list(self._p._renew_script(keys=[self._p.stream_name],
                                              args=[self.redis_group, self.consumer,
                                                    *entry_ids]))

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._flush_acks()
            if not self._buffer:
                self._p._retire_script(keys=[self._p.stream_name],
                                       args=[self.redis_group, self.consumer])
        except (ProviderError, *_DRIVER_ERRORS) as exc:
            log.debug("redis group %s: close: %s", self.redis_group, exc)
        self._buffer.clear()
        _interrupt(self._client)  # wakes a reader blocked in XREADGROUP
        with self._recv_lock:  # wait for it to leave, then release its connection
            self._client.close()
        self._p._forget_group(self)

    def __repr__(self) -> str:
        return f"<RedisGroupStream group={self.redis_group!r} consumer={self.consumer!r}>"


class RedisProvider(ProviderBase):
    """Events on Redis Streams (see the module docstring for keys and guarantees).

    Args:
        url: ``redis://host:port/db``; unreachable at construction raises ``ProviderError``.
        stream_name: the stream key, also the prefix of every other key this provider uses.
        consumer_group: prefix of the Redis consumer-group names made for group streams.
        maxlen: approximate cap on stream entries (``XADD MAXLEN ~``); 0 = no trimming.
        max_events: cap on stored events; the oldest by ``created_at`` are evicted; 0 = none.
        block: longest single blocking read, in seconds (bounds how late ``close`` is noticed).
        batch_size: entries per group read (``COUNT``) and per script call of a batch write;
            fan-out reads take up to ``max(batch_size, 1000)`` entries at a time.
        connect_timeout: seconds to wait for a TCP connection.
        reconnect_max_delay: cap of the backoff between reconnection attempts.

    Raises:
        ProviderError: Redis does not answer ``PING`` at ``url``.
    """

    provider_type = "redis"
    #: ``publish_many(origin=)`` tags entries and ``stream(exclude_origin=)`` skips them
    #: unparsed, so a broker never pays for reading back its own events.
    supports_origin = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        stream_name: str = "eventbroker:events",
        consumer_group: str = "eventbroker-workers",
        *,
        maxlen: int = 100_000,
        max_events: int = 100_000,
        block: float = 1.0,
        batch_size: int = 100,
        connect_timeout: float = 5.0,
        reconnect_max_delay: float = 2.0,
    ) -> None:
        if not stream_name:
            raise ValueError("RedisProvider: stream_name must not be empty")
        if maxlen < 0 or max_events < 0 or batch_size < 1 or block <= 0:
            raise ValueError("RedisProvider: maxlen/max_events >= 0, batch_size >= 1, block > 0")
        self.url = url
        self.stream_name = stream_name
        self.consumer_group = consumer_group
        self.maxlen = maxlen
        self.max_events = max_events
        self.block = block
        self.batch_size = batch_size
        self.connect_timeout = connect_timeout
        self.reconnect_max_delay = reconnect_max_delay
        self.read_count = max(batch_size, 1000)
        self._address = _safe_url(url)
        self._index_key = f"{stream_name}:index"
        self._counts_key = f"{stream_name}:counts"
        self._event_prefix = f"{stream_name}:ev:"
        self._lock = threading.Lock()
        self._closed = False
        self._published = 0
        self._consumed = 0
        self._streams: list[_FanoutStream] = []
        self._groups: list[_RedisGroupStream] = []
        self._reader: threading.Thread | None = None
        self._reader_client: Any = None
        self._reader_wake = threading.Condition(self._lock)
        with _translate_errors(self._address):
            self._client = self._new_client(retries=1)
            try:
                self._client.ping()
            except BaseException:
                self._client.close()
                raise
        self._write_script = self._client.register_script(_WRITE)
        self._update_script = self._client.register_script(_UPDATE)
        self._delete_script = self._client.register_script(_DELETE)
        self._renew_script = self._client.register_script(_RENEW)
        self._retire_script = self._client.register_script(_RETIRE)

    def _new_client(self, retries: int) -> Any:
        # Typed Any: redis-py's stubs cannot tell decode_responses=True clients return str.
        retry = (Retry(ExponentialBackoff(cap=0.5, base=0.05), retries) if retries
                 else Retry(NoBackoff(), 0))
        return redis.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=self.block + 10.0,
            retry=retry,
        )

    def _repr_target(self) -> str:
        return f"{self._address!r}, stream_name={self.stream_name!r}"

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError(f"redis at {self._address}: the provider is closed")

    def _count_consumed(self, n: int) -> None:
        with self._lock:
            self._consumed += n

    # -- store ---------------------------------------------------------------------------------

    @staticmethod
    def _store_item(e: Event) -> tuple[Any, ...]:
        """The 8 script arguments that store ``e`` (a snapshot: later changes are not seen)."""
        return (e.id, _micros(e.created_at), e.to_json(), str(e.status), e.retry_count,
                e.error, _iso(e.processed_at), _iso(e.completed_at))

    def _write_args(self, stored: Sequence[tuple[Any, ...]],
                    published: Sequence[tuple[str, int, str]] = (),
                    origin: str | None = None) -> tuple[list[str], list[Any]]:
        keys = [self._index_key, self._counts_key, self.stream_name]
        args: list[Any] = [self.max_events, self._event_prefix, self.maxlen, origin or "",
                           len(stored)]
        prefix = self._event_prefix
        for item in stored:
            keys.append(prefix + item[0])
            args += item
        for item in published:
            args += item
        return keys, args

    def _run_writes(self, calls: Sequence[tuple[list[str], list[Any]]]) -> None:
        """Run prepared ``_WRITE`` calls in one round trip (pipelined when several)."""
        with _translate_errors(self._address):
            if len(calls) == 1:
                self._write_script(keys=calls[0][0], args=calls[0][1])
                return
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls:
                self._write_script(keys=keys, args=args, client=pipe)
            pipe.execute()

    def store(self, event: Event) -> None:
        """Store ``event`` now (one script call)."""
        self._check_open()
        self._run_writes([self._write_args((self._store_item(event),))])

    def store_many(self, events: Sequence[Event]) -> None:
        """Store ``events`` in one round trip: one script call per ``batch_size``, pipelined."""
        self._check_open()
        if not events:
            return
        size = self.batch_size
        self._run_writes([self._write_args([self._store_item(e) for e in events[i:i + size]])
                          for i in range(0, len(events), size)])

    def store_and_publish_many(self, events: Sequence[Event], *,
                               origin: str | None = None) -> None:
        """``store_many(events)`` then ``publish_many(events, origin=origin)`` in one round
        trip: each script call stores its events and then ``XADD``s them, the JSON sent once
        (one call per ``batch_size`` events, pipelined when several)."""
        self._check_open()
        if not events:
            return
        size = self.batch_size
        calls = []
        for i in range(0, len(events), size):
            chunk = events[i:i + size]
            calls.append(self._write_args([self._store_item(e) for e in chunk],
                                          [(e.type, k, "") for k, e in enumerate(chunk, 1)],
                                          origin))
        self._run_writes(calls)
        with self._lock:
            self._published += len(events)

    def get(self, event_id: str) -> Event | None:
        self._check_open()
        with _translate_errors(self._address):
            h = self._client.hgetall(self._event_prefix + event_id)
        return _event_from_hash(h) if h else None

    def list(self, filter: EventFilter) -> list[Event]:
        """Stored events passing ``filter``, oldest ``created_at`` first (ties by id).

        The time bounds select a range of the index in Redis; every other field is checked
        in Python on the events of that range, fetched ``batch_size`` hashes per round trip.
        """
        self._check_open()
        lo = str(_micros(filter.start_time)) if filter.start_time is not None else "-inf"
        hi = f"({_micros(filter.end_time)}" if filter.end_time is not None else "+inf"
        out: list[Event] = []
        skip = filter.offset
        chunk = max(self.batch_size, 500)
        start = 0
        with _translate_errors(self._address):
            while True:
                ids = self._client.zrangebyscore(self._index_key, lo, hi, start=start, num=chunk)
                if not ids:
                    return out
                start += len(ids)
                pipe = self._client.pipeline(transaction=False)
                for event_id in ids:
                    pipe.hgetall(self._event_prefix + event_id)
                for h in pipe.execute():
                    if not h:
                        continue  # deleted between the two reads
                    event = _event_from_hash(h)
                    if not filter.matches(event):
                        continue
                    if skip:
                        skip -= 1
                        continue
                    out.append(event)
                    if filter.limit and len(out) >= filter.limit:
                        return out
                if len(ids) < chunk:
                    return out

    def update_status(
        self, event_id: str, status: EventStatus, error: str = "", *,
        retry_count: int | None = None,
    ) -> None:
        self.update_status_many([StatusUpdate(event_id, status, error, retry_count)])

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None:
        """Apply ``updates`` in order (same semantics as ``update_status`` each) in one round
        trip: one script call per 500 updates, pipelined."""
        self._check_open()
        if not updates:
            return
        now = dt.datetime.now(dt.UTC).isoformat()
        prefix = self._event_prefix
        calls = []
        for i in range(0, len(updates), 500):
            keys = [self._counts_key]
            args: list[Any] = [now]
            for u in updates[i:i + 500]:
                keys.append(prefix + u.event_id)
                args += (str(EventStatus(u.status)), u.error,
                         "" if u.retry_count is None else int(u.retry_count))
            calls.append((keys, args))
        with _translate_errors(self._address):
            if len(calls) == 1:
                self._update_script(keys=calls[0][0], args=calls[0][1])
                return
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls:
                self._update_script(keys=keys, args=args, client=pipe)
            pipe.execute()

    def delete(self, event_id: str) -> None:
        self._check_open()
        with _translate_errors(self._address):
            self._delete_script(keys=[self._event_prefix + event_id, self._index_key,
                                      self._counts_key], args=[event_id])

    # -- transport -----------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        self.publish_many((event,))

    def publish_many(self, events: Sequence[Event], *, origin: str | None = None) -> None:
        """``XADD`` every event in one round trip (one script call per ``batch_size``).

        ``origin`` tags the entries so that a stream opened with the same ``exclude_origin``
        skips them (a broker ignoring its own events).
        """
        self._check_open()
        if not events:
            return
        size = self.batch_size
        self._run_writes([self._write_args((), [(e.type, 0, e.to_json())
                                                for e in events[i:i + size]], origin)
                          for i in range(0, len(events), size)])
        with self._lock:
            self._published += len(events)

    def _last_id(self) -> tuple[int, int]:
        with _translate_errors(self._address):
            try:
                info = self._client.xinfo_stream(self.stream_name)
            except redis.ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return (0, 0)
                raise
        return _parse_id(info["last-generated-id"])

    def stream(self, pattern: str, *, exclude_origin: str | None = None) -> _FanoutStream:
        """A fan-out stream of events published after this call returns (see module doc).

        With ``exclude_origin``, entries published with that ``origin`` are skipped.
        """
        validate_pattern(pattern)
        self._check_open()
        start = self._last_id()
        s = _FanoutStream(pattern, start, on_close=self._forget_stream,
                          exclude_origin=exclude_origin)
        with self._lock:
            self._check_open()
            self._streams.append(s)
            if self._reader is None:
                self._reader_client = self._new_client(retries=0)
                self._reader = QuietThread(target=self._read_loop,
                                                name=f"eventbroker-redis-{self.stream_name}",
                                                daemon=True)
                self._reader.start()
            self._reader_wake.notify_all()
        return s

    def _forget_stream(self, s: _FanoutStream) -> None:
        with self._lock:
            if s in self._streams:
                self._streams.remove(s)

    def _read_loop(self) -> None:
        client = self._reader_client
        assert client is not None
        cursor: str | None = None
        backoff = _Backoff(self.reconnect_max_delay)
        while True:
            with self._lock:
                while not self._streams and not self._closed:
                    cursor = None  # idle: a new stream restarts reading at its own start
                    self._reader_wake.wait()
                if self._closed:
                    return
                if cursor is None:
                    s0 = min(self._streams, key=lambda s: s.start)
                    cursor = f"{s0.start[0]}-{s0.start[1]}"
            try:
                resp = client.xread({self.stream_name: cursor}, count=self.read_count,
                                    block=int(self.block * 1000))
                backoff.reset()
            except Exception as exc:  # noqa: BLE001 - the reader must survive anything
                if self._closed:
                    return
                delay = backoff.next()
                log.warning("redis at %s: fan-out reader: %s; retrying in %.2f s",
                            self._address, exc, delay)
                time.sleep(delay)
                continue
            # Streams opened while we were blocked count too: their start id filters them.
            with self._lock:
                streams = list(self._streams)
            delivered = 0
            for _name, entries in resp or ():
                for entry_id, fields in entries:
                    cursor = entry_id
                    key = _parse_id(entry_id)
                    etype = fields.get("t", "")
                    origin = fields.get("o")
                    targets = [s for s in streams if key > s.start and s.wants(etype)
                               and (origin is None or s.exclude_origin != origin)]
                    if not targets:
                        continue
                    try:
                        event = Event.from_json(fields["e"])
                    except Exception:
                        log.exception("redis at %s: unreadable entry %s", self._address,
                                      entry_id)
                        continue
                    for i, s in enumerate(targets):
                        s._put(event if i == 0 else event.clone())
                    delivered += len(targets)
            if delivered:
                self._count_consumed(delivered)

    def group_stream(self, pattern: str, group: str, *, lease: float = 30.0) -> _RedisGroupStream:
        """A competing-consumer member of ``(group, pattern)`` (see the module docstring)."""
        validate_pattern(pattern)
        if not group:
            raise ValueError("group_stream: group must not be empty")
        if lease <= 0:
            raise ValueError(f"group_stream: lease must be > 0, got {lease}")
        self._check_open()
        g = _RedisGroupStream(self, pattern, group, lease)
        with self._lock:
            self._groups.append(g)
        return g

    def _forget_group(self, g: _RedisGroupStream) -> None:
        with self._lock:
            if g in self._groups:
                self._groups.remove(g)

    # -- lifecycle -----------------------------------------------------------------------------

    def stats(self) -> ProviderStats:
        self._check_open()
        with _translate_errors(self._address):
            pipe = self._client.pipeline(transaction=False)
            pipe.zcard(self._index_key)
            pipe.hgetall(self._counts_key)
            pipe.xinfo_stream(self.stream_name)
            pipe.xinfo_groups(self.stream_name)
            total, counts, info, groups = pipe.execute(raise_on_error=False)
        if isinstance(total, Exception):
            raise provider_error("redis", self._address, total)
        counts = counts if isinstance(counts, dict) else {}
        specific: dict[str, Any] = {"stream": self.stream_name, "stream_length": 0}
        if isinstance(info, dict):
            specific.update(stream_length=info.get("length", 0),
                            last_generated_id=info.get("last-generated-id"),
                            entries_added=info.get("entries-added"))
        if isinstance(groups, list):
            specific["groups"] = {
                g["name"]: {"consumers": g.get("consumers"), "pending": g.get("pending"),
                            "lag": g.get("lag"), "last_delivered_id": g.get("last-delivered-id")}
                for g in groups
                if str(g.get("name", "")).startswith(self.consumer_group + ":")
            }
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

    def drop(self) -> None:
        """Delete every key this provider uses (stream, groups, stored events). For tests."""
        self._check_open()
        with _translate_errors(self._address):
            while True:
                ids = self._client.zrange(self._index_key, 0, 999)
                if not ids:
                    break
                pipe = self._client.pipeline(transaction=False)
                pipe.delete(*(self._event_prefix + i for i in ids))
                pipe.zrem(self._index_key, *ids)
                pipe.execute()
            self._client.delete(self.stream_name, self._index_key, self._counts_key)

    def close(self) -> None:
        """End every open stream, stop the reader thread and close all connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams, self._streams = list(self._streams), []
            groups = list(self._groups)
            reader, self._reader = self._reader, None
            self._reader_wake.notify_all()
        for s in streams:
            s.close()
        for g in groups:
            g.close()
        if self._reader_client is not None:
            _interrupt(self._reader_client)  # wakes a blocked XREAD
        if reader is not None:
            reader.join(self.block + 5)
        if self._reader_client is not None:
            self._reader_client.close()
        self._client.close()
