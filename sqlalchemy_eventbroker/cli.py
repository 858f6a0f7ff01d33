"""The ``eventbroker`` command.

::

    eventbroker migrate upgrade --url URL [--revision head] [--table-name events]
    eventbroker migrate downgrade --url URL [--revision base] [--table-name events]
    eventbroker config check FILE [--format yaml|json]
    eventbroker events list --url URL [--type PATTERN] [--status S] [--limit N] [--json]

``--url`` defaults to the ``EVENTBROKER_DATABASE_URL`` environment variable. Exit status:
0 success, 1 the operation failed (database unreachable, migration error), 2 bad usage or
bad configuration.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .config import load_config
from .errors import BrokerError, ConfigError, PatternError
from .providers._urls import redact_text, redact_url

__all__ = ["main"]

URL_ENV = "EVENTBROKER_DATABASE_URL"

MigrationFn = Callable[..., None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` by default); return the exit status.

    Never raises for bad input or a failed operation: the message goes to stderr and the
    status says what happened (see the module docstring).
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    url: str | None = getattr(args, "url", None)
    try:
        return handler(args)
    except (ConfigError, PatternError) as exc:  # bad input rather than a failed operation
        _err(_scrub(f"error: {exc}", url))
        return 2
    except (BrokerError, OSError, ImportError) as exc:
        _err(_scrub(f"error: {exc}", url))
        return 1
    except Exception as exc:  # noqa: BLE001 - a driver or Alembic error: say it, no traceback
        _err(_scrub(f"error: {type(exc).__name__}: {exc}", url))
        return 1


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventbroker",
        description="sqlalchemy-eventbroker: database migrations, configuration, stored events.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="create or drop the events table (Alembic)")
    migrate_cmds = migrate.add_subparsers(title="actions", metavar="ACTION")
    for action, default_rev, text in (
        ("upgrade", "head", "apply migrations up to REVISION (default: head)"),
        ("downgrade", "base", "revert migrations down to REVISION (default: base, drops tables)"),
    ):
        p = migrate_cmds.add_parser(action, help=text)
        _add_url(p)
        p.add_argument("--revision", default=default_rev, help=f"target (default: {default_rev})")
        p.add_argument("--table-name", default="events", help="events table (default: events)")
        p.set_defaults(handler=_migrate, action=action)
    migrate.set_defaults(handler=_usage(migrate))

    config = commands.add_parser("config", help="check a configuration file")
    config_cmds = config.add_subparsers(title="actions", metavar="ACTION")
    check = config_cmds.add_parser(
        "check", help="load FILE and print the effective configuration (passwords hidden)"
    )
    check.add_argument("file", metavar="FILE", help="YAML configuration file")
    check.add_argument("--format", choices=("yaml", "json"), default="yaml")
    check.set_defaults(handler=_config_check)
    config.set_defaults(handler=_usage(config))

    events = commands.add_parser("events", help="look at stored events (database provider)")
    events_cmds = events.add_subparsers(title="actions", metavar="ACTION")
    lst = events_cmds.add_parser("list", help="list stored events, oldest first")
    _add_url(lst)
    lst.add_argument("--table-name", default="events", help="events table (default: events)")
    lst.add_argument("--type", dest="type_pattern", default="", metavar="PATTERN",
                     help="only types matching PATTERN, e.g. 'public.users.*'")
    lst.add_argument("--status", choices=("pending", "processing", "completed", "failed"))
    lst.add_argument("--limit", type=_non_negative_int, default=100,
                     help="at most N events (default: 100; 0: all)")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    lst.set_defaults(handler=_events_list)
    events.set_defaults(handler=_usage(events))
    return parser


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=os.environ.get(URL_ENV),
        help=f"SQLAlchemy database URL (default: ${URL_ENV})",
    )


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


def _require_url(args: argparse.Namespace) -> str:
    if not args.url:
        raise ConfigError(f"--url: expected a database URL (or set {URL_ENV})", path="url")
    return str(args.url)


# -- migrate -----------------------------------------------------------------------------------


def _migration_functions() -> tuple[MigrationFn, MigrationFn]:
    """``upgrade`` and ``downgrade`` of the database provider (they know the schema)."""
    module = importlib.import_module(".providers.database", __package__)
    return module.upgrade, module.downgrade


def _migrate(args: argparse.Namespace) -> int:
    url = _require_url(args)
    upgrade, downgrade = _migration_functions()
    fn = upgrade if args.action == "upgrade" else downgrade
    fn(url, args.revision, table_name=args.table_name)
    print(f"{args.action} to {args.revision}: done ({_redact(url)}, table {args.table_name})")
    return 0


def _redact(url: str) -> str:
    return redact_url(url)


def _scrub(message: str, url: str | None) -> str:
    return redact_text(message, url)


# -- config ------------------------------------------------------------------------------------


def _config_check(args: argparse.Namespace) -> int:
    path = args.file
    if not os.path.isfile(path):
        raise ConfigError(f"event_broker: config file {path!r} does not exist", path="event_broker")
    config = load_config(pathlib.Path(path))  # a Path is always read as a file
    data = {"event_broker": config.to_dict(redact=True)}
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        import yaml  # type: ignore[import-untyped,unused-ignore]

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    return 0


# -- events ------------------------------------------------------------------------------------


def _events_list(args: argparse.Namespace) -> int:
    from .event import EventStatus
    from .providers.base import EventFilter
    from .providers.database import DatabaseProvider  # type: ignore[import-not-found,import-untyped,unused-ignore]

    url = _require_url(args)
    flt = EventFilter(
        type_pattern=args.type_pattern,
        status=EventStatus(args.status) if args.status else None,
        limit=args.limit,
    )
    provider: Any = DatabaseProvider(url, table_name=args.table_name)
    try:
        events = provider.list(flt)
    finally:
        provider.close()
    _print_events(events, as_json=args.json, out=sys.stdout)
    return 0


def _print_events(events: Sequence[Any], *, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.writelines(e.to_json() + "\n" for e in events)
        return
    for e in events:
        line = (f"{e.created_at.isoformat(timespec='milliseconds')}  {e.id}  "
                f"{e.status.value:<10} {e.type}")
        if e.retry_count:
            line += f"  retries={e.retry_count}"
        if e.error:
            line += f"  error={e.error!r}"
        out.write(line + "\n")
    out.write(f"({len(events)} event{'s' if len(events) != 1 else ''})\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
