"""The store of record on NATS: one stream message per event, one small status entry per change.

An event is stored once, as the stream message that also carries it to subscribers. Its
status lives apart, in a key-value bucket (key = event id, history :data:`STATUS_HISTORY`):
each ``update_status`` appends one small entry (status, error, retry count, time) without
reading anything first, and a read folds the entries written after the event's message onto
the event, oldest first. This module holds the read side: finding an event's message, reading
a stream range, fetching and folding status entries.

Why a scan finds an event: JetStream (2.9) has no secondary index, and the event's subject is
fixed by the API contract (``<prefix>.<type>``, which users may subscribe to), so the id cannot
be in the subject. Every message carries the id in a header (:data:`ID_HEADER`); ``get`` and
``delete`` read the headers only (not the bodies) of the messages stored since the id's own
time (UUIDv7 ids carry their creation time, less :data:`CLOCK_MARGIN`), or of the whole stream
for ids without a time, and then fetch the one message by sequence.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from ..._json import dumps, loads
from ...errors import EventValidationError
from ...event import Event, EventStatus

__all__ = [
    "CLOCK_MARGIN",
    "ID_HEADER",
    "STATUS_HISTORY",
    "StatusEntries",
    "build_event",
    "fetch_statuses",
    "id_time",
    "read_stream",
    "status_entry",
]

log = logging.getLogger("sqlalchemy_eventbroker.providers.nats")

#: The header every event message carries its event id in.
ID_HEADER = "Eventbroker-Id"
#: Status entries kept per event; older ones drop off (only an event updated more often than
#: this loses the ``processed_at``/``retry_count`` of its oldest updates).
STATUS_HISTORY = 16
#: Seconds of clock difference allowed between the machine that made an event (its UUIDv7 id
#: and ``created_at``) and the server that stored it, when a read starts at a time.
CLOCK_MARGIN = 600.0
#: A status entry stored more than this many seconds before the event's message belongs to an
#: earlier copy of the same id (storing an id again replaces its status too). The allowance is
#: for clock differences between the servers of a cluster, which stamp the two streams.
_EARLIER_COPY = dt.timedelta(seconds=1)
_RESET_OPS = ("DEL", "PURGE")

#: An event's status entries: (server time, entry JSON), oldest first.
StatusEntries = list[tuple[dt.datetime, bytes]]


def id_time(event_id: str) -> dt.datetime | None:
    """The creation time a UUIDv7 ``event_id`` carries (ms precision), else ``None``."""
    digits = event_id.replace("-", "")
    if len(digits) != 32 or digits[12] != "7":
        return None
    try:
        ms = int(digits[:12], 16)
    except ValueError:
        return None
    if ms <= 0:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def status_entry(status: EventStatus, error: str, retry_count: int | None) -> bytes:
    """The value one status change stores: only what the change says, and its time."""
    entry: dict[str, Any] = {"s": str(status), "e": error,
                             "t": dt.datetime.now(dt.UTC).isoformat()}
    if retry_count is not None:
        entry["r"] = int(retry_count)
    return dumps(entry).encode()


def _fold(d: dict[str, Any], stored: dt.datetime | None, entries: Iterable[tuple[dt.datetime, bytes]]
          ) -> None:
    """Apply ``entries`` (oldest first) to the event dict ``d`` as ``update_status`` would have,
    skipping those older than the event's message (``stored``)."""
    cutoff = None if stored is None else stored - _EARLIER_COPY
    for at, raw in entries:
        if cutoff is not None and at < cutoff:
            continue
        try:
            u = loads(raw)
            status, t = u["s"], u["t"]
        except (ValueError, TypeError, KeyError):
            log.error("nats: unreadable status entry for event %s skipped", d.get("id"))
            continue
        d["status"] = status
        d["error"] = u.get("e", "")
        if "r" in u:
            d["retry_count"] = u["r"]
        if status == "processing":
            d["processed_at"] = t
        elif status in ("completed", "failed"):
            d["completed_at"] = t
            if not d.get("processed_at"):
                d["processed_at"] = t


