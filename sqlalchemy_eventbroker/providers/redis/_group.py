"""A member of a Redis consumer group (``group_stream``) and the one way to wake a blocked read."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis

from ...errors import ProviderError
from ...event import Event
from .._group_stream import BufferedDelivery, BufferedGroupStream

if TYPE_CHECKING:
    from ._provider import RedisProvider

__all__ = ["RedisGroupStream", "interrupt"]

log = logging.getLogger(__name__)

_ACK_DELAY = 0.05  # longest a batched XACK waits while its member keeps receiving

# KEYS: stream; ARGV: group, this consumer, idle ms -> the consumers deleted: every other one
# idle at least that long with no pending entries. Atomic, so an entry read between the check
# and the delete cannot be dropped with its consumer (DELCONSUMER discards pending entries).
_PRUNE = """
local pruned = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[2] and tonumber(f['pending']) == 0
      and tonumber(f['idle']) >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    pruned[#pruned + 1] = f['name']
  end
end
return pruned
"""

# Ordered groups' leadership (see _group_stream). KEYS: the leadership key; ARGV: token, lease
# ms -> 1 when the token holds it (renewed or taken), 0 when another live member does.
_LEAD = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: the leadership key; ARGV: token. Deletes it only while the token holds it.
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def interrupt(client: Any) -> None:
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


class RedisGroupStream(BufferedGroupStream[str]):
    """A consumer of the Redis consumer group ``<consumer_group>:<group>:<pattern>``.

    Each member has its own connection for the blocking ``XREADGROUP`` so that ``close()`` from
    another thread can wake it by shutting that connection down. Acknowledgements are batched:
    those issued while the member works through a fetched batch go out with its next read
    (``XACK`` and ``XREADGROUP`` pipelined, one round trip) or after ``_ACK_DELAY``; with
    nothing buffered and no read under way, ``ack`` sends its ``XACK`` at once.

    Dead members' consumers are pruned: a member killed without ``close()`` leaves its
    consumer in the group; once others reclaimed its entries (``XAUTOCLAIM`` after the
    lease), a consumer with nothing pending and idle for ``prune_idle`` seconds (10 leases,
    at least 10 blocking reads: a live member reads every ``block`` seconds, and one with
    work in flight has entries pending) is deleted by whichever member looks next.
    """

    kind = "redis"
    _p: RedisProvider

    def __init__(self, provider: RedisProvider, pattern: str, group: str, lease: float,
                 *, ordered: bool = False) -> None:
        super().__init__(provider, pattern, group, lease,
                         name=f"{provider.consumer_group}:{group}:{pattern}",
                         reconnect_max_delay=provider.reconnect_max_delay, ordered=ordered)
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._client = provider._new_client(retries=0)
        self._pending_acks: list[str] = []
        self._acks_since = 0.0
        self._lock = threading.Lock()  # acks and state
        self._receiving = False
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._claim_every = max(0.05, lease / 4)
        #: Seconds a consumer without pending entries stays idle before it is pruned.
        self.prune_idle = max(10 * lease, 10 * provider.block)
        self._next_prune = 0.0
        self._prune_script = provider._client.register_script(_PRUNE)
        #: Ordered groups: who leads (see _group_stream), one key per group.
        self._lead_key = f"{provider.stream_name}:lead:{self.name}"
        self._lead_script = provider._client.register_script(_LEAD)
        self._resign_script = provider._client.register_script(_RESIGN)
        with provider._translate_errors():
            self._create_group("$")

    def _create_group(self, start: str) -> None:
        try:
            self._p._client.xgroup_create(self._p.stream_name, self.name, id=start,
                                          mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- receiving -----------------------------------------------------------------------------

    def _before_take(self) -> None:
        # With an empty buffer the next _fill sends the acks with its read (one round trip).
        if self._pending_acks and self._buffer and (
                time.monotonic() - self._acks_since >= _ACK_DELAY):
            with contextlib.suppress(*self._p.driver_errors):  # kept for the next try
                self._flush_acks(translate=False)

    def _recovered(self, exc: Exception) -> bool:
        if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
            # Redis lost the group (restart without persistence, or the stream was deleted):
            # all in the stream is new since, so start it at 0.
            log.warning("redis group %s vanished; re-creating it", self.name)
            with self._p._translate_errors():
                self._create_group("0")
            return True
        return False

    def _fill(self, wait: float) -> None:
        """One round of reclaiming and reading into the buffer (blocks up to ``wait``)."""
        p = self._p
        now = time.monotonic()
        if now >= self._next_claim:
            self._flush_acks(translate=False)
            self._next_claim = now + self._claim_every
            res = self._client.xautoclaim(p.stream_name, self.name, self.consumer,
                                          min_idle_time=int(self.lease * 1000),
                                          start_id=self._claim_cursor, count=p.batch_size)
            self._claim_cursor = res[0]
            if self._claim_cursor != "0-0":
                self._next_claim = now  # more to reclaim: keep going on the next round
            if self._accept(res[1]):
                return
        if now >= self._next_prune:
            self._next_prune = now + self.prune_idle / 2
            self.prune()
        # The acknowledgements waiting so far go in the same round trip as the read.
        with self._lock:
            acks, self._pending_acks = self._pending_acks, []
        pipe = self._client.pipeline(transaction=False)
        if acks:
            pipe.xack(p.stream_name, self.name, *acks)
        block = int(wait * 1000)
        pipe.xreadgroup(self.name, self.consumer, {p.stream_name: ">"}, count=p.batch_size,
                        block=block if block > 0 else None)
        self._receiving = True
        try:
            resp = pipe.execute()[-1]
        except BaseException:
            with self._lock:  # not known to be written: kept for the next attempt
                self._pending_acks[:0] = acks
            raise
        finally:
            self._receiving = False
        for _name, entries in resp or ():
            self._accept(entries)

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
                    log.exception("redis group %s: unreadable entry %s", self.name, entry_id)
                    skipped.append(entry_id)
                    continue
                self._buffer.append(BufferedDelivery(event, entry_id, self))
                accepted += 1
            else:
                skipped.append(entry_id)
        if skipped:
            with self._lock:
                self._pending_acks.extend(skipped)
        return accepted

    def prune(self) -> list[str]:
        """Delete the group's dead consumers now (see the class docstring); their names."""
        pruned = [str(c) for c in self._prune_script(
            keys=[self._p.stream_name],
            args=[self.name, self.consumer, int(self.prune_idle * 1000)])]
        if pruned:
            log.info("redis group %s: pruned %d dead consumer(s): %s", self.name, len(pruned),
                     ", ".join(pruned))
        return pruned

    # -- acknowledging ---------------------------------------------------------------------

    def _ack(self, delivery: BufferedDelivery[str]) -> None:
        # Batched: while the member still works through a fetched batch (or is blocked in a
        # read) the XACK waits for the next receive(), at most _ACK_DELAY seconds in a busy
        # loop; otherwise it is sent now. One XACK per batch is ~25x cheaper than one each.
        with self._lock:
            if not self._pending_acks:
                self._acks_since = time.monotonic()
            self._pending_acks.append(delivery.token)
            now = ((not self._receiving and not self._buffer)
                   or len(self._pending_acks) >= self._p.batch_size)
        if now:
            self._flush_acks()

    def _flush_acks(self, *, translate: bool = True) -> None:
        with self._lock:
            ids, self._pending_acks = self._pending_acks, []
        if ids:
            try:
                self._p._client.xack(self._p.stream_name, self.name, *ids)
            except self._p.driver_errors as exc:
                with self._lock:  # keep them for the next attempt
                    self._pending_acks[:0] = ids
                if translate:
                    raise self._p._error(exc) from exc
                raise

    def _renew(self, deliveries: Sequence[BufferedDelivery[str]]) -> set[BufferedDelivery[str]]:
        with self._p._translate_errors():
            owned = set(self._p._renew_script(keys=[self._p.stream_name],
                                              args=[self.name, self.consumer,
                                                    *(d.token for d in deliveries)]))
        return {d for d in deliveries if d.token in owned}

    # -- ordered groups: leadership ------------------------------------------------------------

    def _lead(self, token: str) -> bool:
        with self._p._translate_errors():
            return bool(self._lead_script(keys=[self._lead_key],
                                          args=[token, max(1, int(self.lease * 1000))]))

    def _resign(self, token: str) -> None:
        with self._p._translate_errors():
            self._resign_script(keys=[self._lead_key], args=[token])

    def _take_over(self) -> None:
        """Claim every entry pending in the group, oldest first, before reading new ones.

        Only a leader reads an ordered group, so whatever is pending belongs to an earlier
        leader, gone (its leadership lapsed) or resigned: it must come before anything new,
        whatever its idle time.
        """
        p = self._p
        self._flush_acks(translate=False)
        cursor = "0-0"
        with p._translate_errors():
            while True:
                cursor, entries, *_ = self._client.xautoclaim(
                    p.stream_name, self.name, self.consumer, min_idle_time=0,
                    start_id=cursor, count=p.batch_size)
                self._accept(entries)
                if cursor in ("0-0", b"0-0"):
                    break
        self._claim_cursor = "0-0"

    # -- closing -------------------------------------------------------------------------------

    def _shut(self) -> None:
        try:
            self._flush_acks()
            if not self._buffer:
                with self._p._translate_errors():
                    self._p._retire_script(keys=[self._p.stream_name],
                                           args=[self.name, self.consumer])
        except ProviderError as exc:
            log.debug("redis group %s: close: %s", self.name, exc)
        self._buffer.clear()
        interrupt(self._client)  # wakes a reader blocked in XREADGROUP
        with self._recv_lock:  # wait for it to leave, then release its connection
            self._client.close()
