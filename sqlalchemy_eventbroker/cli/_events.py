"""``events list|show|tail|replay|purge``: the stored events, on any backend.

Everything goes through the Provider protocol, so these work on a database, Redis and NATS
alike; ``tail`` is the provider's own fan-out stream (LISTEN/NOTIFY on PostgreSQL, polling on
other databases, the backend's push elsewhere), and ``purge`` deletes in batches on a database
(``providers.ops``).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import signal
import sys
from typing import Any

from ..event import EventStatus
from ..providers.base import EventFilter, bus_provider
from ..providers.ops import purge_older
from ._common import (
    Failed,
    Progress,
    Usage,
    add_json,
    add_target,
    emit,
    event_line,
    import_handler,
    non_negative_int,
    open_provider,
    parse_time,
    print_events,
)
from ._setup import usage

__all__ = ["register"]

_STATUSES = tuple(str(s) for s in EventStatus)


def register(commands: Any) -> None:
    events = commands.add_parser("events", help="look at, follow, replay and purge stored events")
    actions = events.add_subparsers(title="actions", metavar="ACTION")

    lst = actions.add_parser("list", help="stored events, oldest first")
    add_target(lst)
    _add_filter(lst)
    lst.add_argument("--status", choices=_STATUSES)
    lst.add_argument("--limit", type=non_negative_int, default=100,
                     help="the first N events of that order (default: 100; 0: all)")
    add_json(lst)
    lst.set_defaults(handler=_list)

    show = actions.add_parser("show", help="one stored event, every field (unknown id: exit 1)")
    add_target(show)
    show.add_argument("event_id", metavar="ID")
    add_json(show)
    show.set_defaults(handler=_show)

    tail = actions.add_parser(
        "tail", help="print new events as they are committed, until Ctrl-C (LISTEN on "
                     "PostgreSQL, polling on other databases)")
    add_target(tail)
    tail.add_argument("--type", dest="type_pattern", default="*", metavar="PATTERN",
                      help="only types matching PATTERN (default: *)")
    add_json(tail)
    tail.set_defaults(handler=_tail)

    replay = actions.add_parser(
        "replay", help="feed stored events, oldest first, to a handler (not stored again)")
    add_target(replay)
    replay.add_argument("--handler", dest="handler_spec", required=True, metavar="MODULE:FUNCTION",
                        help="a callable taking an Event (async def too); imported from the "
                             "current directory or the installed packages")
    _add_filter(replay)
    add_json(replay)
    replay.set_defaults(handler=_replay)

    purge = actions.add_parser(
        "purge", help="delete events created before a time (completed ones by default)")
    add_target(purge)
    purge.add_argument("--older-than", required=True, type=parse_time, metavar="T",
                       help="created before T: ISO-8601, or a duration back from now (30d, 24h)")
    purge.add_argument("--status", default="completed", type=_statuses, metavar="S[,S...]",
                       help="statuses to purge (default: completed; pending is never purged "
                            "unless named)")
    purge.add_argument("--dry-run", action="store_true", help="only count what would go")
    add_json(purge)
    purge.set_defaults(handler=_purge)
    events.set_defaults(handler=usage(events))


def _add_filter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", dest="type_pattern", default="", metavar="PATTERN",
                        help="only types matching PATTERN, e.g. 'public.users.*'")
    parser.add_argument("--since", type=parse_time, metavar="T",
                        help="created at or after T (ISO-8601, or 15m, 24h, 30d back from now)")
    parser.add_argument("--until", type=parse_time, metavar="T", help="created before T")


def _statuses(text: str) -> list[EventStatus]:
    try:
        return [EventStatus(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected statuses from {', '.join(_STATUSES)}, got {text!r}") from None


def _filter(args: argparse.Namespace, **extra: Any) -> EventFilter:
    pattern = args.type_pattern if args.type_pattern != "*" else ""
    return EventFilter(type_pattern=pattern, start_time=args.since, end_time=args.until, **extra)


def _list(args: argparse.Namespace) -> int:
    flt = _filter(args, status=EventStatus(args.status) if args.status else None, limit=args.limit)
    with open_provider(args) as provider:
        print_events(bus_provider(provider).iter_events(flt), as_json=args.json, limit=args.limit)
    return 0


def _show(args: argparse.Namespace) -> int:
    with open_provider(args) as provider:
        event = provider.get(args.event_id)
    if event is None:
        raise Failed(f"no stored event with id {args.event_id!r}")
    if args.json:
        sys.stdout.write(event.to_json() + "\n")
        return 0
    for name, value in event.to_dict().items():
        print(f"{name:<13} {_shown(value)}")
    return 0


def _shown(value: object) -> str:
    """A field on one line: plain text as it is, anything else (or text with line breaks
    or other control characters) as JSON."""
    import json

    if isinstance(value, str) and value.isprintable():
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def _tail(args: argparse.Namespace) -> int:
    """Follow the provider's fan-out stream; Ctrl-C (SIGINT) or SIGTERM ends it with status 0."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with open_provider(args) as provider:
            stream = provider.stream(args.type_pattern)
            print(f"following {args.type_pattern!r}; Ctrl-C to stop", file=sys.stderr, flush=True)
            try:
                while True:
                    try:
                        event = stream.receive(timeout=0.5)
                    except StopIteration:
                        raise Failed("the stream ended (the backend went away)") from None
                    if event is None:
                        continue
                    line = event.to_json() if args.json else event_line(event)
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
            finally:
                stream.close()
    except KeyboardInterrupt:
        return 0


def _replay(args: argparse.Namespace) -> int:
    handler = import_handler(args.handler_spec)
    flt = _filter(args)
    bar = Progress("replay")
    count = 0
    with open_provider(args) as provider, asyncio.Runner() as runner:
        bar.start(None)
        try:
            for event in bus_provider(provider).iter_events(flt):
                try:
                    result = handler(event)
                    if inspect.isawaitable(result):
                        runner.run(_awaited(result))
                except Exception as exc:
                    raise Failed(f"{args.handler_spec} failed on event {event.id} ({event.type}) after "
                                 f"{count} replayed: {type(exc).__name__}: {exc}") from exc
                count += 1
                bar.update(1)
        finally:
            bar.close()
    if args.json:
        emit({"replayed": count})
    else:
        print(f"replayed {count} event{'s' if count != 1 else ''}")
    return 0


async def _awaited(result: Any) -> Any:
    return await result


def _purge(args: argparse.Namespace) -> int:
    statuses: list[EventStatus] = args.status
    if not statuses:
        raise Usage("--status: name at least one status")
    bar = Progress("purge")
    with open_provider(args) as provider:
        try:
            n = purge_older(provider, args.older_than, statuses, dry_run=args.dry_run,
                            on_start=bar.start, on_progress=bar.update)
        finally:
            bar.close()
    names = ",".join(str(s) for s in statuses)
    if args.json:
        emit({"purged": 0 if args.dry_run else n, "matched": n, "dry_run": args.dry_run,
              "statuses": names, "older_than": args.older_than.isoformat()})
    elif args.dry_run:
        print(f"would purge {n} event{'s' if n != 1 else ''} ({names}, created before "
              f"{args.older_than.isoformat(timespec='seconds')}); dry run, nothing deleted")
    else:
        print(f"purged {n} event{'s' if n != 1 else ''} ({names}, created before "
              f"{args.older_than.isoformat(timespec='seconds')})")
    return 0
