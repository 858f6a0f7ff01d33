"""``RedisProvider``: the store, the fan-out reader and the wiring (see the package docstring)."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from ... import _json
from ..._json import loads
from ..._threads import QuietThread
from ..._types import JSON
from ...errors import EventValidationError
from ...event import Event, EventStatus
from ...pattern import validate_pattern
from .._backoff import Backoff
from .._remote import RemoteProvider
from ..base import EventFilter, ProviderStats, QueueEventStream, StatusUpdate
from . import _scripts
from ._group import RedisGroupStream, interrupt

__all__ = ["RedisProvider"]

log = logging.getLogger("sqlalchemy_eventbroker.providers.redis")

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US = dt.timedelta(microseconds=1)
_UPDATES_PER_CALL = 500
_STATUSES = frozenset(EventStatus)


def _micros(t: dt.datetime) -> int:
    return (t - _EPOCH) // _US


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _event_from_hash(h: dict[str, str]) -> Event:
    """The event a stored hash holds: its JSON, with the status fields the hash has.

    A new event's hash holds only ``json`` and ``status`` (and ``processed_at`` when set);
    ``update_status`` adds the fields it changes. Each status field present in the hash
    wins over the JSON's. Hashes of the earlier layout hold every field, so they read as
    before.

    Raises:
        EventValidationError: the hash is corrupt (not JSON, a field malformed).
    """
    try:
        d = loads(h["json"])
        retry = h.get("retry_count")
        retry_count = int(retry or 0) if retry is not None else None
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise EventValidationError(f"stored event: unreadable ({type(exc).__name__})") from None
    if not isinstance(d, dict):
        raise EventValidationError("stored event: JSON is not an object")
    status = h.get("status")
    if status:
        d["status"] = status
    if retry_count is not None:
        d["retry_count"] = retry_count
    error = h.get("error")
    if error is not None:
        d["error"] = error
    for field in ("processed_at", "completed_at"):
        value = h.get(field)
        if value is not None:
            d[field] = value or None
    return Event.from_dict(d)


def _readable(h: dict[str, str], event_id: str, address: str) -> Event | None:
    # One corrupt hash (written by hand, by another program, or an older version) must not
    # make every list() fail: it is logged with its id and passed over.
    try:
        return _event_from_hash(h)
    except EventValidationError as exc:
        log.error("redis at %s: stored event %s is unreadable and skipped: %s", address,
                  event_id, exc)
        return None


class _FanoutStream(QueueEventStream):
    """A fan-out stream that only accepts entries after ``start`` (the last id at open)."""

    def __init__(self, pattern: str, start: tuple[int, int], on_close: Any,
                 exclude_origin: str) -> None:
        super().__init__(pattern, on_close=on_close)
        self.start = start
        self.exclude_origin = exclude_origin


class RedisProvider(RemoteProvider[_FanoutStream]):
    """Events on Redis Streams (see the package docstring for keys and guarantees).

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
    driver_errors: ClassVar[tuple[type[BaseException], ...]] = (redis.RedisError, OSError)
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (
        redis.ConnectionError, redis.TimeoutError, OSError)

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
        super().__init__(url)
        self.stream_name = stream_name
        self.consumer_group = consumer_group
        self.maxlen = maxlen
        self.max_events = max_events
        self.block = block
        self.batch_size = batch_size
        self.connect_timeout = connect_timeout
        self.reconnect_max_delay = reconnect_max_delay
        self.read_count = max(batch_size, 1000)
        self._index_key = f"{stream_name}:index"
        self._counts_key = f"{stream_name}:counts"
        self._event_prefix = f"{stream_name}:ev:"
        self._keys = [stream_name]  # the scripts name the other keys from it
        # The first argument of every WRITE call: 'max_events,maxlen,publish'.
        self._write_settings = {p: f"{max_events},{maxlen},{int(p)}" for p in (False, True)}
        self._reader: threading.Thread | None = None
        self._reader_client: Any = None
        self._reader_wake = threading.Condition(self._lock)
        with self._translate_errors():
            self._client = self._new_client(retries=1)
            try:
                self._client.ping()
            except BaseException:
                self._client.close()
                raise
        self._write_script = self._client.register_script(_scripts.WRITE)
        self._update_script = self._client.register_script(_scripts.UPDATE)
        self._delete_script = self._client.register_script(_scripts.DELETE)
        self._renew_script = self._client.register_script(_scripts.RENEW)
        self._retire_script = self._client.register_script(_scripts.RETIRE)

    def _new_client(self, retries: int, *, decode: bool = True) -> Any:
        """A client of its own; ``decode=False`` answers ``bytes`` (the fan-out reader decodes
        only the fields it uses, not every name and value of every entry)."""
        # Typed Any: redis-py's stubs cannot tell decode_responses=True clients return str.
        retry = (Retry(ExponentialBackoff(cap=0.5, base=0.05), retries) if retries
                 else Retry(NoBackoff(), 0))
        return redis.Redis.from_url(
            self.url,
            decode_responses=decode,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=self.block + 10.0,
            retry=retry,
        )

    # -- store ---------------------------------------------------------------------------------

    def _write(self, events: Sequence[Event], *, publish: bool, origin: str = "") -> None:
        """Store ``events`` (and ``XADD`` them when ``publish``): one ``WRITE`` call per
        ``batch_size`` events, pipelined when several, so one round trip in all. Three
        arguments per event (see ``_scripts.WRITE``): packing arguments is the client's main
        cost.

        Raises:
            EventValidationError: an event's status is not an ``EventStatus`` (checked before
                anything is written: the script cannot stop half way).
        """
        self._check_open()
        if not events:
            return
        head: list[Any] = [self._write_settings[publish], origin]
        calls = []
        for i in range(0, len(events), self.batch_size):
            args = list(head)
            for e in events[i:i + self.batch_size]:  # a snapshot: later changes are not seen
                if e.status not in _STATUSES:
                    raise EventValidationError(
                        f"event {e.id}: status {e.status!r} is not an EventStatus")
                processed = e.processed_at.isoformat() if e.processed_at is not None else ""
                args += (f"{_micros(e.created_at)},{e.status},{processed},{e.id}", e.type,
                         e.to_json())
            calls.append(args)
        with self._translate_errors():
            if len(calls) == 1:
                self._write_script(keys=self._keys, args=calls[0])
            else:
                pipe = self._client.pipeline(transaction=False)
                for args in calls:
                    self._write_script(keys=self._keys, args=args, client=pipe)
                pipe.execute()
        if publish:
            self._count_published(len(events))

    def store(self, event: Event) -> None:
        """Store ``event`` now (one script call)."""
        _json.check_storable(event.payload, "payload")
        _json.check_storable(event.metadata, "metadata")
        self._write((event,), publish=False)

    def store_and_publish_many(self, events: Sequence[Event], *, origin: str = "") -> None:
        """Store ``events`` and ``XADD`` them in one round trip: each script call stores its
        events and then appends them, the JSON sent once (one call per ``batch_size``
        events, pipelined when several). ``origin`` tags the entries (see the package
        docstring)."""
        self._write(events, publish=True, origin=origin)

    def get(self, event_id: str) -> Event | None:
        self._check_open()
        with self._translate_errors():
            h = self._client.hgetall(self._event_prefix + event_id)
        return _readable(h, event_id, self._address) if h else None

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
        with self._translate_errors():
            while True:
                ids = self._client.zrangebyscore(self._index_key, lo, hi, start=start, num=chunk)
                if not ids:
                    return out
                start += len(ids)
                pipe = self._client.pipeline(transaction=False)
                for event_id in ids:
                    pipe.hgetall(self._event_prefix + event_id)
                for event_id, h in zip(ids, pipe.execute(), strict=True):
                    if not h:
                        continue  # deleted between the two reads
                    event = _readable(h, event_id, self._address)
                    if event is None:
                        continue
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

    def update_status_many(self, updates: Sequence[StatusUpdate]) -> None:
        """Apply ``updates`` in order (same semantics as ``update_status`` each) in one round
        trip: one script call per 500 updates, pipelined. Nothing is read by the client
        first; inside the script each update is one ``HMGET`` (the old status, for the exact
        counters and to skip unknown ids) and one ``HSET`` of the changed fields."""
        self._check_open()
        if not updates:
            return
        now = dt.datetime.now(dt.UTC).isoformat()
        calls = []
        for i in range(0, len(updates), _UPDATES_PER_CALL):
            args: list[Any] = [now]
            for u in updates[i:i + _UPDATES_PER_CALL]:
                retry = "" if u.retry_count is None else int(u.retry_count)
                args += (f"{EventStatus(u.status)},{retry},{u.event_id}", u.error)
            calls.append(args)
        with self._translate_errors():
            if len(calls) == 1:
                self._update_script(keys=self._keys, args=calls[0])
                return
            pipe = self._client.pipeline(transaction=False)
            for args in calls:
                self._update_script(keys=self._keys, args=args, client=pipe)
            pipe.execute()

    def delete(self, event_id: str) -> None:
        self._check_open()
        with self._translate_errors():
            self._delete_script(keys=[self._event_prefix + event_id, self._index_key,
                                      self._counts_key], args=[event_id])

    # -- fan-out -------------------------------------------------------------------------------

    def _last_id(self) -> tuple[int, int]:
        with self._translate_errors():
            try:
                info = self._client.xinfo_stream(self.stream_name)
            except redis.ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return (0, 0)
                raise
        return _parse_id(info["last-generated-id"])

    def stream(self, pattern: str, *, exclude_origin: str = "") -> _FanoutStream:
        """A fan-out stream of events published after this call returns (see the package
        docstring); entries published with ``origin == exclude_origin`` are skipped."""
        validate_pattern(pattern)
        self._check_open()
        start = self._last_id()
        s = _FanoutStream(pattern, start, on_close=self._forget_stream,
                          exclude_origin=exclude_origin)
        with self._lock:
            self._check_open()
            self._streams.append(s)
            if self._reader is None:
                self._reader_client = self._new_client(retries=0, decode=False)
                self._reader = QuietThread(target=self._read_loop,
                                           name=f"eventbroker-redis-{self.stream_name}",
                                           daemon=True)
                self._reader.start()
            self._reader_wake.notify_all()
        return s

    def _read_loop(self) -> None:
        client = self._reader_client
        assert client is not None
        cursor: str | None = None
        backoff = Backoff(self.reconnect_max_delay)
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
                if entries:
                    cursor = entries[-1][0].decode()
                    delivered += self._dispatch(entries, streams)
            if delivered:
                self._count_consumed(delivered)

    def _dispatch(self, entries: Sequence[tuple[bytes, dict[bytes, bytes]]],
                  streams: Sequence[_FanoutStream]) -> int:
        """Hand each entry to the open streams that want it; returns how many got one.

        Entry ids grow, so when every stream started before the first entry the start check
        is settled for the whole batch and the targets depend only on (type, origin): they
        are worked out once per pair, not once per entry. An entry is parsed only when some
        stream takes it.
        """
        first = _parse_id(entries[0][0].decode())
        settled = all(s.start < first for s in streams)
        memo: dict[tuple[bytes, bytes | None], list[_FanoutStream]] = {}
        delivered = 0
        for entry_id, fields in entries:
            t, origin = fields.get(b"t", b""), fields.get(b"o")
            targets = memo.get((t, origin)) if settled else None
            if targets is None:
                etype = t.decode(errors="replace")
                o = origin.decode(errors="replace") if origin is not None else None
                key = first if settled else _parse_id(entry_id.decode())
                targets = [s for s in streams if key > s.start and s.wants(etype)
                           and (o is None or s.exclude_origin != o)]
                if settled:
                    memo[(t, origin)] = targets
            if not targets:
                continue
            try:
                event = Event.from_json(fields[b"e"].decode())
            except Exception:
                log.exception("redis at %s: unreadable entry %s", self._address,
                              entry_id.decode(errors="replace"))
                continue
            for i, s in enumerate(targets):
                s._put(event if i == 0 else event.clone())
            delivered += len(targets)
        return delivered

    def _open_group(self, pattern: str, group: str, lease: float,
                    ordered: bool) -> RedisGroupStream:
        return RedisGroupStream(self, pattern, group, lease, ordered=ordered)

    # -- lifecycle -----------------------------------------------------------------------------

    def stats(self) -> ProviderStats:
        self._check_open()
        with self._translate_errors():
            # MULTI/EXEC: the size and the counters from one instant, since pending is
            # their difference (see _scripts).
            pipe = self._client.pipeline(transaction=True)
            pipe.zcard(self._index_key)
            pipe.hgetall(self._counts_key)
            pipe.xinfo_stream(self.stream_name)
            pipe.xinfo_groups(self.stream_name)
            total, counts, info, groups = pipe.execute(raise_on_error=False)
        if isinstance(total, Exception):
            raise self._error(total)
        specific: dict[str, JSON] = {"stream": self.stream_name, "stream_length": 0}
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
        counted = counts if isinstance(counts, dict) else {}
        done = {st: int(counted.get(st) or 0) for st in ("processing", "completed", "failed")}
        pending = max(0, int(total) - sum(done.values()))
        return self._stats(total, {"pending": pending, **done}, specific)

    def drop(self) -> None:
        """Delete every key this provider uses (stream, groups, stored events). For tests."""
        self._check_open()
        with self._translate_errors():
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
            interrupt(self._reader_client)  # wakes a blocked XREAD
        if reader is not None:
            reader.join(self.block + 5)
        if self._reader_client is not None:
            self._reader_client.close()
        self._client.close()
