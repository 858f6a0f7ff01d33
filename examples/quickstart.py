"""The tour: every ORM create, update and delete on a SQLite file becomes an event.

Run it from a checkout with only the core install::

    pip install -e . && python examples/quickstart.py

It needs no server: SQLite file in a temporary directory, the in-memory provider, a broker
in sync mode (handlers run in the committing thread, so the output is in order).
"""

from __future__ import annotations

import os
import sys
import tempfile

from sqlalchemy import ForeignKey, String, create_engine, delete, select, update
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from sqlalchemy_eventbroker import (
    Broker,
    CRUDHookConfig,
    Event,
    EventFilter,
    MemoryProvider,
    event_context,
    register_crud_hooks,
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    plan: Mapped[str] = mapped_column(String(20), server_default="free")
    password_hash: Mapped[str] = mapped_column(String(100), default="")
    orders: Mapped[list[Order]] = relationship(back_populates="user",
                                               cascade="all, delete-orphan")


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    item: Mapped[str] = mapped_column(String(50))
    user: Mapped[User] = relationship(back_populates="orders")


def show(label: str) -> object:
    def handler(event: Event) -> None:
        line = f"  [{label}] {event.type:<20} {event.payload}"
        if "changes" in event.metadata:
            line += f"  changes={event.metadata['changes']}"
        if event.user_id is not None:
            line += f"  user_id={event.user_id}"
        print(line)

    return handler


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{os.path.join(tmp, 'shop.db')}")
        Base.metadata.create_all(engine)
        factory = sessionmaker(engine, expire_on_commit=False)

        broker = Broker(provider=MemoryProvider(), mode="sync", instance_id="quickstart").start()
        broker.subscribe("main.users.*", show("users"))          # every users event
        broker.subscribe("main.orders.*", show("orders"))        # every orders event
        broker.subscribe("*.*.delete", show("any delete"))       # deletes of any table
        # Secrets stay out of every event: excluded columns appear nowhere in them.
        handle = register_crud_hooks(
            factory, CRUDHookConfig(exclude_columns={"users": ["password_hash"]}), broker=broker)

        print("1. create a user with two orders (events are published after commit):")
        with event_context(user_id=7, metadata={"request_id": "r-1"}), factory.begin() as s:
            ada = User(name="ada", password_hash="pbkdf2:s3cr3t",
                       orders=[Order(item="book"), Order(item="pen")])
            s.add(ada)

        print("2. update the user (metadata.changes holds old and new):")
        with factory.begin() as s:
            s.get(User, ada.id).plan = "pro"

        print("3. a rolled-back transaction publishes nothing:")
        with factory() as s:
            s.add(User(name="ghost"))
            s.flush()
            s.rollback()
        print("  (nothing)")

        print("4. a bulk UPDATE gives one event per affected row:")
        with factory.begin() as s:
            s.execute(update(Order).where(Order.user_id == ada.id).values(item="gift"))

        print("5. deleting the user cascades to its orders (children first):")
        with factory.begin() as s:
            s.delete(s.get(User, ada.id))

        print("6. a bulk DELETE of nothing publishes nothing:")
        with factory.begin() as s:
            s.execute(delete(Order))
        with Session(engine) as s:
            assert s.scalar(select(User).limit(1)) is None

        stored = broker.provider.list(EventFilter())
        print(f"\n{len(stored)} events stored by the memory provider, all "
              f"{', '.join(sorted({e.status.value for e in stored}))}:")
        for e in stored:
            print(f"  {e.created_at:%H:%M:%S.%f} {e.type}")
        handle.remove()
        broker.stop()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
