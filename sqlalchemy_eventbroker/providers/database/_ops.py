"""Operational queries on the events tables: counts, group lag, purging by age.

The one place where ``eventbroker stats``, ``eventbroker groups list``, ``eventbroker events
purge`` and the broker's scrape-time metrics collector read the tables (through
:mod:`sqlalchemy_eventbroker.providers.ops`). Each figure is one aggregate statement over
indexed columns where one exists (``status``, ``type``, ``created_at``); per group, the claims
are aggregated once, and the events past the group's cursor are counted by type (a group's
pattern is matched in Python against the distinct types, so it is exact on every database).

Members of a group are named by the first 16 hex digits of their claims' tokens (see
``_groups.GroupStore.claim``): a member is *seen* while it holds a lease or left one that
expired unacknowledged. An acknowledged claim is deleted, so a caught-up group shows none.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ...event import EventStatus
from ...pattern import compile_pattern
from ._codec import utc
from ._engine import ErrorTranslator
from ._reader import Start

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ._provider import DatabaseProvider

__all__ = ["GroupRow", "StoreRow", "count_older", "delete_older", "group_rows", "store_row"]

#: Length of the member part of a claim token.
MEMBER_CHARS = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreRow:
    """Raw figures of one events table (ages as timestamps; see ``providers.ops``)."""

    by_status: dict[str, int]
    by_type: list[tuple[str, int]]  # most frequent first, at most ``top`` entries
    other_types: int  # events of the types beyond ``top``
    oldest_pending: dt.datetime | None
    notify_queue_usage: float | None  # PostgreSQL only


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupRow:
    """Raw figures of one consumer group ``(group, pattern)``."""

    group: str
    pattern: str
    pending: int  # free claims plus matching events past the cursor
    in_flight: int  # claims leased now
    oldest_unclaimed: dt.datetime | None
    members: int


def _errors(provider: DatabaseProvider) -> ErrorTranslator:
    return ErrorTranslator(provider.address, provider.table_name)


def store_row(provider: DatabaseProvider, top: int) -> StoreRow:
    """Counts by status, the ``top`` types by count (the rest summed), the oldest pending
    event's ``created_at`` and, on PostgreSQL, ``pg_notification_queue_usage()``."""
    t = provider.tables.events
    with _errors(provider)(), provider.engine.connect() as conn:
        by_status = {str(s): int(n) for s, n in
                     conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status))}
        n = sa.func.count().label("n")
        types = [(str(k), int(v)) for k, v in conn.execute(
            sa.select(t.c.type, n).group_by(t.c.type).order_by(n.desc(), t.c.type))]
        oldest = conn.execute(
            sa.select(sa.func.min(t.c.created_at)).where(t.c.status == str(EventStatus.PENDING))
        ).scalar()
        usage = None
        if provider.dialect == "postgresql":
            usage = float(conn.execute(sa.select(sa.func.pg_notification_queue_usage())).scalar_one())
    return StoreRow(by_status=by_status, by_type=types[:top],
                    other_types=sum(v for _, v in types[top:]), oldest_pending=utc(oldest),
                    notify_queue_usage=usage)


def _now(conn: Connection, provider: DatabaseProvider) -> float:
    """The clock leases are written against: the server's on PostgreSQL, ours elsewhere."""
    if provider.dialect == "postgresql":
        return float(conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one())
    return time.time()


def group_rows(provider: DatabaseProvider) -> list[GroupRow]:
    """One :class:`GroupRow` per consumer group, ordered by group name and pattern."""
    tables = provider.tables
    g, c, t = tables.groups, tables.claims, tables.events
    is_pg = provider.dialect == "postgresql"
    with _errors(provider)(), provider.engine.connect() as conn:
        now = _now(conn, provider)
        groups = conn.execute(
            sa.select(g.c.id, g.c.group_name, g.c.pattern, g.c.cursor_tx, g.c.cursor_seq,
                      g.c.start_snapshot)
            .order_by(g.c.group_name, g.c.pattern)
        ).all()
        free = c.c.lease_until <= now
        claims: dict[int, Any] = {
            row[0]: row for row in conn.execute(
                sa.select(
                    c.c.group_id,
                    sa.func.sum(sa.case((free, 1), else_=0)),
                    sa.func.sum(sa.case((free, 0), else_=1)),
                    sa.func.min(sa.case((free, t.c.created_at), else_=None)),
                    sa.func.count(sa.distinct(sa.case(
                        (c.c.token != "", sa.func.substr(c.c.token, 1, MEMBER_CHARS)), else_=None))),
                )
                .select_from(c.outerjoin(t, t.c.seq == c.c.seq))
                .group_by(c.c.group_id)
            )
        }
        out = []
        for gid, name, pattern, cursor_tx, cursor_seq, snapshot in groups:
            past = [sa.tuple_(t.c.tx_id, t.c.seq) > sa.tuple_(sa.literal(cursor_tx), sa.literal(cursor_seq))
                    if is_pg else t.c.seq > cursor_seq]
            if is_pg and snapshot:
                # Rows visible when the group was created are "before" it and never claimed
                # (``_reader.Start.before``): past the cursor (tx >= xmin) that leaves the
                # transactions at or after xmax and those then in progress.
                start = Start.parse(snapshot)
                past.append(sa.or_(t.c.tx_id >= start.xmax, t.c.tx_id.in_(sorted(start.xip))))
            wants = compile_pattern(pattern)
            unfilled = 0
            oldest = None
            for etype, n, first in conn.execute(
                sa.select(t.c.type, sa.func.count(), sa.func.min(t.c.created_at)).where(*past)
                .group_by(t.c.type)
            ):
                if wants(etype):
                    unfilled += int(n)
                    oldest = _earliest(oldest, utc(first))
            row = claims.get(gid)
            free_n, held_n, first_free, members = (
                (int(row[1] or 0), int(row[2] or 0), utc(row[3]), int(row[4] or 0))
                if row is not None else (0, 0, None, 0)
            )
            out.append(GroupRow(group=str(name), pattern=str(pattern), pending=free_n + unfilled,
                                in_flight=held_n, oldest_unclaimed=_earliest(first_free, oldest),
                                members=members))
    return out


def _earliest(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _older(provider: DatabaseProvider, cutoff: dt.datetime,
           statuses: Sequence[EventStatus]) -> list[sa.ColumnElement[bool]]:
    t = provider.tables.events
    return [t.c.created_at < sa.literal(cutoff, t.c.created_at.type),
            t.c.status.in_([str(s) for s in statuses])]


def count_older(provider: DatabaseProvider, cutoff: dt.datetime,
                statuses: Sequence[EventStatus]) -> int:
    """How many events with one of ``statuses`` were created before ``cutoff``."""
    t = provider.tables.events
    with _errors(provider)(), provider.engine.connect() as conn:
        return int(conn.execute(
            sa.select(sa.func.count()).select_from(t).where(*_older(provider, cutoff, statuses))
        ).scalar_one())


def delete_older(provider: DatabaseProvider, cutoff: dt.datetime,
                 statuses: Sequence[EventStatus], batch_size: int) -> int:
    """Delete up to ``batch_size`` of the events :func:`count_older` counts, in one short
    transaction (a large purge never holds long locks); returns how many were deleted."""
    t = provider.tables.events
    batch = (sa.select(t.c.seq).where(*_older(provider, cutoff, statuses)).limit(batch_size)
             .scalar_subquery())
    with _errors(provider)(), provider.engine.begin() as conn:
        return int(conn.execute(t.delete().where(t.c.seq.in_(batch))).rowcount)
