"""DatabaseProvider across OS processes on one PostgreSQL database: fan-out in commit order,
a killed LISTEN connection, consumer groups sharing work, a member killed with SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from sqlalchemy_eventbroker import new_event
from sqlalchemy_eventbroker.providers.database import DatabaseProvider

WORKER = str(Path(__file__).with_name("_db_worker.py"))


class Proc:
    """A worker process whose stdout lines are collected by a reader thread."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float = 20.0) -> str:
        """The next line starting with ``prefix`` (other lines are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        err = self.popen.stderr.read() if self.popen.poll() is not None and self.popen.stderr else ""
        raise AssertionError(f"no {prefix!r} line within {timeout} s; seen {self.seen[-5:]}; {err}")

    def collect(self, prefix: str) -> list[str]:
        """Every line with ``prefix`` received so far."""
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return [x for x in self.seen if x.startswith(prefix)]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        for f in (self.popen.stdout, self.popen.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    made: list[Proc] = []
    yield made
    for p in made:
        p.stop()


@pytest.fixture
def schema(postgres_url: str) -> str:
    with DatabaseProvider(postgres_url) as p:
        p.create_schema()
    return postgres_url


def _start(procs: list[Proc], *args: str) -> Proc:
    p = Proc(*args)
    procs.append(p)
    return p


def _wait_for(proc: Proc, prefix: str, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(got := proc.collect(prefix)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(got)}/{count} {prefix!r} lines after {timeout} s")
        time.sleep(0.02)
    return got


def test_fanout__other_process_receives_every_commit_once_in_commit_order(
    schema: str, procs: list[Proc]
) -> None:
    """Process A commits ORM rows with outbox events; process B's stream gets all, in order."""
    n = 200
    b = _start(procs, "stream", schema, str(n))
    b.expect("READY")
    a = _start(procs, "write", schema, str(n))
    a.expect("DONE", timeout=60)
    b.expect("DONE", timeout=30)
    got = [int(line.split()[1]) for line in b.collect("GOT")]
    assert got == list(range(n))


def test_fanout__listener_terminated_while_writer_commits__every_event_once(
    schema: str, procs: list[Proc]
) -> None:
    """B's LISTEN connection is killed three times while A commits: no loss, no duplicate."""
    n = 300
    b = _start(procs, "stream", schema, str(n))
    b.expect("READY")
    a = _start(procs, "write", schema, str(n), "0.004")  # paced: kills land mid-stream
    engine = sa.create_engine(schema)
    listener = sa.text(
        "SELECT pid FROM pg_stat_activity "
        "WHERE application_name = 'eventbroker-listener' AND datname = current_database()"
    )
    kills = 0
    try:
        for at in ("AT 50", "AT 125", "AT 200"):
            a.expect(at, timeout=60)
            deadline = time.monotonic() + 10
            with engine.connect() as conn:
                while not (pids := conn.execute(listener).scalars().all()):
                    assert time.monotonic() < deadline, "B's listener did not come back"
                    time.sleep(0.01)
                kills += sum(conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                             .scalar_one() for pid in pids)
        assert a.popen.poll() is None, "the writer finished before the last kill"
    finally:
        engine.dispose()
    a.expect("DONE", timeout=60)
    done = b.expect("DONE", timeout=60)
    assert kills == 3
    assert int(done.split()[1]) >= 3  # B reconnected after each kill
    got = [int(line.split()[1]) for line in b.collect("GOT")]
    assert got == list(range(n))


def test_fanout__100_kb_payload_crosses_processes_intact(schema: str, procs: list[Proc]) -> None:
    """A 100 KB payload stored here arrives in another process byte-for-byte."""
    b = _start(procs, "stream", schema, "1")
    b.expect("READY")
    payload = {"n": 7, "blob": "x" * 100_000, "nested": [{"i": i} for i in range(100)]}
    with DatabaseProvider(schema) as p:
        e = new_event("database", "public.big.create", payload)
        p.store(e)
        p.publish(e)
    line = b.expect("GOT")
    want = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert line.split()[2:] == [e.id, want]


def test_group__two_processes_share_1000_events_none_twice(
    schema: str, procs: list[Proc]
) -> None:
    """Two member processes of one group handle 1,000 events between them, each once."""
    members = [_start(procs, "group", schema, "workers", "10", "ack") for _ in range(2)]
    for m in members:
        m.expect("READY")
    events = [new_event("database", "public.jobs.create", {"i": i}) for i in range(1000)]
    with DatabaseProvider(schema) as p:
        for k in range(0, 1000, 100):
            p.store_and_publish_many(events[k:k + 100])
    deadline = time.monotonic() + 60
    while sum(len(m.collect("GOT")) for m in members) < 1000:
        assert time.monotonic() < deadline, "group did not finish"
        time.sleep(0.05)
    time.sleep(0.3)  # a duplicate, if any, would show up now
    handled = Counter(line.split()[1] for m in members for line in m.collect("GOT"))
    assert handled == Counter(e.id for e in events)
    assert all(len(m.collect("GOT")) > 0 for m in members)  # both took part


@pytest.mark.slow
def test_group__member_killed_mid_handler__event_redelivered_to_the_other(
    schema: str, procs: list[Proc]
) -> None:
    """SIGKILL during the handler: after the 2 s lease the other member gets that event."""
    hung = _start(procs, "group", schema, "kill", "2", "hang")
    hung.expect("READY")
    e = new_event("database", "public.jobs.create", {"i": 1})
    with DatabaseProvider(schema) as p:
        p.store(e)
    assert hung.expect("GOT").split()[1] == e.id
    other = _start(procs, "group", schema, "kill", "2", "ack")
    other.expect("READY")
    os.kill(hung.popen.pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert other.expect("GOT", timeout=15).split()[1] == e.id
    assert time.monotonic() - t0 < 10
