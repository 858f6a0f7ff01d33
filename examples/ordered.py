"""Per-order ordering across two replicas: an order's events never overtake each other.

Run it with only the core install::

    python examples/ordered.py

The application writes 20 orders through the ORM on a SQLite file: create, then "paid",
then "shipped", each in its own transaction. Capture turns every change into an event whose
``key`` is the row's identity (``main.orders:7``). Two replica brokers share the events table
and subscribe one handler as an ordered group: each event is handled by one replica, the
events of one order one at a time and in commit order, while different orders are handled in
parallel (4 workers per replica). The handler takes a random few milliseconds, which would
reorder an unordered subscription.
"""

from __future__ import annotations

import collections
import os
import random
import sys
import tempfile
import threading
import time

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_eventbroker import Broker, CRUDHookConfig, Event, register_crud_hooks
from sqlalchemy_eventbroker.providers.database import DatabaseProvider

ORDERS = 20


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(20))


class Shipping:
    """The handler: remembers what it saw per order, and whether an order ran twice at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[str, list[str]] = collections.defaultdict(list)
        self.running: collections.Counter[str] = collections.Counter()
        self.overlaps = 0
        self.by_replica: collections.Counter[str] = collections.Counter()
        self.pause = threading.Event()  # never set: a timed wait stands for real work

    def handler(self, replica: str) -> object:
        def handle(event: Event) -> None:
            with self.lock:
                self.running[event.key] += 1
                self.overlaps += self.running[event.key] > 1
                self.by_replica[replica] += 1
            self.pause.wait(random.uniform(0, 0.01))
            with self.lock:
                self.seen[event.key].append(event.payload["state"])
                self.running[event.key] -= 1

        return handle


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{os.path.join(tmp, 'shop.db')}"
        engine = create_engine(url)
        Base.metadata.create_all(engine)
        with DatabaseProvider(url) as p:
            p.create_schema()

        shipping = Shipping()
        replicas = []
        for name in ("replica-a", "replica-b"):
            b = Broker(provider=DatabaseProvider(url, poll_interval=0.05), instance_id=name,
                       worker_count=4).start()
            b.subscribe("main.orders.*", shipping.handler(name), group="shipping",
                        ordered=True)
            replicas.append(b)

        app = Broker(provider=DatabaseProvider(url), instance_id="app").start()
        factory = sessionmaker(engine, expire_on_commit=False)
        hooks = register_crud_hooks(factory, CRUDHookConfig(), broker=app)
        for state in ("new", "paid", "shipped"):
            for i in range(1, ORDERS + 1):
                with factory.begin() as s:
                    if state == "new":
                        s.add(Order(id=i, state=state))
                    else:
                        s.get_one(Order, i).state = state

        deadline = time.monotonic() + 30
        while sum(len(v) for v in shipping.seen.values()) < 3 * ORDERS:
            if time.monotonic() > deadline:
                print("timed out waiting for the replicas", file=sys.stderr)
                return 1
            time.sleep(0.05)
        hooks.remove()
        for b in (app, *replicas):
            b.stop()
        engine.dispose()

    in_order = all(states == ["new", "paid", "shipped"] for states in shipping.seen.values())
    print(f"{3 * ORDERS} events for {len(shipping.seen)} orders, handled by "
          f"{dict(sorted(shipping.by_replica.items()))}")
    print(f"  main.orders:1 -> {' -> '.join(shipping.seen['main.orders:1'])}")
    if not in_order or shipping.overlaps:
        print(f"ORDER BROKEN: overlaps={shipping.overlaps}", file=sys.stderr)
        return 1
    print("every order's events handled in commit order, never two at once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
