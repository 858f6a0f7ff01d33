"""What every command shares: where the events are (``--url``/``--config``), times, output.

Two exceptions carry a command's outcome to ``main``: :class:`Usage` (exit 2: the command
cannot mean anything as given) and :class:`Failed` (exit 1: it was understood and did not
work). Library errors are mapped in ``main`` as well; these two are for what only the command
line knows (a memory provider in a configuration, an unknown event id).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from ..config import EventBrokerConfig, build_provider, load_config
from ..errors import ConfigError
from ..event import Event
from ..providers.base import Provider

__all__ = [
    "URL_ENV", "Failed", "Progress", "Target", "Usage", "add_json", "add_target", "emit",
    "open_provider", "parse_time", "print_events", "target",
]

URL_ENV = "EVENTBROKER_DATABASE_URL"

#: Where to look when ``--url`` names no backend we know by scheme: a database URL.
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_NATS_SCHEMES = ("nats", "tls")


class Usage(Exception):
    """Bad usage: exit status 2."""


class Failed(Exception):
    """The command did not work: exit status 1."""


# -- where the events are ----------------------------------------------------------------------


def add_target(parser: argparse.ArgumentParser, *, table: bool = True) -> None:
    """``--url``/``--config`` (one of them), and the names of what to read on the backend."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--url", default=None,
        help=f"database URL (default: ${URL_ENV}), or redis://... or nats://... where the "
             f"command works on those backends")
    where.add_argument("--config", metavar="FILE", default=None,
                       help="a configuration file (API section 6); its provider section is used")
    if table:
        parser.add_argument("--table-name", default=None,
                            help="events table of a database (default: events, or the config's)")
        parser.add_argument("--stream-name", default=None,
                            help="Redis stream or NATS JetStream stream (default: the provider's)")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines: one object per line")


@dataclass(frozen=True, slots=True)
class Target:
    """A backend as the command line names it."""

    kind: str  # database | redis | nats
    url: str
    table_name: str
    stream_name: str | None
    config: EventBrokerConfig | None


def load(path: str) -> EventBrokerConfig:
    """The configuration in ``path``; a file that does not load is a failure (exit 1)."""
    if not os.path.isfile(path):
        raise Failed(f"config file {path!r} does not exist")
    try:
        return load_config(pathlib.Path(path))  # a Path is always read as a file
    except ConfigError as exc:
        raise Failed(f"{path}: {exc}") from exc


def kind_of(url: str) -> str:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in _REDIS_SCHEMES:
        return "redis"
    if scheme in _NATS_SCHEMES:
        return "nats"
    return "database"


def target(args: argparse.Namespace) -> Target:
    """The backend that ``--url``/``--config`` (or ``$EVENTBROKER_DATABASE_URL``) name."""
    table = getattr(args, "table_name", None)
    stream = getattr(args, "stream_name", None)
    if getattr(args, "config", None):
        config = load(args.config)
        kind = config.provider
        if kind == "database":
            url = config.database.url
            if not url:
                raise Usage(f"{args.config}: event_broker.database.url is empty")
            table = table or config.database.table_name
        elif kind == "redis":
            url = config.redis.url
            stream = stream or config.redis.stream_name
        elif kind == "nats":
            url = config.nats.url
            stream = stream or config.nats.stream_name
        else:
            raise Usage(f"{args.config}: the {kind} provider keeps events inside one process; "
                        f"the command line needs a database, redis or nats provider")
        args.resolved_url = url  # so that main masks its secrets in any message
        return Target(kind, url, table or "events", stream, config)
    url = str(args.url or os.environ.get(URL_ENV) or "")
    if not url:
        raise Usage(f"--url or --config: expected where the events are (or set {URL_ENV})")
    return Target(kind_of(url), url, table or "events", stream, None)


def require_database(t: Target, command: str) -> Target:
    if t.kind != "database":
        raise Usage(f"{command} needs a database URL (the {t.kind} provider keeps "
                    f"{'its groups' if 'group' in command else 'no such state'} in {t.kind} itself)")
    return t


