"""Apply sqlalchemy-eventbroker's Alembic migrations to a database given by URL.

::

    python -m sqlalchemy_eventbroker.migrate upgrade --url postgresql+psycopg://127.0.0.1/app
    python -m sqlalchemy_eventbroker.migrate downgrade --url sqlite:///app.db   # to base: drops
    python -m sqlalchemy_eventbroker.migrate upgrade --url ... --table-name audit_events

The migrations ship inside the package (``sqlalchemy_eventbroker/migrations`` in the wheel) and
record their version in ``eventbroker_alembic_version``, never in the application's
``alembic_version``. From Python: ``sqlalchemy_eventbroker.providers.database.upgrade(url)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``upgrade`` or ``downgrade``; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m sqlalchemy_eventbroker.migrate",
        description="Create, upgrade or drop the sqlalchemy-eventbroker events tables.",
    )
    parser.add_argument("command", choices=["upgrade", "downgrade"])
    parser.add_argument("revision", nargs="?", help="target revision (default: head / base)")
    parser.add_argument("--url", required=True, help="SQLAlchemy database URL")
    parser.add_argument("--table-name", default="events", help="events table (default: events)")
    args = parser.parse_args(argv)

    from .errors import ProviderError
    from .providers._urls import redact_text
    from .providers.database._schema import downgrade, upgrade

    try:
        if args.command == "upgrade":
            upgrade(args.url, args.revision or "head", table_name=args.table_name)
        else:
            downgrade(args.url, args.revision or "base", table_name=args.table_name)
    except ProviderError as exc:
        print(redact_text(f"error: {exc}", args.url), file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not trace back
        print(redact_text(f"error: {type(exc).__name__}: {exc}", args.url), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