def build_event(data: bytes, event_id: str, stored: dt.datetime | None,
                entries: StatusEntries, where: str) -> Event | None:
    """The event in message body ``data`` with its status entries folded in; ``None`` (logged
    with its id) when the body is not a readable event."""
    try:
        d = loads(data)
        if not isinstance(d, dict):
            raise EventValidationError("event: not a JSON object")
        if entries:
            _fold(d, stored, entries)
        return Event.from_dict(d)
    except (EventValidationError, ValueError, TypeError) as exc:
        log.error("nats: stored event %s in %s is unreadable and skipped: %s",
                  event_id, where, exc)
        return None


def _reset(headers: dict[str, str] | None) -> bool:
    return bool(headers) and (headers or {}).get("KV-Operation") in _RESET_OPS


async def fetch_statuses(js: Any, kv_stream: str, subject: str) -> StatusEntries:
    """The status entries of one event (its key's subject ``subject``), oldest first.

    Two lookups in flight at once, the first and the last entry of the subject: for the usual
    event with one status change they are the same message and nothing more is read.
    """
    async def one(**kw: Any) -> Any:
        try:
            return await js.get_msg(kv_stream, subject=subject, **kw)
        except nats.js.errors.NotFoundError:
            return None

    first, last = await asyncio.gather(one(seq=1, next=True), one())
    if first is None or last is None:
        return []
    msgs = [first]
    seq = first.seq
    while seq < last.seq:
        nxt = await one(seq=seq + 1, next=True)
        if nxt is None:
            break
        msgs.append(nxt)
        seq = nxt.seq
    entries: StatusEntries = []
    for m in msgs:
        if _reset(m.headers):
            entries.clear()
        elif m.data:
            entries.append((m.time, m.data))
    return entries


def fold_status_messages(msgs: Iterable[Msg], wanted: set[str] | None
                         ) -> dict[str, StatusEntries]:
    """Status entries by event id from a read of the status bucket's stream (oldest first)."""
    out: dict[str, StatusEntries] = {}
    for m in msgs:
        key = m.subject.split(".", 2)[2]
        if wanted is not None and key not in wanted:
            continue
        if _reset(m.headers):
            out.pop(key, None)
        elif m.data:
            out.setdefault(key, []).append((m.metadata.timestamp, m.data))
    return out


async def read_stream(js: Any, stream: str, subject: str, *, start: dt.datetime | None = None,
                      headers_only: bool = False, progress_timeout: float = 5.0) -> list[Msg]:
    """Every message of ``stream`` on ``subject`` (a filter; ``""`` for all) stored up to now,
    oldest first, from ``start`` (server time) when given; with ``headers_only`` the bodies
    stay on the server. One ordered consumer; the read ends at the stream's last sequence as
    of the start, so it finishes while publishers keep publishing.

    Raises:
        TimeoutError: no message arrived for ``progress_timeout`` seconds before the end
            while the server still had messages for the read.
    """
    last = (await js.stream_info(stream)).state.last_seq
    if not last:
        return []
    msgs: list[Msg] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Msg) -> None:
        if done.done():
            return
        md = msg.metadata
        seq = md.sequence.stream
        if seq <= last:
            msgs.append(msg)
        if seq >= last or md.num_pending == 0:
            done.set_result(None)

    config = api.ConsumerConfig(headers_only=headers_only or None)
    if start is not None:
        config.deliver_policy = api.DeliverPolicy.BY_START_TIME
        config.opt_start_time = start
    sub = await js.subscribe(subject, stream=stream, cb=on_msg, ordered_consumer=True,
                             config=config)
    try:
        info = await sub.consumer_info()
        if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
            return msgs  # nothing matched
        seen = -1
        while not done.done():
            if len(msgs) == seen:
                if (await sub.consumer_info()).num_pending == 0:
                    break  # the messages after the last one read were deleted meanwhile
                raise TimeoutError(f"reading stream {stream} stalled after {seen} messages")
            seen = len(msgs)
            await asyncio.wait((done,), timeout=progress_timeout)
    finally:
        await sub.unsubscribe()
    return msgs