def build(t: Target) -> Provider:
    """The provider for ``t``, connected (a backend that is down fails here)."""
    if t.kind == "database":
        from ..providers.database import DatabaseProvider

        return DatabaseProvider(t.url, table_name=t.table_name)
    if t.config is not None and t.stream_name in (None, _config_stream(t.config)):
        return build_provider(t.config)
    if t.kind == "redis":
        from ..providers.redis import RedisProvider

        if t.stream_name:
            return RedisProvider(t.url, stream_name=t.stream_name)
        return RedisProvider(t.url)
    from ..providers.nats import NatsProvider

    if t.stream_name:
        return NatsProvider(t.url, stream_name=t.stream_name)
    return NatsProvider(t.url)


def _config_stream(config: EventBrokerConfig) -> str | None:
    return {"redis": config.redis.stream_name, "nats": config.nats.stream_name}.get(config.provider)


@contextlib.contextmanager
def open_provider(args: argparse.Namespace) -> Iterator[Provider]:
    """The provider for the command's target, closed afterwards."""
    provider = build(target(args))
    try:
        yield provider
    finally:
        provider.close()


# -- times -------------------------------------------------------------------------------------

_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d|w)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """``T``: an ISO-8601 time (naive means UTC) or a duration back from now (``15m``, ``24h``,
    ``30d``, also ``90s``, ``2w``, ``1h30m``)."""
    spec = text.strip()
    parts = list(_DURATION.finditer(spec))
    if parts and "".join(p.group(0) for p in parts) == spec.replace(" ", ""):
        seconds = sum(float(p["n"]) * _UNIT_SECONDS[p["unit"]] for p in parts)
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=seconds)
    try:
        value = dt.datetime.fromisoformat(spec.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO-8601 time or a duration such as 15m, 24h, 30d, got {text!r}"
        ) from None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


# -- output ------------------------------------------------------------------------------------


def emit(obj: object, out: TextIO | None = None) -> None:
    """One JSON line, flushed (output is often piped to ``jq`` or a log shipper)."""
    stream = out or sys.stdout
    stream.write(json.dumps(obj, default=str) + "\n")
    stream.flush()


def event_line(e: Event) -> str:
    line = f"{e.created_at.isoformat(timespec='milliseconds')}  {e.id}  {e.status.value:<10} {e.type}"
    if e.retry_count:
        line += f"  retries={e.retry_count}"
    if e.error:
        line += f"  error={e.error!r}"
    return line


def print_events(events: Iterable[Event], *, as_json: bool, limit: int = 0,
                 out: TextIO | None = None) -> None:
    """Events one per line as they are read (a large table streams, memory stays flat), then
    a count in text mode (saying so when ``limit`` may have cut the list)."""
    stream = out or sys.stdout
    n = 0
    for e in events:
        stream.write((e.to_json() if as_json else event_line(e)) + "\n")
        n += 1
    if as_json:
        return
    counted = f"{n} event{'s' if n != 1 else ''}"
    stream.write(f"(the first {counted}; --limit 0 for all)\n" if limit and n == limit
                 else f"({counted})\n")


class Progress:
    """A tqdm bar on stderr when stderr is a terminal and tqdm (the ``[cli]`` extra) is
    installed; otherwise nothing at all. Only counts are shown, never event data."""

    def __init__(self, desc: str) -> None:
        self._desc = desc
        self._bar: Any = None

    def start(self, total: int | None) -> None:
        if not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=self._desc, unit="ev", file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def import_handler(spec: str) -> Callable[[Event], Any]:
    """``module:function`` (the module found from the current directory too, as ``python -m``
    would); a bad spec is a usage error."""
    import importlib

    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise Usage(f"--handler: expected module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise Usage(f"--handler: cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise Usage(f"--handler: {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise Usage(f"--handler: {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]
