"""An audit trail: who changed what, when, with old and new values, queryable afterwards.

Every committed change to ``accounts`` is captured with the acting user and request id
(``event_context``), stored by the provider, and read back with ``provider.list`` and
``broker.replay`` as a per-record history. Links of a many-to-many relationship (``accounts`` ↔ ``labels``
through ``account_labels``) are captured as rows of their own, so replaying the events
rebuilds the link table exactly. Runs on SQLite with the memory provider::

    python examples/audit_trail.py

With ``--database`` the events go to a ``DatabaseProvider`` on the same SQLite file, written
in the same transaction as the data (transactional outbox): a change and its audit record
commit or vanish together.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from decimal import Decimal

from sqlalchemy import Column, ForeignKey, Numeric, String, Table, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from sqlalchemy_eventbroker import (
    Broker,
    Event,
    EventFilter,
    MemoryProvider,
    event_context,
    register_crud_hooks,
)


class Base(DeclarativeBase):
    pass


account_labels = Table(
    "account_labels", Base.metadata,
    Column("account_id", ForeignKey("accounts.id"), primary_key=True),
    Column("label_id", ForeignKey("labels.id"), primary_key=True),
)


class Label(Base):
    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(30))


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(50))
    balance: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    labels: Mapped[list[Label]] = relationship(secondary=account_labels)


def rebuild_links(broker: Broker) -> set[tuple[object, object]]:
    """Replay every ``account_labels`` event, oldest first, into a set of links."""
    links: set[tuple[object, object]] = set()

    def apply(event: Event) -> None:
        row = event.payload
        assert isinstance(row, dict)
        link = (row["account_id"], row["label_id"])
        if event.operation == "create":
            links.add(link)
        else:
            links.discard(link)

    broker.replay("*.account_labels.*", apply)
    return links


def describe(event: Event) -> str:
    who = f"user {event.user_id}" if event.user_id is not None else "system"
    request = event.metadata.get("request_id", "-")
    if event.operation == "update":
        what = ", ".join(f"{col}: {c.get('old')} -> {c.get('new')}"
                         for col, c in event.metadata["changes"].items())
    else:
        what = ", ".join(f"{k}={v}" for k, v in (event.payload or {}).items())
    return f"{event.operation:<7} by {who:<8} (request {request}): {what}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", action="store_true",
                        help="store events in the app's SQLite file (transactional outbox)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{os.path.join(tmp, 'bank.db')}"
        engine = create_engine(url)
        Base.metadata.create_all(engine)
        factory = sessionmaker(engine, expire_on_commit=False)
        if args.database:
            from sqlalchemy_eventbroker import DatabaseProvider

            provider = DatabaseProvider(engine)
            provider.create_schema()
        else:
            provider = MemoryProvider()
        broker = Broker(provider=provider, mode="sync", instance_id="audit").start()
        handle = register_crud_hooks(factory, broker=broker)

        with event_context(user_id=1, metadata={"request_id": "open-1"}), factory.begin() as s:
            acct = Account(owner="ada", balance=Decimal("100.00"))
            s.add(acct)
        with event_context(user_id=2, metadata={"request_id": "deposit-7"}), factory.begin() as s:
            s.get(Account, acct.id).balance += Decimal("25.50")
        try:
            with event_context(user_id=3, metadata={"request_id": "bad-9"}), factory.begin() as s:
                s.get(Account, acct.id).balance -= Decimal("1000.00")
                s.flush()
                raise ValueError("insufficient funds")      # rolled back: no audit record
        except ValueError:
            pass
        with event_context(user_id=1, metadata={"request_id": "close-2"}), factory.begin() as s:
            s.delete(s.get(Account, acct.id))

        print(f"History of accounts #{acct.id} ({type(provider).__name__}):")
        history = provider.list(EventFilter(entity="accounts"))
        for event in history:
            if event.payload and event.payload.get("id") == acct.id:
                print("  " + describe(event))

        print("Replayed deletes:")
        replayed = broker.replay("*.accounts.delete", lambda e: print("  " + describe(e)))
        assert len(history) == 3 and replayed == 1, (len(history), replayed)

        # Many-to-many: label accounts, move a label, then rebuild the links from events.
        with factory.begin() as s:
            vip, audit, risk = Label(name="vip"), Label(name="audit"), Label(name="risk")
            bob = Account(owner="bob", balance=Decimal("5.00"), labels=[vip, audit])
            eve = Account(owner="eve", balance=Decimal("7.00"), labels=[risk])
            s.add_all([bob, eve])
        with factory.begin() as s:
            bob, eve = s.get_one(Account, bob.id), s.get_one(Account, eve.id)
            bob.labels.remove(s.get_one(Label, audit.id))
            eve.labels.append(s.get_one(Label, vip.id))
        with factory.begin() as s:
            table = {(a, b) for a, b in s.execute(select(account_labels)).all()}
        rebuilt = rebuild_links(broker)
        print(f"Replay rebuilt account_labels: {sorted(rebuilt)} "
              f"({'matches' if rebuilt == table else 'DIFFERS FROM'} the table)")
        assert rebuilt == table, (rebuilt, table)

        handle.remove()
        broker.stop()
        provider.close()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
