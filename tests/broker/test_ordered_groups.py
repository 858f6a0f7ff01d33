"""Ordered consumer groups (API.md section 3): no two members hold one key, oldest first.

Run on every backend: in-process (memory), SQLite, PostgreSQL, Redis and NATS. Two brokers
share one recorder, so "one at a time" is checked across members, not per process. A member
killed with SIGKILL mid-key must not let the key's next event overtake the one it held: that
one is redelivered first (on PostgreSQL by the per-key claim, on Redis and NATS by the new
leader taking over what the dead one left).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sqlalchemy_eventbroker import Broker, Event, EventSource, MemoryProvider, new_event
from sqlalchemy_eventbroker.providers.database import DatabaseProvider

from ._keys import KeyRecorder
from .conftest import QUICK_RETRIES, Waiter

ROOT = pathlib.Path(__file__).resolve().parents[2]
MakeBroker = Callable[..., Broker]


def _remote(kind: str, request: pytest.FixtureRequest, name: str) -> tuple[str, Callable[[], Any]]:
    """(url, factory) of Redis or NATS providers on one stream named after ``name``."""
    if kind == "redis":
        from sqlalchemy_eventbroker.providers.redis import RedisProvider

        url = request.getfixturevalue("redis_url")
        return url, lambda: RedisProvider(url, stream_name=f"test:{name}")
    from sqlalchemy_eventbroker.providers.nats import NatsProvider

    url = request.getfixturevalue("nats_url")
    return url, lambda: NatsProvider(url, stream_name=f"T{name}", storage="memory")


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis", "nats"])
def shared(request: pytest.FixtureRequest, unique_name: str) -> Iterator[Callable[[], Any]]:
    """A factory of providers that share one backend (the memory one is one provider)."""
    kind = request.param
    made: list[Any] = []
    if kind in ("redis", "nats"):
        _, factory = _remote(kind, request, unique_name)

        def make() -> Any:
            p = factory()
            made.append(p)
            return p

        yield make
        for p in made:
            p.close()
        cleaner = factory()
        cleaner.drop()
        cleaner.close()
        return
    if kind == "memory":
        memory = MemoryProvider()
        made.append(memory)

        def make() -> Any:
            return memory
    else:
        url = request.getfixturevalue("sqlite_url" if kind == "sqlite" else "postgres_url")
        with DatabaseProvider(url) as p:  # the schema once, before members race for it
            p.create_schema()

        def make() -> Any:
            p = DatabaseProvider(url, poll_interval=0.05) if kind == "sqlite" \
                else DatabaseProvider(url)
            made.append(p)
            return p
    yield make
    for p in made:
        p.close()


def _keyed(keys: int, per_key: int) -> list[Event]:
    return [new_event(EventSource.INTERNAL, "shop.orders.update", {"n": n}, key=f"orders:{k}")
            for n in range(per_key) for k in range(keys)]


def test_ordered_fanout__another_broker_receives_each_key_in_order(
    shared: Callable[[], Any], make_broker: MakeBroker, wait_for: Waiter
) -> None:
    rec = KeyRecorder(delay=0.004)
    receiver = make_broker(mode="async", provider=shared(), worker_count=8,
                           instance_id="receiver")
    receiver.subscribe("shop.orders.*", rec, ordered=True)
    publisher = make_broker(mode="async", provider=shared(), instance_id="publisher")
    wait_for(lambda: _listening(receiver), message="the receiver listening")
    events = _keyed(keys=8, per_key=8)
    for e in events:
        publisher.publish(e)
    wait_for(lambda: rec.done == len(events), timeout=30, message="every event received")
    assert rec.max_same_key == 1
    assert all(order == list(range(8)) for order in rec.order.values()), rec.order
    assert rec.max_total > 1, "different keys must run at the same time"


def _listening(broker: Broker) -> bool:
    """Whether a broker's fan-out reader is open (it sees events published from now on)."""
    return broker._bus._receiver is not None


def test_ordered_group__members_never_hold_one_key_at_once_and_keep_its_order(
    shared: Callable[[], Any], make_broker: MakeBroker, wait_for: Waiter
) -> None:
    # Every third event of a key fails once: its retry must still come before the next one.
    rec = KeyRecorder(delay=0.004, fail=lambda e, attempt: e.payload["n"] % 3 == 1
                      and attempt == 1)
    members = [make_broker(mode="async", provider=shared(), worker_count=4,
                           instance_id=f"member-{i}") for i in range(2)]
    for m in members:
        m.subscribe("shop.orders.*", rec, group="ship", ordered=True, lease=10)
    publisher = make_broker(mode="async", provider=shared(), instance_id="publisher")
    events = _keyed(keys=8, per_key=8)
    for e in events:
        publisher.publish(e)
    wait_for(lambda: rec.done == len(events), timeout=30, message="every event handled once")
    assert rec.max_same_key == 1
    assert all(order == list(range(8)) for order in rec.order.values()), rec.order
    assert rec.max_total > 1, "different keys must run at the same time"
    retried = sum(1 for e in events if e.payload["n"] % 3 == 1)
    assert sum(rec.attempts.values()) == len(events) + retried, "none handled twice"


