"""Shared fixtures: real services on loopback, unique names per test.

A test that needs a service skips when it is down on a developer machine, and fails when
``CI=true``: CI must never go green by skipping.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

PG_URL = os.environ.get(
    "EVENTBROKER_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("EVENTBROKER_TEST_REDIS", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("EVENTBROKER_TEST_NATS", "nats://127.0.0.1:4222")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url.replace("+psycopg", ""))
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port),
                                      timeout=2):
            return True
    except OSError:
        return False


def require_service(name: str, url: str, default_port: int) -> str:
    """Return ``url`` if the service answers; otherwise skip (fail under CI)."""
    if _reachable(url, default_port):
        return url
    message = f"{name} is not reachable at {url}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service is a failure, not a skip)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """URL of the PostgreSQL server's ``test`` database (shared; do not create tables in it)."""
    return require_service("PostgreSQL", PG_URL, 5432)


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    import sqlalchemy as sa

    name = f"ebtest_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    """A file SQLite database in this test's temporary directory."""
    return f"sqlite:///{os.path.join(os.fspath(tmp_path), 'test.db')}"


@pytest.fixture
def redis_url() -> str:
    return require_service("Redis", REDIS_URL, 6379)


@pytest.fixture
def nats_url() -> str:
    return require_service("NATS", NATS_URL, 4222)


@pytest.fixture
def unique_name() -> str:
    """A short unique token for stream, subject, channel and group names."""
    return uuid.uuid4().hex[:12]
