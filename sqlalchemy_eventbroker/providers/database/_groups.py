"""Consumer groups: durable ``(group, pattern)`` cursors, claims, leases and acknowledgements.

:class:`GroupStore` is the database side (one per provider): it opens groups, advances a
group's cursor with the same gap-free read as the fan-out reader (adding one claim per
matching event), and takes, renews, releases and acknowledges claims. :class:`DbGroupStream`
is one member; it talks only to its store and to the provider's :class:`~._wake.Waker`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa

from ..._threads import QuietThread
from ...errors import ProviderError
from ...event import Event
from ...pattern import compile_pattern
from .._backoff import Backoff
from ..base import Closeable
from ._codec import row_event
from ._reader import Start
from ._wake import Waker

if TYPE_CHECKING:
    from ._dialect import Dialect
    from ._engine import Database

__all__ = ["DbDelivery", "DbGroupStream", "GroupStore"]

logger = logging.getLogger(__name__.rpartition("._")[0])

#: Acknowledgements written at once when this many are pending (else after _ACK_DELAY s,
#: unless the member's next claim carried them first: a busy member claims every few ms, so
#: its acknowledgements cost no statement of their own).
_ACK_BATCH = 256
_ACK_DELAY = 0.05
#: A member that handed out its last batch within this many seconds claims twice as many
#: next time (at most `prefetch`); a slower one claims one at a time (or what the caller
#: asked for). At 0.05 s a draining member, its hand-out slowed by the other threads of its
#: process, kept falling back and averaged ~50 events per claim; at 0.25 s it stays near
#: `prefetch`, and no buffered event waits more than about that long for its handler.
_PREFETCH_HORIZON = 0.25


class GroupStore:
    """The database side of every group of one provider. Thread-safe.

    Args:
        db: the provider's connections.
        dialect: the provider's dialect strategy.
        page_size: rows per cursor advance.
        start_point: "now" as a :class:`Start` (for a new group).
        waker: woken when claims were added (members of this provider look at once).
        announce: called when claims were added, to wake members elsewhere (after commit).
    """

    def __init__(self, db: Database, dialect: Dialect, page_size: int,
                 start_point: Callable[[], Start], waker: Waker,
                 announce: Callable[[], None]) -> None:
        self._db = db
        self._dialect = dialect
        self._sql = dialect.group_sql
        self._page_size = page_size
        self._start_point = start_point
        self._waker = waker
        self._announce = announce
        self._lock = threading.Lock()
        self._pending: set[DbGroupStream] = set()
        self._flusher: _AckFlusher | None = None
        self.consumed = 0

    # -- groups --

    def open(self, group: str, pattern: str) -> int:
        """The group's id, creating it at the tail ("now") if new."""
        g = self._dialect.tables.groups
        where = (g.c.group_name == group, g.c.pattern == pattern)
        start = self._start_point()
        tx, seq = start.cursor()
        with self._db.begin() as conn:
            gid = conn.execute(sa.select(g.c.id).where(*where)).scalar()
            if gid is not None:
                return int(gid)
            self._dialect.insert_group(conn, {
                "group_name": group, "pattern": pattern, "cursor_tx": tx, "cursor_seq": seq,
                "start_snapshot": start.text() if self._dialect.uses_tx_id else None,
                "created_at": dt.datetime.now(dt.UTC),
            })
            return int(conn.execute(sa.select(g.c.id).where(*where)).scalar_one())

    def drop(self, group: str, pattern: str) -> None:
        g, c = self._dialect.tables.groups, self._dialect.tables.claims
        with self._db.begin() as conn:
            gid = conn.execute(
                sa.select(g.c.id).where(g.c.group_name == group, g.c.pattern == pattern)
            ).scalar()
            if gid is not None:
                conn.execute(c.delete().where(c.c.group_id == gid))
                conn.execute(g.delete().where(g.c.id == gid))

    def fill(self, stream: DbGroupStream) -> tuple[int, bool]:
        """Advance the group's cursor by one page, adding a claim per matching event.

        Returns ``(claims added, should look again soon)``. Gap-free like the fan-out reader.
        PostgreSQL: optimistic and without a transaction around the reads (the cursor moves
        by compare-and-set, together with the claims, in one statement); elsewhere one
        transaction that starts with a write, which serialises fillers.
        """
        g = self._dialect.tables.groups
        gid = stream.group_id
        limit = self._page_size
        with self._db.one_statement() as conn:
            self._dialect.lock_group(conn, gid)
            row = conn.execute(
                sa.select(g.c.cursor_tx, g.c.cursor_seq, g.c.start_snapshot).where(g.c.id == gid)
            ).first()
            if row is None:
                raise ProviderError(f"consumer group {stream.group!r} was dropped")
            old = (int(row[0]), int(row[1]))
            start = Start.parse(row[2]) if row[2] else None
            rows = conn.execute(self._dialect.claimable(old, limit)).all()
            cursor, held, claims = old, False, []
            for seq, event_id, etype, key, tx, ready in rows:
                if not ready:
                    held = True
                    break
                cursor = (int(tx), int(seq))
                if start is not None and start.before(*cursor):
                    continue  # visible when the group was created: before its start
                if stream.wants(etype):
                    claims.append((int(seq), str(event_id), key or ""))
            if cursor == old:
                return 0, held
            if not self._sql.advance(conn, gid, old, cursor, claims):
                return 0, True  # another member filled this page first; nothing was written
        if claims:  # committed: wake the other members, here and elsewhere
            self._waker.wake()
            self._announce()
        return len(claims), held or len(rows) == limit

    # -- claims --

    def claim(self, stream: DbGroupStream, n: int, acks: list[int]) -> list[DbDelivery]:
        """Write ``acks`` and lease up to ``n`` of the group's oldest free (or expired) claims,
        with their events, in one transaction (PostgreSQL: one statement)."""
        # The token's first half names the member (``groups list`` counts members by it), the
        # second half this claim.
        token = stream.member + uuid.uuid4().hex[:16]
        claimed_at = time.monotonic()
        with self._db.one_statement() as conn:
            rows = self._sql.claim(conn, stream.group_id, acks, n, stream.lease, token,
                                   ordered=stream.ordered)
        out: list[DbDelivery] = []
        gone: list[int] = []
        for row in rows:
            seq = int(row[0])
            if row[1] is None:  # the event was deleted or purged meanwhile: nothing to deliver
                gone.append(seq)
                continue
            out.append(DbDelivery(row_event(row[1:]), stream, seq, token, claimed_at))
        if gone:
            stream.ack_later(gone)
        if acks and stream.ordered:
            self._keys_released()
        if out:
            with self._lock:
                self.consumed += len(out)
        return out

    def ack(self, stream: DbGroupStream, seqs: list[int]) -> None:
        with self._db.one_statement() as conn:
            self._sql.ack(conn, stream.group_id, seqs)
        if stream.ordered:
            self._keys_released()

    def _keys_released(self) -> None:
        """Acknowledgements of an ordered group were written: the next claim of each of
        their keys is free now, so wake the members (here and elsewhere) at once rather than
        at their backstop."""
        self._waker.wake()
        self._announce()

    def relet(self, stream: DbGroupStream, deliveries: list[DbDelivery], lease: float) -> set[int]:
        if not deliveries:
            return set()
        with self._db.one_statement() as conn:
            return self._sql.relet(conn, stream.group_id, [(d.seq, d.token) for d in deliveries], lease)

    def renew(self, delivery: DbDelivery) -> bool:
        s = delivery.stream
        with self._db.one_statement() as conn:
            return self._sql.renew(conn, s.group_id, delivery.seq, delivery.token, s.lease)

    # -- deferred acknowledgements --

    def acks_pending(self, stream: DbGroupStream, pending: bool) -> None:
        """``stream`` now holds (or no longer holds) acknowledgements not yet written."""
        with self._lock:
            if pending:
                self._pending.add(stream)
            else:
                self._pending.discard(stream)

    def request_flush(self) -> None:
        with self._lock:
            if self._flusher is None:
                self._flusher = _AckFlusher(self)
            flusher = self._flusher
        flusher.request()

    def pending_streams(self) -> list[DbGroupStream]:
        with self._lock:
            return list(self._pending)

    def close(self) -> None:
        """Stop the flusher and write what streams nobody closed still owe."""
        with self._lock:
            flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.stop()
        for s in self.pending_streams():
            s.flush_acks_or_warn()


