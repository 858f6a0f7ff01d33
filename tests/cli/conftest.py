"""The console script as users run it: a subprocess of ``eventbroker``, against a seeded store.

One seeded database per backend and module (SQLite file, PostgreSQL database), shared by the
tests that only read it; tests that change the store use a table of their own. The seeding
provider stays open for the module, so that its group member's lease is in flight while the
commands look.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import pytest
import sqlalchemy as sa

from sqlalchemy_eventbroker import Event, EventStatus, new_event
from sqlalchemy_eventbroker.providers.database import DatabaseProvider
from tests.conftest import PG_URL, require_service

#: The console script of this environment (``.venv/bin/eventbroker``).
EVENTBROKER = shutil.which("eventbroker", path=str(pathlib.Path(sys.executable).parent)) or ""


def run(*args: str, cwd: str | os.PathLike[str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``eventbroker ARGS``; stdout and stderr captured as text."""
    assert EVENTBROKER, "the eventbroker console script is not installed in this environment"
    return subprocess.run([EVENTBROKER, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, check=False)


def read_lines(stream: IO[str], n: int, timeout: float = 30) -> list[str]:
    """The next ``n`` lines of ``stream``, waiting at most ``timeout`` seconds in all (a reader
    thread, so that a process that prints nothing fails the test instead of hanging it)."""
    got: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for _ in range(n):
            line = stream.readline()
            if not line:
                return
            got.put(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while len(lines) < n:
        try:
            lines.append(got.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"after {timeout} s, {len(lines)} of {n} lines: {lines!r}") from None
    return lines


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The failure message, checked to be exactly one line and no traceback."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@dataclass
class Seeded:
    """A store with known content: 4 completed ``shop.orders.created``, 1 failed
    ``shop.orders.paid``, 2 pending ``shop.users.created`` (the oldest a day old) and a group
    ``mailer`` on ``shop.orders.*`` with one event in flight."""

    url: str
    kind: str
    provider: DatabaseProvider
    events: dict[str, list[Event]] = field(default_factory=dict)

    def new_table(self) -> tuple[str, DatabaseProvider]:
        """A table of its own (for tests that change what is stored), created with its schema."""
        name = f"t{uuid.uuid4().hex[:10]}"
        p = DatabaseProvider(self.url, table_name=name)
        p.create_schema()
        return name, p


def seed(provider: DatabaseProvider) -> dict[str, list[Event]]:
    day_old = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    group = provider.group_stream("shop.orders.*", "mailer", lease=300)
    completed = [new_event("internal", "shop.orders.created", {"n": i}) for i in range(4)]
    for e in completed:
        e.status = EventStatus.COMPLETED
    failed = new_event("internal", "shop.orders.paid", {"n": 9})
    failed.status, failed.error = EventStatus.FAILED, "smtp: down\nsecond line"
    old = new_event("internal", "shop.users.created", {"name": "ada"})
    old.created_at = day_old
    pending = [old, new_event("internal", "shop.users.created", {"name": "bob"})]
    provider.store_and_publish_many([*completed, failed, *pending])
    delivery = group.receive(timeout=10)  # leased for 300 s: in flight while the tests look
    assert delivery is not None
    return {"completed": completed, "failed": [failed], "pending": pending}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """The seeded store of each backend, migrated with ``eventbroker migrate upgrade``."""
    admin = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('cli') / 'events.db'}"
    else:
        server = require_service("PostgreSQL", PG_URL, 5432)
        name = f"ebcli_{uuid.uuid4().hex[:12]}"
        admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        proc = run("migrate", "upgrade", "--url", url)
        assert proc.returncode == 0, proc.stderr
        provider = DatabaseProvider(url)
        try:
            yield Seeded(url, request.param, provider, seed(provider))
        finally:
            provider.close()
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.dispose()
