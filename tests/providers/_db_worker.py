"""A separate OS process for the cross-process database tests (not a test module).

    python _db_worker.py stream URL COUNT            print "GOT <n> <id> <sha>" per event
    python _db_worker.py group URL GROUP LEASE MODE  MODE "ack": ack each; "hang": hang in the handler
    python _db_worker.py write URL COUNT [PAUSE]     one ORM transaction per event (outbox),
                                                     PAUSE seconds between them (pacing)

Prints "READY" once it is listening. Lines are flushed at once; the parent reads them.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_eventbroker import new_event
from sqlalchemy_eventbroker.providers.database import DatabaseProvider


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "xp_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int]


def say(*parts: object) -> None:
    print(*parts, flush=True)


def digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def stream(url: str, count: int) -> None:
    with DatabaseProvider(url) as p:
        s = p.stream("*")
        deadline = time.monotonic() + 10
        while p.stats().provider_specific["listener"] != "notify":
            if time.monotonic() > deadline:
                raise SystemExit("listener never connected")
            time.sleep(0.01)
        say("READY", p.stats().provider_specific["listener_pid"])
        for _ in range(count):
            e = s.receive(timeout=60)
            if e is None:
                raise SystemExit("timed out")
            n = e.payload.get("n") if isinstance(e.payload, dict) else None
            say("GOT", n, e.id, digest(e.payload))
        say("DONE", p.stats().provider_specific["listener_reconnects"])


def group(url: str, name: str, lease: float, mode: str) -> None:
    with DatabaseProvider(url) as p:
        gs = p.group_stream("*", name, lease=lease)
        say("READY")
        while True:
            d = gs.receive(timeout=60)
            if d is None:
                return
            say("GOT", d.event.id)
            if mode == "hang":
                time.sleep(3600)  # "mid-handler": the parent kills us with SIGKILL
            d.ack()


def write(url: str, count: int, pause: float = 0.0) -> None:
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    with DatabaseProvider(engine) as p:
        for n in range(count):
            events = [new_event("database", "public.xp_items.create", {"n": n})]
            with Session(engine) as s, s.begin():
                s.add(Item(n=n))
                s.flush()
                p.write_in_transaction(s.connection(), events)
            p.announce_committed(events)  # as the broker does after the commit
            if n % 25 == 0:
                say("AT", n)
            if pause:
                time.sleep(pause)
    say("DONE")
    engine.dispose()


if __name__ == "__main__":
    cmd, url, *rest = sys.argv[1:]
    if cmd == "stream":
        stream(url, int(rest[0]))
    elif cmd == "group":
        group(url, rest[0], float(rest[1]), rest[2])
    elif cmd == "write":
        write(url, int(rest[0]), float(rest[1]) if len(rest) > 1 else 0.0)
    else:
        raise SystemExit(f"unknown command {cmd}")