@dataclass(eq=False, slots=True)
class DbDelivery:
    """One event leased to this member of a group."""

    event: Event
    stream: DbGroupStream
    seq: int
    token: str
    #: ``time.monotonic()`` when the lease was last set (claim or renewal).
    leased_at: float = 0.0

    def ack(self) -> None:
        """Done: the claim is deleted, so the group never sees the event again.

        Deferred by ~50 ms and written together with other acknowledgements (or
        with the stream's next claim); ``close()`` writes what is still pending. Until it is
        written the event stays leased to this member, so at worst (a crash in between) it is
        delivered again: at-least-once.
        """
        self.stream.ack_later([self.seq])

    def renew(self) -> None:
        """Extend the lease by its full length from now (no-op if it was lost meanwhile)."""
        self.leased_at = time.monotonic()
        if not self.stream.store.renew(self):
            logger.warning(
                "group %r lost the lease on event %s: it may be delivered again",
                self.stream.group, self.event.id, extra={"event_id": self.event.id},
            )


class DbGroupStream(Closeable):
    """One member of a consumer group (see ``DatabaseProvider.group_stream``).

    Claims events in batches and hands them out one by one (``receive``) or as many as the
    caller can start on (``receive_many``). The batch doubles (up to ``prefetch``) while each
    batch is handed out within ~250 ms and falls back to 1 (or what ``receive_many`` asked for)
    otherwise, so an idle or slow member leases little and a busy one amortises the round
    trip over up to ``prefetch`` events. Leases count from the claim; a buffered delivery whose
    lease is half gone is renewed (with the rest of the buffer, one statement) before it is
    handed out, and dropped if the lease was lost meanwhile. Acknowledgements are deferred
    ~50 ms and written in one statement, or with the next claim.

    While it finds nothing it waits for a wake-up, but never longer than ``idle`` seconds (the
    backstop: a lost wake-up delays delivery, and expired leases of dead members are noticed).
    """

    def __init__(self, store: GroupStore, waker: Waker, group_id: int, group: str, pattern: str,
                 lease: float, *, prefetch: int, idle: float,
                 provider_closed: Callable[[], bool], ordered: bool = False) -> None:
        self.store = store
        #: Take a claim only when no older claim of its key is left in the group.
        self.ordered = ordered
        self.group_id = group_id
        self.group = group
        self.pattern = pattern
        self.lease = lease
        self.prefetch = max(1, int(prefetch))
        self.wants = compile_pattern(pattern)
        #: 16 hex digits naming this member in its claims' tokens (see GroupStore.claim).
        self.member = uuid.uuid4().hex[:16]
        self._waker = waker
        self._provider_closed = provider_closed
        self._closed = threading.Event()
        self._idle = max(0.05, min(idle, lease / 4))
        self._buffer: deque[DbDelivery] = deque()
        self._acks: list[int] = []
        self._acks_lock = threading.Lock()
        self._io = threading.RLock()  # one claim / ack write / buffer change at a time
        self._batch = 1
        self._handed = 0
        self._since = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def receive(self, timeout: float | None = None) -> DbDelivery | None:
        """The next delivery, or ``None`` after ``timeout`` seconds.

        Raises:
            StopIteration: the stream (or its provider) was closed.
        """
        got = self.receive_many(1, timeout)
        return got[0] if got else None

    def receive_many(self, limit: int, timeout: float | None = None) -> list[DbDelivery]:
        """Up to ``limit`` deliveries (what is buffered, else one claim's worth), or ``[]``
        after ``timeout`` seconds. A caller asking for ``limit`` claims at least that many
        at once (up to ``prefetch``): one round trip for the batch it can start on.

        Raises:
            StopIteration: the stream (or its provider) was closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        soon = Backoff(0.25, base=0.01)
        limit = max(1, limit)
        while True:
            if self._closed.is_set() or self._provider_closed():
                raise StopIteration
            gen = self._waker.generation()
            got = self._next(limit)
            if got:
                return got
            added, again = self.store.fill(self)
            if added:
                soon.reset()
                continue
            wait = soon.next() if again else self._idle
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                wait = min(wait, remaining)
            self._waker.wait(gen, wait)

    def _next(self, limit: int) -> list[DbDelivery]:
        """Buffered deliveries (still leased), else the first of a freshly claimed batch."""
        with self._io:
            out = self._take_buffered(limit)
            if out:
                return out
            now = time.monotonic()
            if self._handed:  # the last batch is all out: was it quick?
                busy = now - self._since < _PREFETCH_HORIZON
                self._batch = min(self.prefetch, 2 * self._batch) if busy else 1
            with self._acks_lock:
                acks, self._acks = self._acks, []
            try:
                got = self.store.claim(self, max(self._batch, min(limit, self.prefetch)), acks)
            except BaseException:
                self._restore_acks(acks)
                raise
            if got:
                self._handed, self._since = 0, now
                self._buffer.extend(got)
            return self._take_buffered(limit)

    def _take_buffered(self, limit: int) -> list[DbDelivery]:
        buf = self._buffer
        if not buf:
            return []
        if time.monotonic() - buf[0].leased_at > self.lease / 2:
            held = self.store.relet(self, list(buf), self.lease)
            now = time.monotonic()
            kept = [d for d in buf if d.seq in held]
            for d in kept:
                d.leased_at = now
            buf.clear()
            buf.extend(kept)
        n = min(limit, len(buf))
        self._handed += n
        return [buf.popleft() for _ in range(n)]

    # -- acknowledgements --

    def ack_later(self, seqs: list[int]) -> None:
        """Acknowledge ``seqs`` soon (batched; see :meth:`DbDelivery.ack`)."""
        if self._closed.is_set():
            self.store.ack(self, seqs)  # after close: nothing will flush it later
            return
        with self._acks_lock:
            first = not self._acks
            self._acks.extend(seqs)
            n = len(self._acks)
        if first:
            self.store.acks_pending(self, True)
        if n >= _ACK_BATCH:
            self.flush_acks()
        elif first:
            self.store.request_flush()

    def _restore_acks(self, seqs: list[int]) -> None:
        if seqs:
            with self._acks_lock:
                self._acks[:0] = seqs

    def flush_acks(self) -> None:
        """Write the deferred acknowledgements now (one statement).

        Raises:
            ProviderError: the write failed; the acknowledgements stay pending.
        """
        with self._acks_lock:
            seqs, self._acks = self._acks, []
        if seqs:
            try:
                self.store.ack(self, seqs)
            except BaseException:
                self._restore_acks(seqs)
                raise
        with self._acks_lock:
            if not self._acks:
                self.store.acks_pending(self, False)

    def flush_acks_or_warn(self) -> None:
        try:
            self.flush_acks()
        except Exception as exc:  # noqa: BLE001 - reported, never silent
            with self._acks_lock:
                n = len(self._acks)
            logger.warning(
                "group %r: %d acknowledgements could not be written (%s); those events "
                "will be delivered again when their leases end", self.group, n, exc,
            )

    def __iter__(self) -> Iterator[DbDelivery]:
        while True:
            d = self.receive(None)
            if d is not None:
                yield d

    def close(self) -> None:
        """Leave the group: write pending acknowledgements, free the claims taken but never
        handed out; deliveries handed out but not acknowledged come back when their leases
        end."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._waker.wake()
        with self._io:
            self.flush_acks_or_warn()
            unused, self._buffer = list(self._buffer), deque()
        if unused:
            try:
                self.store.relet(self, unused, 0.0)
            except Exception as exc:  # noqa: BLE001 - they come back when the leases end
                logger.debug("group %r: could not free %d claims: %s", self.group, len(unused), exc)


class _AckFlusher:
    """Writes the deferred acknowledgements of a provider's group streams, ``_ACK_DELAY``
    after the first one of a batch arrived. A failed write keeps them pending and is
    retried."""

    def __init__(self, store: GroupStore) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._asked = False
        self._stopping = False
        self._thread = QuietThread(target=self._run, daemon=True, name="eventbroker-db-acks")
        self._thread.start()

    def request(self) -> None:
        with self._cond:
            self._asked = True
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._asked and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._asked = False
                # Let a few gather, or ride along with the member's next claim; a later
                # request() must not cut this short (each new batch asks), only stop() does.
                until = time.monotonic() + _ACK_DELAY
                while not self._stopping and (left := until - time.monotonic()) > 0:
                    self._cond.wait(left)
            failed = False
            for s in self._store.pending_streams():
                try:
                    s.flush_acks()
                except Exception as exc:  # noqa: BLE001 - kept pending, retried
                    failed = True
                    logger.warning("group %r: writing acknowledgements failed (%s); retrying",
                                   s.group, exc)
            if failed:
                with self._cond:
                    self._cond.wait(0.5)
                    self._asked = True
