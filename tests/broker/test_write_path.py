"""The write path: one pipeline for every way in, bounded recursion, lossless captured batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_eventbroker import (
    Broker,
    Event,
    EventFilter,
    EventSource,
    EventStatus,
    HandlerError,
    MemoryProvider,
    PublishDepthExceeded,
    RetryPolicy,
    new_event,
    register_crud_hooks,
)
from sqlalchemy_eventbroker.providers.base import bus_provider

from .._section4 import Section4Only


def _broker(mode: str = "sync", **kw: Any) -> Broker:
    kw.setdefault("retry_policy", RetryPolicy(max_retries=1, initial_delay=0.001))
    return Broker(MemoryProvider(), mode=mode, registry=CollectorRegistry(), **kw)


# -- recursion ---------------------------------------------------------------------------


def test_publish_sync__recursion_stops_at_the_limit_with_a_named_error() -> None:
    """A sync handler that publishes what it handles stops at ``max_publish_depth``, and the
    error is not retried at any level: the calls grow with the depth, not exponentially."""
    calls = 0
    with _broker(max_publish_depth=5) as broker:

        def echo(event: Event) -> None:
            nonlocal calls
            calls += 1
            broker.publish_sync(new_event(EventSource.SYSTEM, "loop.again"))

        broker.subscribe("loop.*", echo)
        with pytest.raises(PublishDepthExceeded) as info:
            broker.publish_sync(new_event(EventSource.SYSTEM, "loop.start"))
        assert "max_publish_depth=5" in str(info.value)
        assert info.value.code == "publish_depth_exceeded"
        assert calls == 5  # one call per level; with retries it would be 2**5 - 1 = 31+
        failed = broker.provider.list(EventFilter(status=EventStatus.FAILED))
        assert len(failed) == 5
        assert all("PublishDepthExceeded" in e.error for e in failed)


def test_publish_sync__depth_is_per_thread_and_resets() -> None:
    """The depth counts nested publishes of one thread only; after the error, publishing
    from the top works again."""
    with _broker(max_publish_depth=2) as broker:
        seen: list[str] = []

        def once(event: Event) -> None:
            seen.append(event.type)
            if event.type == "a.top":
                broker.publish_sync(new_event(EventSource.SYSTEM, "a.child"))

        broker.subscribe("a.*", once)
        broker.publish_sync(new_event(EventSource.SYSTEM, "a.top"))
        broker.publish_sync(new_event(EventSource.SYSTEM, "a.top"))
        assert seen == ["a.top", "a.child", "a.top", "a.child"]


def test_publish_sync__other_failures_still_raise_handler_error() -> None:
    """A plain failing handler is retried and then reported as ``HandlerError``."""
    calls = 0
    with _broker() as broker:

        def bad(event: Event) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("no")

        broker.subscribe("x.*", bad)
        with pytest.raises(HandlerError):
            broker.publish_sync(new_event(EventSource.SYSTEM, "x.y"))
        assert calls == 2


def test_max_publish_depth__validated() -> None:
    """A depth below 1 is refused at construction, naming the option."""
    from sqlalchemy_eventbroker import ConfigError

    with pytest.raises(ConfigError, match="max_publish_depth"):
        Broker(MemoryProvider(), max_publish_depth=0, registry=CollectorRegistry())


# -- a provider with only API.md section 4 ---------------------------------------------


def test_section_four_provider__two_brokers_form_one_bus_without_echo() -> None:
    """Brokers on a provider that has only section 4's methods see each other's events once
    and never their own (the adapter skips them), in both modes."""
    shared = MemoryProvider()
    assert not isinstance(Section4Only(shared), type(bus_provider(shared)))
    a = Broker(Section4Only(shared), mode="sync", registry=CollectorRegistry()).start()
    b = Broker(Section4Only(shared), mode="async", registry=CollectorRegistry()).start()
    got_a: list[str] = []
    got_b: list[str] = []
    done = threading.Event()
    a.subscribe("t.*", lambda e: got_a.append(e.type))

    def on_b(e: Event) -> None:
        got_b.append(e.type)
        if len(got_b) == 2:
            done.set()

    b.subscribe("t.*", on_b)
    try:
        a.publish(new_event(EventSource.SYSTEM, "t.from_a"))
        b.publish(new_event(EventSource.SYSTEM, "t.from_b"))
        assert done.wait(5)
        deadline = time.monotonic() + 5
        while len(got_a) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # an echo would arrive within this (it is in-process)
        assert sorted(got_a) == ["t.from_a", "t.from_b"]
        assert sorted(got_b) == ["t.from_a", "t.from_b"]
    finally:
        a.stop()
        b.stop()
        shared.close()


# -- lossless captured batches -------------------------------------------------------------


class _Base(DeclarativeBase):
    pass


class _Row(_Base):
    __tablename__ = "wp_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/wp.db"
    else:
        yield request.getfixturevalue("postgres_url")


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.slow
def test_captured_transaction__larger_than_the_queue_reaches_every_handler(db_url: str) -> None:
    """10,000 rows committed in one transaction through the outbox, async brokers with the
    default buffer (1,000): every event reaches the local handler and a remote broker's, and
    every stored row ends ``completed``."""
    from sqlalchemy_eventbroker.providers.database import DatabaseProvider

    n = 10_000
    engine = sa.create_engine(db_url)
    _Base.metadata.create_all(engine)
    local_provider = DatabaseProvider(engine, table_name="wp_events")
    local_provider.create_schema()
    remote_provider = DatabaseProvider(db_url, table_name="wp_events")
    local = Broker(local_provider, mode="async", registry=CollectorRegistry()).start()
    remote = Broker(remote_provider, mode="async", registry=CollectorRegistry()).start()
    assert local.buffer_size == 1000
    local_seen: set[str] = set()
    remote_seen: set[str] = set()
    lock = threading.Lock()

    def on_local(e: Event) -> None:
        with lock:
            local_seen.add(e.id)

    def on_remote(e: Event) -> None:
        with lock:
            remote_seen.add(e.id)

    local.subscribe("*.wp_rows.create", on_local)
    remote.subscribe("*.wp_rows.create", on_remote)
    factory = sessionmaker(engine)
    handle = register_crud_hooks(factory, broker=local)
    try:
        with factory() as s, s.begin():
            s.add_all(_Row(name=f"r{i}") for i in range(n))
        assert _wait_for(lambda: len(local_seen) == n, 60), len(local_seen)
        assert _wait_for(lambda: len(remote_seen) == n, 60), len(remote_seen)
        assert local_seen == remote_seen
        local.flush_statuses()
        assert _wait_for(lambda: len(local_provider.list(
            EventFilter(status=EventStatus.COMPLETED, limit=n))) == n, 30)
    finally:
        handle.remove()
        local.stop()
        remote.stop()
        local_provider.drop_schema()
        local_provider.close()
        remote_provider.close()
        with Session(engine) as s, s.begin():
            s.execute(sa.text("DROP TABLE IF EXISTS wp_rows"))
        engine.dispose()


def test_captured_transaction__larger_than_the_queue_in_memory() -> None:
    """Without an outbox too: a captured batch larger than ``buffer_size`` is dispatched whole
    (it overflows into a backlog), while ``publish_async`` still refuses past the buffer."""
    engine = sa.create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    broker = Broker(MemoryProvider(max_events=5000), mode="async", buffer_size=10,
                    worker_count=2, registry=CollectorRegistry()).start()
    seen: list[str] = []
    gate = threading.Event()

    def slow(e: Event) -> None:
        gate.wait(5)
        seen.append(e.id)

    broker.subscribe("*.wp_rows.create", slow)
    factory = sessionmaker(engine)
    handle = register_crud_hooks(factory, broker=broker)
    try:
        with factory() as s, s.begin():
            s.add_all(_Row(name=f"r{i}") for i in range(500))
        from sqlalchemy_eventbroker import QueueFull

        broker.subscribe("q.*", lambda e: None)
        with pytest.raises(QueueFull):
            broker.publish_async(new_event(EventSource.SYSTEM, "q.x"))
        gate.set()
        assert _wait_for(lambda: len(seen) == 500, 30), len(seen)
    finally:
        gate.set()
        handle.remove()
        broker.stop()


def test_captured_transaction__postgres_sees_no_notify_inside_it(postgres_url: str) -> None:
    """On PostgreSQL a captured transaction with outbox rows commits without NOTIFY: every
    notification the server delivers on the channel comes from another backend (the
    provider's announcer), never from the application's connection."""
    import psycopg

    from sqlalchemy_eventbroker.providers.database import DatabaseProvider

    engine = sa.create_engine(postgres_url)
    _Base.metadata.create_all(engine)
    provider = DatabaseProvider(engine, table_name="wp_notify", channel="wp_notify_channel")
    provider.create_schema()
    broker = Broker(provider, mode="sync", registry=CollectorRegistry()).start()
    factory = sessionmaker(engine)
    handle = register_crud_hooks(factory, broker=broker)
    url = sa.make_url(postgres_url)
    listener = psycopg.connect(host=url.host, port=url.port or 5432, dbname=url.database,
                               user=url.username or "postgres", autocommit=True)
    try:
        listener.execute("LISTEN wp_notify_channel")
        app_pids: set[int] = set()
        for i in range(5):
            with factory() as s, s.begin():
                app_pids.add(s.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
                s.add(_Row(name=f"n{i}"))
        assert len(provider.list(EventFilter(type_pattern="*.wp_rows.create"))) == 5
        senders: set[int] = set()
        deadline = time.monotonic() + 10
        while not senders and time.monotonic() < deadline:
            for note in listener.notifies(timeout=0.5, stop_after=1):
                senders.add(note.pid)
        assert senders, "the announcer sent no wake-up after the commits"
        assert not senders & app_pids, (senders, app_pids)
    finally:
        listener.close()
        handle.remove()
        broker.stop()
        provider.drop_schema()
        provider.close()
        with Session(engine) as s, s.begin():
            s.execute(sa.text("DROP TABLE IF EXISTS wp_rows"))
        engine.dispose()


# -- handlers that raise BaseException ---------------------------------------------------


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_sync_handler_base_exception__event_failed_and_exception_propagates(
    exc_type: type[BaseException],
) -> None:
    """Sync mode: a handler raising KeyboardInterrupt/SystemExit is not retried, the stored
    event ends ``failed`` naming it, and the exception still reaches the caller."""
    calls = 0
    with _broker(retry_policy=RetryPolicy(max_retries=3, initial_delay=0.001)) as broker:

        def stop(event: Event) -> None:
            nonlocal calls
            calls += 1
            raise exc_type()

        broker.subscribe("k.*", stop)
        event = new_event(EventSource.SYSTEM, "k.x")
        with pytest.raises(exc_type):
            broker.publish_sync(event)
        assert calls == 1
        stored = broker.provider.get(event.id)
        assert stored is not None and stored.status is EventStatus.FAILED
        assert exc_type.__name__ in stored.error
        assert broker.stats().total_failed == 1


def test_async_handler_base_exception__event_failed_and_stop_is_prompt() -> None:
    """Async mode: a handler raising SystemExit fails its event (not left pending) and the
    job is released, so ``stop(timeout)`` returns without waiting the full timeout."""
    done = threading.Event()
    broker = _broker(mode="async", worker_count=2).start()

    def bye(event: Event) -> None:
        done.set()
        raise SystemExit(3)

    broker.subscribe("k.*", bye)
    event = new_event(EventSource.SYSTEM, "k.y")
    broker.publish(event)
    assert done.wait(5)
    assert _wait_for(lambda: broker.stats().total_failed == 1, 5)
    started = time.monotonic()
    broker.stop(timeout=20)
    assert time.monotonic() - started < 5
    stored = broker.provider.get(event.id)
    assert stored is not None and stored.status is EventStatus.FAILED
    assert "SystemExit" in stored.error


@pytest.mark.parametrize(("kw", "name"), [
    ({"worker_count": 1025}, "worker_count"),
    ({"buffer_size": 10_000_001}, "buffer_size"),
    ({"instance_id": "x" * 256}, "instance_id"),
])
def test_broker__bounds_as_the_configuration_file(kw: dict[str, Any], name: str) -> None:
    """``Broker()`` refuses what a configuration file would (an instance_id longer than an
    event can carry would otherwise fail every publish later)."""
    from sqlalchemy_eventbroker import ConfigError

    with pytest.raises(ConfigError, match=name):
        Broker(MemoryProvider(), registry=CollectorRegistry(), **kw)
