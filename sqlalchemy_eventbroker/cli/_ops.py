"""``dlq list|redrive``, ``groups list`` and ``stats``: what failed, and who is behind.

The figures come from ``providers.ops``, the same code the broker's scrape-time Prometheus
collector runs, so the command line and the gauges agree. ``groups list`` needs a database
(other backends keep their consumer groups to themselves).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..event import Event, EventStatus
from ..providers.base import EventFilter, Provider, bus_provider
from ..providers.ops import GroupStats, group_stats, store_stats
from ._common import (
    Failed,
    Progress,
    Usage,
    add_json,
    add_target,
    emit,
    non_negative_int,
    open_provider,
    print_events,
    require_database,
    target,
)
from ._setup import usage

__all__ = ["register"]


def register(commands: Any) -> None:
    dlq = commands.add_parser("dlq", help="failed events (the dead-letter list): list, redrive")
    actions = dlq.add_subparsers(title="actions", metavar="ACTION")
    lst = actions.add_parser("list", help="stored events that ended failed, oldest first")
    add_target(lst)
    lst.add_argument("--type", dest="type_pattern", default="", metavar="PATTERN")
    lst.add_argument("--limit", type=non_negative_int, default=100,
                     help="at most N (default: 100; 0: all)")
    add_json(lst)
    lst.set_defaults(handler=_dlq_list)
    redrive = actions.add_parser(
        "redrive", help="publish failed events again (same id, pending, no error, no retries)")
    add_target(redrive)
    redrive.add_argument("ids", nargs="*", metavar="ID")
    redrive.add_argument("--all", action="store_true", help="every failed event")
    add_json(redrive)
    redrive.set_defaults(handler=_dlq_redrive)
    dlq.set_defaults(handler=usage(dlq))

    groups = commands.add_parser("groups", help="consumer groups (needs a database)")
    group_actions = groups.add_subparsers(title="actions", metavar="ACTION")
    glist = group_actions.add_parser(
        "list", help="per group: pattern, pending, in-flight leases, oldest unclaimed, members")
    add_target(glist)
    add_json(glist)
    glist.set_defaults(handler=_groups_list)
    groups.set_defaults(handler=usage(groups))

    stats = commands.add_parser(
        "stats", help="counts by status and type, oldest pending age, per-group lag, and on "
                      "PostgreSQL the NOTIFY queue usage")
    add_target(stats)
    stats.add_argument("--top", type=non_negative_int, default=20,
                       help="types shown by name, the rest summed as 'other' (default: 20)")
    add_json(stats)
    stats.set_defaults(handler=_stats)


# -- dlq ---------------------------------------------------------------------------------------


def _dlq_list(args: argparse.Namespace) -> int:
    flt = EventFilter(status=EventStatus.FAILED, type_pattern=args.type_pattern, limit=args.limit)
    with open_provider(args) as provider:
        print_events(bus_provider(provider).iter_events(flt), as_json=args.json, limit=args.limit)
    return 0


def _redrive_one(provider: Provider, event_id: str) -> Event:
    """As ``Broker.redrive`` does for a stored dead letter: same id, pending, no error, no
    retries; publishing replaces the stored copy, so every broker sees it as new."""
    event = provider.get(event_id)
    if event is None:
        raise Failed(f"no stored event with id {event_id!r}")
    if event.status is not EventStatus.FAILED:
        raise Failed(f"event {event_id} is {event.status.value}, not failed")
    event.status = EventStatus.PENDING
    event.error = ""
    event.retry_count = 0
    event.processed_at = event.completed_at = None
    provider.publish(event)
    return event


def _dlq_redrive(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all):
        raise Usage("dlq redrive: give event IDs or --all (not both)")
    bar = Progress("redrive")
    done, errors = 0, []
    with open_provider(args) as provider:
        ids = list(args.ids) or [
            e.id for e in provider.list(EventFilter(status=EventStatus.FAILED))]
        bar.start(len(ids))
        try:
            for event_id in ids:
                try:
                    event = _redrive_one(provider, event_id)
                except Failed as exc:
                    errors.append(str(exc))
                    continue
                done += 1
                bar.update(1)
                if args.json:
                    emit({"redriven": event.id, "type": event.type})
        finally:
            bar.close()
    if not args.json:
        print(f"redrove {done} event{'s' if done != 1 else ''}")
    if errors:
        raise Failed("; ".join(errors))
    return 0


# -- groups and stats --------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _print_groups(groups: list[GroupStats], indent: str = "") -> None:
    rows = [("GROUP", "PATTERN", "PENDING", "IN-FLIGHT", "OLDEST", "MEMBERS")] + [
        (g.group, g.pattern, str(g.pending), str(g.in_flight), _age(g.oldest_unclaimed_age_s),
         str(g.members)) for g in groups]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())


def _groups_list(args: argparse.Namespace) -> int:
    require_database(target(args), "groups list")
    with open_provider(args) as provider:
        groups = group_stats(provider) or []
    if args.json:
        for g in groups:
            emit(g.to_dict())
    elif groups:
        _print_groups(groups)
    else:
        print("(no consumer groups)")
    return 0


def _stats(args: argparse.Namespace) -> int:
    with open_provider(args) as provider:
        s = store_stats(provider, top_types=args.top)
    if args.json:
        emit(s.to_dict())
        return 0
    out = sys.stdout
    out.write(f"provider        {s.provider_type}\n")
    out.write(f"events          {s.total}\n")
    out.write("by status       " + ", ".join(f"{k} {v}" for k, v in s.by_status.items()) + "\n")
    out.write(f"oldest pending  {_age(s.oldest_pending_age_s)}\n")
    if s.notify_queue_usage is not None:
        out.write(f"notify queue    {s.notify_queue_usage:.6f} used\n")
    if s.by_type:
        out.write("by type\n")
        width = max(len(k) for k in s.by_type)
        for k, v in s.by_type.items():
            out.write(f"  {k.ljust(width)}  {v}\n")
    if s.provider_type == "database":
        if s.groups:
            out.write("groups\n")
            out.flush()
            _print_groups(s.groups, indent="  ")
        else:
            out.write("groups          none\n")
    return 0
