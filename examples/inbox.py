"""Exactly-once effects: an order is invoiced once, however often its event is delivered.

Delivery is at least once: a retry after a failure, a redelivery after a crash (or a group's
lease running out) hands a handler the same event again. ``Inbox`` makes the handler's database
work happen once per event: it records the event id in the handler's own transaction, so the
invoice and the record commit together, and a second delivery is skipped. Run it with only the
core install (SQLite file, in-memory provider, sync broker)::

    python examples/inbox.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from decimal import Decimal

from sqlalchemy import Numeric, String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_eventbroker import (
    Broker,
    CRUDHookConfig,
    Event,
    Inbox,
    MemoryProvider,
    RetryPolicy,
    register_crud_hooks,
)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(50))
    total: Mapped[Decimal] = mapped_column(Numeric(10, 2))


class Invoice(Base):
    __tablename__ = "invoices"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int]  # deliberately not unique: a double effect would show as two rows
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))


def main() -> int:
    path = os.path.join(tempfile.mkdtemp(prefix="eventbroker-inbox-"), "shop.db")
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    app_sessions = sessionmaker(engine)

    broker = Broker(MemoryProvider(), mode="sync",
                    retry_policy=RetryPolicy(max_retries=3, initial_delay=0.01))
    register_crud_hooks(app_sessions, CRUDHookConfig(), broker=broker)

    # The inbox gets its own sessions; each delivery is one transaction of its own.
    inbox = Inbox(sessionmaker(engine), consumer="billing")
    inbox.create_schema()  # or: eventbroker migrate upgrade --url ...
    delivered: list[Event] = []
    attempts: list[object] = []

    @inbox.handler
    def invoice(event: Event, session: Session) -> None:
        order = event.payload
        assert isinstance(order, dict)
        attempts.append(order["id"])
        session.add(Invoice(order_id=order["id"], amount=Decimal(str(order["total"]))))
        if attempts == [1]:  # the first attempt fails after writing: both roll back
            raise TimeoutError("payment gateway timed out")

    def on_order(event: Event) -> None:
        delivered.append(event)
        invoice(event)

    broker.subscribe("*.orders.create", on_order)
    with broker:
        with app_sessions() as session:
            session.add_all([Order(id=1, item="book", total=Decimal("12.50")),
                             Order(id=2, item="lamp", total=Decimal("40.00")),
                             Order(id=3, item="desk", total=Decimal("199.00"))])
            session.commit()
        # A redelivery of every order event, as after a crash before the acknowledgement.
        for event in {e.id: e for e in delivered}.values():
            on_order(event)

        with engine.connect() as conn:
            invoices = conn.execute(
                select(Invoice.order_id, func.count()).group_by(Invoice.order_id)).all()
        print(f"deliveries: {len(delivered)} (3 orders, 1 retry, 3 redeliveries), "
              f"function calls: {len(attempts)} (3 orders, 1 retry)")
        for order_id, count in invoices:
            print(f"order {order_id}: {count} invoice(s)")
        assert sorted(invoices) == [(1, 1), (2, 1), (3, 1)], invoices
        print("each order invoiced once")
        print(f"purged {inbox.purge(0)} inbox rows (use days in production)")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