def test_ordered_group__a_failed_event_releases_its_key(
    shared: Callable[[], Any], make_broker: MakeBroker, wait_for: Waiter
) -> None:
    rec = KeyRecorder(fail=lambda e, attempt: e.payload["n"] == 1)
    member = make_broker(mode="async", provider=shared(), worker_count=2,
                         retry_policy=QUICK_RETRIES)
    member.subscribe("shop.orders.*", rec, group="ship", ordered=True)
    publisher = make_broker(mode="async", provider=shared(), instance_id="publisher")
    for e in _keyed(keys=1, per_key=4):
        publisher.publish(e)
    wait_for(lambda: rec.done == 3, timeout=20, message="the three others handled")
    assert rec.order["orders:0"] == [0, 2, 3]


_CHILD = textwrap.dedent("""
    import sys, time
    from sqlalchemy_eventbroker import Broker
    kind, url, name, lease = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    if kind == "redis":
        from sqlalchemy_eventbroker.providers.redis import RedisProvider
        provider = RedisProvider(url, stream_name=f"test:{name}")
    elif kind == "nats":
        from sqlalchemy_eventbroker.providers.nats import NatsProvider
        provider = NatsProvider(url, stream_name=f"T{name}", storage="memory")
    else:
        from sqlalchemy_eventbroker.providers.database import DatabaseProvider
        provider = DatabaseProvider(url)

    def handler(event):
        print("handling", event.key, event.payload["n"], flush=True)
        time.sleep(3600)  # never finishes: the test kills us here

    broker = Broker(provider=provider, instance_id="child", worker_count=1)
    broker.subscribe("shop.**", handler, group="ship", lease=lease, ordered=True)
    broker.start()
    print("ready", flush=True)
    time.sleep(3600)
""")


@pytest.fixture(params=["sqlite", "postgres", "redis", "nats"])
def backend(request: pytest.FixtureRequest, unique_name: str
            ) -> Iterator[tuple[str, str, Callable[[], Any]]]:
    """(kind, url, provider factory) for the kill -9 test; cleaned up afterwards."""
    kind = request.param
    made: list[Any] = []
    if kind in ("sqlite", "postgres"):
        url = request.getfixturevalue(f"{kind}_url")
        with DatabaseProvider(url) as p:
            p.create_schema()

        def factory() -> Any:
            return DatabaseProvider(url, poll_interval=0.05)
    else:
        url, factory = _remote(kind, request, unique_name)

    def make() -> Any:
        p = factory()
        made.append(p)
        return p

    yield kind, url, make
    for p in made:
        p.close()
    if kind in ("redis", "nats"):
        cleaner = factory()
        cleaner.drop()
        cleaner.close()


def test_ordered_group__member_killed_mid_key__the_held_event_is_redelivered_first(
    backend: tuple[str, str, Callable[[], Any]], unique_name: str, make_broker: MakeBroker,
    wait_for: Waiter
) -> None:
    kind, url, make = backend
    lease = 1.0
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, kind, url, unique_name, str(lease)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", child.stderr.read()  # type: ignore[union-attr]
        publisher = make_broker(mode="async", provider=make(), instance_id="publisher")
        held = [new_event(EventSource.INTERNAL, "shop.orders.update", {"n": n}, key="orders:1")
                for n in range(3)]
        publisher.publish(held[0])
        assert child.stdout.readline().split() == ["handling", "orders:1", "0"]
        for e in held[1:]:
            publisher.publish(e)

        rec = KeyRecorder(delay=0)
        survivor = make_broker(mode="async", provider=make(), worker_count=4,
                               instance_id="survivor")
        survivor.subscribe("shop.**", rec, group="ship", lease=lease, ordered=True)
        time.sleep(lease * 2)  # two leases: the live child renews, orders:1 stays held
        assert "orders:1" not in rec.order

        child.send_signal(signal.SIGKILL)
        child.wait(10)
        wait_for(lambda: len(rec.order.get("orders:1", ())) == 3, timeout=lease * 6 + 10,
                 message="orders:1 handled after the kill")
        assert rec.order["orders:1"] == [0, 1, 2]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        for s in (child.stdout, child.stderr):
            if s is not None:
                s.close()
