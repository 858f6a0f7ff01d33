"""The ``eventbroker`` command (also ``python -m sqlalchemy_eventbroker``); API.md section 10.

::

    eventbroker migrate upgrade|downgrade|current
    eventbroker config check FILE
    eventbroker events list|show|tail|replay|purge
    eventbroker dlq list | dlq redrive ID... | dlq redrive --all
    eventbroker groups list
    eventbroker stats

Every command takes ``--url URL`` (default ``$EVENTBROKER_DATABASE_URL``) or ``--config FILE``.
``migrate`` and ``groups list`` need a database; ``events``, ``dlq`` and ``stats`` also work on
``redis://`` and ``nats://`` through the Provider protocol.
Exit status: 0 done, 1 failed (one line on stderr saying why, never a traceback or a
password), 2 bad usage. One module per command group: ``_setup`` (migrate, config),
``_events``, ``_ops`` (dlq, groups, stats); ``_common`` holds what they share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from ..errors import BrokerError, ConfigError, PatternError
from ..providers._urls import redact_text, redact_url
from ._common import URL_ENV, Failed, Usage, kind_of
from ._events import register as _register_events
from ._ops import register as _register_ops
from ._setup import register as _register_setup

__all__ = ["URL_ENV", "main"]

_EPILOG = (
    "Backends: every command works on a database URL (SQLite, PostgreSQL, ...). events "
    "list/show/tail/replay/purge, dlq and stats also work on redis://... and nats://... URLs; "
    "migrate and groups list need a database. Exit status: 0 done, 1 failed, 2 bad usage."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` by default); return the exit status.

    Never raises for bad input or a failed operation: one line goes to stderr and the status
    says what happened (see the module docstring).
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
    try:
        return handler(args)
    except BrokenPipeError:  # `eventbroker events list | head`: the reader has all it wanted
        _silence_stdout()
        return 0
    except (Usage, ConfigError, PatternError) as exc:  # bad input rather than a failed operation
        _err(f"error: {exc}", args)
        return 2
    except (Failed, BrokerError, OSError, ImportError) as exc:
        _err(f"error: {exc}", args)
        return 1
    except KeyboardInterrupt:
        _err("interrupted", args)
        return 1
    except Exception as exc:  # noqa: BLE001 - a driver or Alembic error: say it, no traceback
        _err(f"error: {type(exc).__name__}: {exc}", args)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _err(message: str, args: argparse.Namespace) -> None:
    """One line on stderr: a driver message spanning several lines is folded, and the
    secrets of the URL in use (given, from the environment or from a configuration file)
    are masked."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    for url in {getattr(args, "url", None), getattr(args, "resolved_url", None),
                os.environ.get(URL_ENV)}:
        if url:
            line = _mask(line, url)
    print(line, file=sys.stderr, flush=True)


def _mask(line: str, url: str) -> str:
    """``line`` with ``url``'s secrets masked. A database URL's lone user name
    (``postgresql://postgres@host/db``) is no secret: masking it everywhere would garble the
    message (``***ql+psycopg://``), so only the URL itself is shown redacted then."""
    if kind_of(url) == "database":
        try:
            parts = urlsplit(url)
            has_secret = parts.password is not None or "password=" in parts.query.lower()
        except ValueError:
            has_secret = True
        if not has_secret:
            return line.replace(url, redact_url(url))
    return redact_text(line, url)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventbroker",
        description="sqlalchemy-eventbroker: migrations, configuration, and the stored events: "
                    "look, follow, replay, purge, redrive, and see lag.",
        epilog=_EPILOG,
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _register_setup(commands)
    _register_events(commands)
    _register_ops(commands)
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
