"""Service addresses, a throw-away PostgreSQL database, server versions, optional modules.

Everything runs on loopback. Addresses can be overridden with the environment variables
``EVENTBROKER_BENCH_POSTGRES`` (a SQLAlchemy URL of an administrative database on the
server), ``EVENTBROKER_BENCH_REDIS`` and ``EVENTBROKER_BENCH_NATS``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get(
    "EVENTBROKER_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("EVENTBROKER_BENCH_REDIS", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("EVENTBROKER_BENCH_NATS", "nats://127.0.0.1:4222")

_PORTS = {"postgresql": 5432, "redis": 6379, "nats": 4222}


def reachable(url: str) -> bool:
    parts = urlsplit(url.replace("+psycopg", ""))
    port = parts.port or _PORTS.get(parts.scheme, 0)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def psycopg_dsn(sa_url: str) -> str:
    """``postgresql+psycopg://...`` -> a libpq URL psycopg accepts."""
    return sa_url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def sqlite_file_engine() -> Iterator[sa.Engine]:
    """An engine on a SQLite file in a temporary directory, removed (with the file) after."""
    import sqlalchemy as sa

    tmp = tempfile.mkdtemp(prefix="ebbench-")
    engine = sa.create_engine(f"sqlite:///{os.path.join(tmp, 'bench.db')}")
    try:
        yield engine
    finally:
        engine.dispose()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def fresh_pg_engine() -> Iterator[sa.Engine]:
    """An engine on an empty PostgreSQL database (see :func:`fresh_pg_database`)."""
    import sqlalchemy as sa

    with fresh_pg_database() as url:
        engine = sa.create_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """Create an empty database on the server, yield its SQLAlchemy URL, drop it afterwards."""
    import psycopg

    name = f"ebbench_{uuid.uuid4().hex[:10]}"
    admin = psycopg_dsn(PG_ADMIN_URL)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_versions() -> dict[str, str]:
    """Versions of the servers that answer; absent ones are left out."""
    found: dict[str, str] = {}
    if reachable(PG_ADMIN_URL):
        try:
            import psycopg

            with psycopg.connect(psycopg_dsn(PG_ADMIN_URL)) as conn:
                row = conn.execute("SHOW server_version").fetchone()
                found["PostgreSQL"] = str(row[0]).split()[0] if row else "?"
        except Exception as exc:  # noqa: BLE001 - a description, not a check
            found["PostgreSQL"] = f"? ({exc})"
    if reachable(REDIS_URL):
        try:
            import redis

            found["Redis"] = str(redis.Redis.from_url(REDIS_URL).info("server")["redis_version"])
        except Exception as exc:  # noqa: BLE001
            found["Redis"] = f"? ({exc})"
    if reachable(NATS_URL):
        try:
            import nats

            async def version() -> str:
                nc = await nats.connect(NATS_URL)
                try:
                    v = nc.connected_server_version
                    return f"{v.major}.{v.minor}.{v.patch}"
                finally:
                    await nc.close()

            found["nats-server"] = asyncio.run(version()) + " (JetStream)"
        except Exception as exc:  # noqa: BLE001
            found["nats-server"] = f"? ({exc})"
    return found


def optional(module: str, name: str) -> tuple[Any, str]:
    """``(obj, "")`` when ``sqlalchemy_eventbroker.<module>.<name>`` imports, else ``(None, why)``."""
    try:
        mod = importlib.import_module(f"sqlalchemy_eventbroker.{module}")
        return getattr(mod, name), ""
    except Exception as exc:  # noqa: BLE001 - any import failure means "not there yet"
        return None, f"sqlalchemy_eventbroker.{module}.{name} not available ({type(exc).__name__})"


#: About 1 KB of payload, as in BASELINES.md's cross-process figures.
FILLER = "x" * 900


def payload(phase: int, i: int) -> dict[str, Any]:
    return {"p": phase, "i": i, "t": 0.0, "data": FILLER}


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


EVENT_TYPE = "bench.events.created"


def raw_items(phase: int, n: int) -> list[dict[str, Any]]:
    """What the raw baselines send: an event-shaped dict (id, type, time, ~1 KB payload)."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC).isoformat()
    return [{"id": str(uuid.uuid4()), "type": EVENT_TYPE, "created_at": now,
             "payload": payload(phase, i)} for i in range(n)]
