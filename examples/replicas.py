"""Several replicas on one bus: every replica invalidates its cache, one sends the welcome mail.

The main process is "the web app": it writes users through the ORM, with the events written
in the same transaction (transactional outbox) by a ``DatabaseProvider``. Two worker processes
are "the replicas": each subscribes

* ``*.users.*`` without a group (fan-out: every replica sees every change), and
* ``*.users.create`` with ``group="emails"`` (competing consumers: one replica per event).

(The first segment is the schema: ``main`` on SQLite, ``public`` on PostgreSQL.)

Runs with no server, on a SQLite file shared by the processes (workers poll it)::

    python examples/replicas.py
    python examples/replicas.py --url postgresql+psycopg://postgres@127.0.0.1/app   # LISTEN/NOTIFY
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_eventbroker import Broker, DatabaseProvider, Event, register_crud_hooks

USERS = ["ada", "grace", "edsger", "barbara", "donald"]


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def worker(name: str, url: str) -> int:
    """A replica: prints what it handled, one line per handling, until stdin closes."""
    provider = DatabaseProvider(url, poll_interval=0.05)
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            print(line, flush=True)

    def invalidate(event: Event) -> None:
        say(f"{name} cache {event.type} {event.payload['name']}")

    def welcome(event: Event) -> None:
        say(f"{name} mail {event.payload['name']}")

    with provider, Broker(provider=provider, instance_id=name) as broker:
        broker.subscribe("*.users.*", invalidate)
        broker.subscribe("*.users.create", welcome, group="emails", lease=5.0)
        say(f"{name} ready")
        sys.stdin.read()  # until the main process closes our stdin
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="database URL (default: a temporary SQLite file)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="eventbroker-replicas-")
    url = args.url or f"sqlite:///{os.path.join(tmp.name, 'app.db')}"
    if args.worker:
        return worker(args.worker, url)

    engine = create_engine(url)
    Base.metadata.create_all(engine)
    provider = DatabaseProvider(engine)
    provider.create_schema()

    workers = {
        name: subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--url", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for name in ("replica-1", "replica-2")
    }
    lines: list[str] = []
    ready = threading.Semaphore(0)

    def collect(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip().endswith(" ready"):
                ready.release()

    readers = [threading.Thread(target=collect, args=(p,), daemon=True) for p in workers.values()]
    for t in readers:
        t.start()
    for _ in workers:
        if not ready.acquire(timeout=30):
            print("a replica did not start", file=sys.stderr)
            return 1

    Session = sessionmaker(engine, expire_on_commit=False)
    with Broker(provider=provider, mode="sync", instance_id="web") as broker:
        handle = register_crud_hooks(Session, broker=broker)
        for name in USERS:
            with Session() as session, session.begin():
                session.add(User(name=name))
        handle.remove()

    # Wait (with a deadline) for 5 mails and 2 x 5 cache invalidations.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        mails = [ln for ln in lines if " mail " in ln]
        caches = [ln for ln in lines if " cache " in ln]
        if len(mails) >= len(USERS) and len(caches) >= 2 * len(USERS):
            break
        time.sleep(0.05)
    for proc in workers.values():
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in workers.values():
        proc.wait(timeout=30)
    provider.close()
    engine.dispose()

    for line in sorted(ln for ln in lines if not ln.endswith(" ready")):
        print(line)
    mails_per_user = Counter(ln.split()[-1] for ln in lines if " mail " in ln)
    caches_per_replica = Counter(ln.split()[0] for ln in lines if " cache " in ln)
    print(f"\nwelcome mails per user: {dict(mails_per_user)}")
    print(f"cache invalidations per replica: {dict(caches_per_replica)}")
    ok = (sorted(mails_per_user) == sorted(USERS) and set(mails_per_user.values()) == {1}
          and set(caches_per_replica.values()) == {len(USERS)} and len(caches_per_replica) == 2)
    print("each mail sent once, every replica saw every change" if ok else "MISMATCH")
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
