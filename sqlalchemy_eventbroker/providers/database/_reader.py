"""The gap-free reader's pieces: where a reader starts, what one read returns, and the fan-out
streams a page is dispatched to.

Reading itself is dialect SQL (``_dialect.py``); the thread that reads is ``_listener.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ...event import Event
from ..base import QueueEventStream

__all__ = ["Cursor", "DbEventStream", "FanOut", "Page", "Row", "Start"]

#: A reader's position: (tx_id, seq) on PostgreSQL, (0, seq) elsewhere.
Cursor = tuple[int, int]


class Row(NamedTuple):
    """One event read from the table, with where it sits and who wrote it."""

    event: Event
    tx: int
    seq: int
    #: The writer's origin ("" when untagged); never copied onto the event.
    origin: str


@dataclass(frozen=True, slots=True)
class Start:
    """Where a stream or group began: the rows already visible then come "before" it.

    PostgreSQL: the snapshot ``xmin:xmax:xip`` taken at the opening. A row (which exists, so
    its transaction committed) was visible then when its ``tx_id`` is below ``xmin``, or below
    ``xmax`` and not among the transactions then in progress. Starting the cursor at
    ``(xmin, 0)`` and skipping those rows makes the start exact even while older transactions
    run elsewhere in the cluster. Elsewhere: simply the highest ``seq`` at the opening.
    """

    xmin: int
    xmax: int
    xip: frozenset[int]
    seq: int

    def before(self, tx: int, seq: int) -> bool:
        if self.xmax == 0:
            return seq <= self.seq
        return tx < self.xmin or (tx < self.xmax and tx not in self.xip)

    def cursor(self) -> Cursor:
        return (self.xmin, 0) if self.xmax else (0, self.seq)

    def text(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, sorted(self.xip)))}"

    @classmethod
    def parse(cls, text: str) -> Start:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x), 0)


@dataclass(slots=True)
class Page:
    """One read of the events table past a cursor."""

    #: Rows in delivery order.
    rows: list[Row]
    cursor: Cursor
    #: Visible rows exist past the cursor whose transactions may still have earlier siblings.
    held_back: bool
    #: The read returned as many rows as asked for: there may be more right away.
    full: bool


class DbEventStream(QueueEventStream):
    """A fan-out stream of the database provider; skips rows written with ``exclude_origin``."""

    def __init__(self, pattern: str, exclude_origin: str,
                 on_close: Callable[[QueueEventStream], None]) -> None:
        super().__init__(pattern, on_close=on_close)
        self.exclude_origin = exclude_origin

    def accepts(self, row: Row) -> bool:
        if self.exclude_origin and row.origin == self.exclude_origin:
            return False
        return self.wants(row.event.type)


class FanOut:
    """The provider's open fan-out streams, their start points, and dispatching to them.

    Thread-safe. The listener asks :meth:`reading_state` before each read and hands what it
    read to :meth:`dispatch`; ``stream()`` registers with :meth:`register`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: list[DbEventStream] = []
        self._starts: dict[DbEventStream, Start] = {}
        self._jump: Cursor | None = None
        self.delivered = 0

    def register(self, stream: DbEventStream, start_point: Callable[[], Start]) -> None:
        """Add ``stream``, starting now (``start_point()`` is taken under the dispatch lock,
        so no page can slip between the snapshot and the registration)."""
        with self._lock:
            start = self._starts[stream] = start_point()
            if not any(not s.closed for s in self._streams):
                # The listener read nothing while no stream was open; everything before this
                # start is "before" the stream anyway, so it may skip there.
                self._jump = start.cursor()
            self._streams.append(stream)

    def forget(self, stream: QueueEventStream) -> None:
        """Stop dispatching to ``stream`` (its ``on_close``)."""
        if not isinstance(stream, DbEventStream):
            return
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)
            self._starts.pop(stream, None)

    def reading_state(self) -> tuple[bool, Cursor | None]:
        """Whether any stream is open (else the reader reads nothing), and a cursor the reader
        may jump to (taken: returned once)."""
        with self._lock:
            jump, self._jump = self._jump, None
            return any(not s.closed for s in self._streams), jump

    def open_count(self) -> int:
        with self._lock:
            return sum(1 for s in self._streams if not s.closed)

    def dispatch(self, rows: Sequence[Row]) -> None:
        """Hand each row to every open stream that wants it and opened before it."""
        with self._lock:
            streams = [s for s in self._streams if not s.closed]
            starts = self._starts
            for row in rows:
                first = True
                for s in streams:
                    start = starts.get(s)
                    if start is not None and start.before(row.tx, row.seq):
                        continue  # visible when the stream opened: not "after" it
                    if s.accepts(row):
                        s._put(row.event if first else row.event.clone())
                        first = False
                        self.delivered += 1

    def retire_starts(self, cursor: Cursor) -> None:
        """Forget start points the reader is past (no row beyond it can be "before" them)."""
        with self._lock:
            for s in [s for s, st in self._starts.items() if st.xmax and cursor[0] >= st.xmax]:
                del self._starts[s]

    def close_all(self) -> None:
        with self._lock:
            streams = list(self._streams)
        for s in streams:
            s.close()
