"""Audit queries on the events table: filtered, paged reads and purging.

Every :class:`~sqlalchemy_eventbroker.providers.base.EventFilter` field is a SQL condition on
an indexed column where one exists; ``type_pattern`` becomes ``LIKE 'prefix%'`` plus what the
dialect can match exactly (a regular expression on PostgreSQL, ``GLOB`` and a segment count on
SQLite), and rows are checked against the pattern in Python only where SQL cannot be exact.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import sqlalchemy as sa

from ...event import Event, EventStatus
from ...pattern import compile_pattern
from ..base import EventFilter
from ._codec import row_event, utc
from ._schema import EVENT_COLUMNS

if TYPE_CHECKING:
    from ._dialect import Dialect
    from ._engine import Database

__all__ = ["iter_events", "purge"]

_CREATED_AT = EVENT_COLUMNS.index("created_at")
_SEQ = len(EVENT_COLUMNS)  # seq is selected right after the event columns


def _conditions(dialect: Dialect, f: EventFilter) -> tuple[list[sa.ColumnElement[bool]],
                                                            Callable[[str], bool] | None]:
    t = dialect.t
    conds: list[sa.ColumnElement[bool]] = []
    if f.source is not None:
        conds.append(t.c.source == str(f.source))
    if f.status is not None:
        conds.append(t.c.status == str(f.status))
    if f.user_id is not None:
        conds.append(t.c.user_id == f.user_id)
    for name in ("schema", "entity", "operation", "instance_id"):
        value = getattr(f, name)
        if value:
            conds.append(t.c[name] == value)
    if f.start_time is not None:
        conds.append(t.c.created_at >= utc(f.start_time))
    if f.end_time is not None:
        conds.append(t.c.created_at < utc(f.end_time))
    refine: Callable[[str], bool] | None = None
    if f.type_pattern:
        clause, exact = dialect.type_clause(f.type_pattern)
        if clause is not None:
            conds.append(clause)
        if not exact:
            refine = compile_pattern(f.type_pattern)
    return conds, refine


def iter_events(db: Database, dialect: Dialect, f: EventFilter, page_size: int) -> Iterator[Event]:
    """Stored events passing ``f``, oldest first (``created_at``, then ``seq``), read in pages
    of ``page_size`` rows (keyset pagination), so memory stays flat for any number of rows."""
    t = dialect.t
    conds, refine = _conditions(dialect, f)
    remaining = f.limit or None
    skip = f.offset
    key: tuple[dt.datetime, int] | None = None
    while True:
        stmt = sa.select(*dialect.event_cols, t.c.seq).where(*conds)
        if key is not None:
            stmt = stmt.where(
                sa.tuple_(t.c.created_at, t.c.seq)
                > sa.tuple_(sa.literal(key[0], t.c.created_at.type), sa.literal(key[1], sa.BigInteger()))
            )
        n = page_size
        if refine is None:
            if skip:
                stmt = stmt.offset(skip)
                skip = 0
            if remaining is not None:
                n = min(n, remaining)
        stmt = stmt.order_by(t.c.created_at, t.c.seq).limit(n)
        with db.connect() as conn:
            rows = conn.execute(stmt).all()
        for row in rows:
            if refine is not None and not refine(row[2]):
                continue
            if skip:
                skip -= 1
                continue
            yield row_event(row)
            if remaining is not None:
                remaining -= 1
                if remaining == 0:
                    return
        if len(rows) < n:
            return
        key = (rows[-1][_CREATED_AT], rows[-1][_SEQ])


def purge(db: Database, dialect: Dialect, cutoff: dt.datetime,
          statuses: Sequence[EventStatus | str] | None, batch_size: int) -> int:
    """Delete events whose ``completed_at`` (else ``created_at``) is before ``cutoff``, in
    batches of ``batch_size`` rows, each its own transaction; returns how many."""
    t = dialect.t
    conds: list[sa.ColumnElement[bool]] = [
        sa.func.coalesce(t.c.completed_at, t.c.created_at) < sa.literal(cutoff, t.c.created_at.type)
    ]
    if statuses is not None:
        conds.append(t.c.status.in_([str(EventStatus(s)) for s in statuses]))
    total = 0
    while True:
        batch = sa.select(t.c.seq).where(*conds).limit(batch_size).scalar_subquery()
        with db.begin() as conn:
            n = conn.execute(t.delete().where(t.c.seq.in_(batch))).rowcount
        total += n
        if n < batch_size:
            return total
