"""``migrate upgrade|downgrade|current`` and ``config check``: before anything runs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._common import add_json, add_target, emit, load, require_database, target

__all__ = ["register"]


def register(commands: Any) -> None:
    migrate = commands.add_parser(
        "migrate", help="create, drop or inspect the events tables (Alembic; needs a database)")
    actions = migrate.add_subparsers(title="actions", metavar="ACTION")
    for action, default_rev, text in (
        ("upgrade", "head", "apply migrations up to REVISION (default: head)"),
        ("downgrade", "base", "revert migrations down to REVISION (default: base, drops tables)"),
    ):
        p = actions.add_parser(action, help=text)
        add_target(p)
        p.add_argument("revision", nargs="?", default=None, metavar="REVISION",
                       help=f"target revision (default: {default_rev})")
        p.add_argument("--revision", dest="revision_opt", default=None, help=argparse.SUPPRESS)
        p.set_defaults(handler=_migrate, action=action, default_rev=default_rev)
    current = actions.add_parser("current", help="print the applied revision ('none' if none)")
    add_target(current)
    add_json(current)
    current.set_defaults(handler=_current)
    migrate.set_defaults(handler=usage(migrate))

    config = commands.add_parser("config", help="check a configuration file")
    config_actions = config.add_subparsers(title="actions", metavar="ACTION")
    check = config_actions.add_parser(
        "check", help="load FILE and print the effective configuration (passwords hidden)")
    check.add_argument("file", metavar="FILE", help="YAML configuration file")
    check.add_argument("--format", choices=("yaml", "json"), default="yaml")
    add_json(check)
    check.set_defaults(handler=_config_check)
    config.set_defaults(handler=usage(config))


def usage(parser: argparse.ArgumentParser) -> Any:
    """A handler for a command group given without its action: its help, status 2."""

    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


def _migrate(args: argparse.Namespace) -> int:
    from ..providers._urls import redact_url
    from ..providers.database import downgrade, upgrade
    from ..providers.database._engine import ErrorTranslator

    t = require_database(target(args), "migrate")
    revision = args.revision or args.revision_opt or args.default_rev
    # The provider's own translation: "wrong credentials", "database does not exist", ...
    with ErrorTranslator(redact_url(t.url), t.table_name)():
        (upgrade if args.action == "upgrade" else downgrade)(t.url, revision,
                                                              table_name=t.table_name)
    print(f"{args.action} to {revision}: done ({redact_url(t.url)}, table {t.table_name})")
    return 0


def _current(args: argparse.Namespace) -> int:
    import sqlalchemy as sa
    from alembic.runtime.migration import MigrationContext

    from ..providers.database import DatabaseProvider
    from ..providers.database._schema import version_table_name

    t = require_database(target(args), "migrate current")
    provider = DatabaseProvider(t.url, table_name=t.table_name)  # names the address if down
    try:
        with provider.engine.connect() as conn:
            vt = version_table_name(t.table_name)
            revision = None
            if sa.inspect(conn).has_table(vt):
                ctx = MigrationContext.configure(conn, opts={"version_table": vt})
                revision = ctx.get_current_revision()
    finally:
        provider.close()
    if args.json:
        emit({"revision": revision, "table": t.table_name})
    else:
        print(revision or "none")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    config = load(args.file)
    data = {"event_broker": config.to_dict(redact=True)}
    if args.json:
        emit(data)
    elif args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        import yaml  # type: ignore[import-untyped,unused-ignore]

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    return 0
