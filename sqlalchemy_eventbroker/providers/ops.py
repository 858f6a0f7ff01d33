"""What an operator asks of a provider's store: counts, lag, purging. Shared, never copied.

``eventbroker stats``, ``eventbroker groups list``, ``eventbroker events purge`` and the
scrape-time Prometheus collector (``metrics.StoreCollector``) all read their figures here, so
the command line and the gauges always agree.

On a :class:`~sqlalchemy_eventbroker.providers.database.DatabaseProvider` every figure is an
aggregate statement (``database/_ops.py``). Any other provider (Redis, NATS, a third party's)
is served through the Provider protocol alone: counts by status from ``stats()``, counts by
type and the oldest pending event by reading the stored events once (only when ``scan`` is
true: the command line asks for it, the collector does not), and no consumer groups (their
state lives in the backend, e.g. ``XINFO GROUPS`` on Redis).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..event import EventStatus
from .base import EventFilter, Provider, bus_provider

__all__ = ["GroupStats", "StoreStats", "group_stats", "purge_older", "store_stats"]

#: Most event types reported by name; the rest are summed under :data:`OTHER_TYPES`.
TOP_TYPES = 20
#: The ``by_type`` key of the types beyond the top ones.
OTHER_TYPES = "other"


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupStats:
    """One consumer group ``(group, pattern)`` as ``groups list`` and ``stats`` show it."""

    group: str
    pattern: str
    #: Events the group still owes and nobody holds: free claims plus matching events its
    #: cursor has not reached yet.
    pending: int
    #: Events leased to a member right now.
    in_flight: int
    #: Seconds since the oldest of the pending events was created (``None``: none pending).
    oldest_unclaimed_age_s: float | None
    #: Members holding a lease or whose lease expired unacknowledged.
    members: int

    def to_dict(self) -> dict[str, object]:
        return {"group": self.group, "pattern": self.pattern, "pending": self.pending,
                "in_flight": self.in_flight, "oldest_unclaimed_age_s": self.oldest_unclaimed_age_s,
                "members": self.members}


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStats:
    """What a store holds, for ``eventbroker stats`` and the store gauges."""

    provider_type: str
    total: int
    by_status: dict[str, int]
    #: The most frequent types (at most ``top_types``), then ``"other"`` if any were left out.
    by_type: dict[str, int]
    #: Seconds since the oldest pending event was created (``None``: none pending or unknown).
    oldest_pending_age_s: float | None
    groups: list[GroupStats] = field(default_factory=list)
    #: PostgreSQL's ``pg_notification_queue_usage()`` (0..1), ``None`` elsewhere.
    notify_queue_usage: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {"provider_type": self.provider_type, "total": self.total,
                "by_status": dict(self.by_status), "by_type": dict(self.by_type),
                "oldest_pending_age_s": self.oldest_pending_age_s,
                "groups": [g.to_dict() for g in self.groups],
                "notify_queue_usage": self.notify_queue_usage}


def _age(since: dt.datetime | None, now: dt.datetime) -> float | None:
    return None if since is None else round(max(0.0, (now - since).total_seconds()), 3)


def store_stats(provider: Provider, *, top_types: int = TOP_TYPES, scan: bool = True) -> StoreStats:
    """The figures of ``provider``'s store (see the module docstring for what each backend gives).

    Raises:
        ProviderError: the backend failed.
    """
    from .database import DatabaseProvider, _ops

    now = dt.datetime.now(dt.UTC)
    if isinstance(provider, DatabaseProvider):
        row = _ops.store_row(provider, top_types)
        by_type = dict(row.by_type)
        if row.other_types:
            by_type[OTHER_TYPES] = by_type.get(OTHER_TYPES, 0) + row.other_types
        return StoreStats(
            provider_type="database", total=sum(row.by_status.values()),
            by_status=_all_statuses(row.by_status), by_type=by_type,
            oldest_pending_age_s=_age(row.oldest_pending, now),
            groups=group_stats(provider) or [], notify_queue_usage=row.notify_queue_usage,
        )
    ps = provider.stats()
    by_status = _all_statuses({"pending": ps.pending_events, "processing": ps.processing_events,
                               "completed": ps.completed_events, "failed": ps.failed_events})
    types: Counter[str] = Counter()
    oldest: dt.datetime | None = None
    if scan:
        for e in bus_provider(provider).iter_events(EventFilter()):
            types[e.type] += 1
            if e.status is EventStatus.PENDING and (oldest is None or e.created_at < oldest):
                oldest = e.created_at
    by_type = dict(types.most_common(top_types))
    rest = sum(types.values()) - sum(by_type.values())
    if rest:
        by_type[OTHER_TYPES] = by_type.get(OTHER_TYPES, 0) + rest
    return StoreStats(provider_type=ps.provider_type, total=ps.total_events, by_status=by_status,
                      by_type=by_type, oldest_pending_age_s=_age(oldest, now))


def _all_statuses(counts: dict[str, int]) -> dict[str, int]:
    """Every status, zero when absent, in the lifecycle's order."""
    return {str(s): int(counts.get(str(s), 0)) for s in EventStatus}


def group_stats(provider: Provider) -> list[GroupStats] | None:
    """The consumer groups of ``provider``, or ``None`` when the backend keeps them itself
    (only the database provider's groups are readable here)."""
    from .database import DatabaseProvider, _ops

    if not isinstance(provider, DatabaseProvider):
        return None
    now = dt.datetime.now(dt.UTC)
    return [GroupStats(group=r.group, pattern=r.pattern, pending=r.pending, in_flight=r.in_flight,
                       oldest_unclaimed_age_s=_age(r.oldest_unclaimed, now), members=r.members)
            for r in _ops.group_rows(provider)]


def purge_older(provider: Provider, cutoff: dt.datetime, statuses: Sequence[EventStatus], *,
                dry_run: bool = False, batch_size: int = 1000,
                on_start: Callable[[int | None], None] | None = None,
                on_progress: Callable[[int], None] | None = None) -> int:
    """Delete the events with one of ``statuses`` created before ``cutoff``; how many.

    ``dry_run`` only counts. ``on_start(total)`` is called once with how many will go (``None``
    when that is unknown up front), ``on_progress(n)`` after every ``n`` deleted. The database
    deletes in batches of ``batch_size``, each its own short transaction; other providers
    delete event by event through the Provider protocol.
    """
    from .database import DatabaseProvider, _ops

    if isinstance(provider, DatabaseProvider):
        total = _ops.count_older(provider, cutoff, statuses)
        if dry_run:
            return total
        if on_start is not None:
            on_start(total)
        done = 0
        while True:
            n = _ops.delete_older(provider, cutoff, statuses, batch_size)
            done += n
            if on_progress is not None and n:
                on_progress(n)
            if n < batch_size:
                return done
    ids = [e.id for s in statuses
           for e in bus_provider(provider).iter_events(EventFilter(status=s, end_time=cutoff))]
    if dry_run:
        return len(ids)
    if on_start is not None:
        on_start(len(ids))
    for event_id in ids:
        provider.delete(event_id)
        if on_progress is not None:
            on_progress(1)
    return len(ids)
