"""DatabaseProvider on real PostgreSQL and SQLite: the conformance suite, then what only a
database provider promises (gap-free commit order, outbox, audit queries, errors, reconnects)."""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_eventbroker import EventFilter, EventStatus, matches, new_event
from sqlalchemy_eventbroker.errors import EventValidationError, PayloadError, ProviderError
from sqlalchemy_eventbroker.event import Event
from sqlalchemy_eventbroker.providers import database
from sqlalchemy_eventbroker.providers.database import DatabaseProvider, _listener

from .conformance import ProviderConformance, ProviderFactory

UTC = dt.UTC


def _factory(url: str, **kw: Any) -> Iterator[ProviderFactory]:
    made: list[DatabaseProvider] = []

    def make() -> DatabaseProvider:
        p = DatabaseProvider(url, poll_interval=0.05, **kw)
        if not made:
            p.create_schema()
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


class TestDatabaseProviderSQLite(ProviderConformance):
    #: Events and group cursors live in the database file.
    durable_across_restart = True

    @pytest.fixture
    def provider_factory(self, sqlite_url: str) -> Iterator[ProviderFactory]:
        yield from _factory(sqlite_url)


class TestDatabaseProviderPostgres(ProviderConformance):
    #: Events and group cursors live in the database.
    durable_across_restart = True

    @pytest.fixture
    def provider_factory(self, postgres_url: str) -> Iterator[ProviderFactory]:
        yield from _factory(postgres_url)


# -- helpers and fixtures ----------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]



def _ev(type_: str = "public.items.create", **payload: Any) -> Event:
    return new_event("database", type_, payload or None)


def _until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def _drain(stream: Any, count: int, timeout: float = 5.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and (left := deadline - time.monotonic()) > 0:
        item = stream.receive(timeout=min(left, 0.5))
        if item is not None:
            got.append(item)
    return got


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database of each kind."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def provider(db_url: str) -> Iterator[DatabaseProvider]:
    with DatabaseProvider(db_url, poll_interval=0.05) as p:
        p.create_schema()
        yield p


@pytest.fixture
def pg(postgres_url: str) -> Iterator[DatabaseProvider]:
    with DatabaseProvider(postgres_url) as p:
        p.create_schema()
        yield p


# -- commit order without gaps ---------------------------------------------------------------


def _seq_of(p: DatabaseProvider, event_id: str) -> int:
    with p.engine.connect() as conn:
        return int(conn.execute(sa.select(p.tables.events.c.seq).where(
            p.tables.events.c.id == event_id)).scalar_one())


def test_commit_order__lower_seq_committed_last_is_not_skipped(pg: DatabaseProvider) -> None:
    """A row whose transaction commits after a higher-seq row is still delivered, once."""
    stream = pg.stream("*")
    slow, fast = _ev(n=1), _ev(n=2)
    with pg.engine.connect() as c1, pg.engine.connect() as c2:
        t1 = c1.begin()
        pg.write_in_transaction(c1, [slow])          # takes the lower seq...
        with c2.begin():
            pg.write_in_transaction(c2, [fast])      # ...this one the higher, and commits first
        assert _seq_of(pg, fast.id) > 0
        assert stream.receive(timeout=0.5) is None   # held back: slow may still commit
        t1.commit()
    got = _drain(stream, 2) + _drain(stream, 1, timeout=0.3)
    assert [e.id for e in got] == [slow.id, fast.id]
    assert _seq_of(pg, slow.id) < _seq_of(pg, fast.id)


def test_commit_order__held_back_row_released_when_blocker_ends_without_notify(
    pg: DatabaseProvider,
) -> None:
    """A row held back by an unrelated open write transaction arrives once it ends (no NOTIFY)."""
    stream = pg.stream("*")
    with pg.engine.connect() as blocker:
        tx = blocker.begin()
        blocker.execute(sa.text("SELECT pg_current_xact_id()"))  # an older writing transaction
        e = _ev()
        pg.store(e)
        assert stream.receive(timeout=0.3) is None
        tx.commit()
    assert [x.id for x in _drain(stream, 1)] == [e.id]


def test_commit_order__group_does_not_skip_a_late_lower_seq(pg: DatabaseProvider) -> None:
    """A consumer group's cursor never passes a lower-seq row that commits late."""
    gs = pg.group_stream("*", "late", lease=5)
    slow, fast = _ev(n=1), _ev(n=2)
    with pg.engine.connect() as c1:
        t1 = c1.begin()
        pg.write_in_transaction(c1, [slow])
        pg.store(fast)
        assert gs.receive(timeout=0.3) is None
        t1.commit()
    got = _drain(gs, 2)
    for d in got:
        d.ack()
    assert sorted(d.event.id for d in got) == sorted([slow.id, fast.id])
    assert gs.receive(timeout=0.2) is None


def test_start__exact_while_an_older_transaction_runs(pg: DatabaseProvider) -> None:
    """Rows committed before a stream/group opened stay out even if xmin lags behind them."""
    with pg.engine.connect() as blocker:
        tx = blocker.begin()
        blocker.execute(sa.text("SELECT pg_current_xact_id()"))  # holds xmin back
        before = _ev(n=0)
        pg.store(before)                                          # committed, tx_id > xmin
        stream = pg.stream("*")
        gs = pg.group_stream("*", "exact", lease=5)
        after = _ev(n=1)
        pg.store(after)
        tx.commit()
    assert [e.id for e in _drain(stream, 2, timeout=1.0)] == [after.id]
    got = _drain(gs, 2, timeout=1.0)
    assert [d.event.id for d in got] == [after.id]
    got[0].ack()


def test_commit_order__many_concurrent_writers_lose_nothing(pg: DatabaseProvider) -> None:
    """Four threads committing interleaved transactions: the stream gets every row once."""
    import threading

    stream = pg.stream("*")
    sent: list[str] = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        for i in range(40):
            batch = [_ev(w=k, i=i, j=j) for j in range(3)]
            with pg.engine.begin() as conn:
                pg.write_in_transaction(conn, batch)
            pg.announce_committed(batch)
            with lock:
                sent.extend(e.id for e in batch)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = _drain(stream, len(sent), timeout=10) + _drain(stream, 1, timeout=0.3)
    assert Counter(e.id for e in got) == Counter(sent)
    per_writer: dict[int, list[int]] = {}
    for e in got:
        per_writer.setdefault(e.payload["w"], []).append(e.payload["i"] * 3 + e.payload["j"])
    assert all(v == sorted(v) for v in per_writer.values())  # each writer's commit order


# -- batched status writes --------------------------------------------------------------------


def test_update_status_many__one_statement_same_semantics_as_update_status(
    provider: DatabaseProvider,
) -> None:
    """One UPDATE for the batch; timestamps and retry_count as update_status sets them;
    unknown and malformed ids ignored; for a repeated id the last item wins."""
    from sqlalchemy_eventbroker.providers.base import StatusUpdate

    events = [_ev(i=i) for i in range(6)]
    provider.store_and_publish_many(events)
    provider.update_status(events[2].id, EventStatus.PROCESSING)
    before = provider.get(events[2].id)
    assert before is not None and before.processed_at is not None
    statements: list[str] = []

    def seen(*a: Any) -> None:
        statements.append(a[2])

    sa.event.listen(provider.engine, "before_cursor_execute", seen)
    try:
        provider.update_status_many([
            StatusUpdate(events[0].id, EventStatus.COMPLETED, "", 0),
            StatusUpdate(events[1].id, EventStatus.FAILED, "boom", 3),
            StatusUpdate(events[2].id, EventStatus.COMPLETED),
            StatusUpdate(events[3].id, EventStatus.PROCESSING, "", None),
            StatusUpdate(events[4].id, EventStatus.FAILED, "first", 1),
            StatusUpdate(events[4].id, EventStatus.COMPLETED, "", 2),
            StatusUpdate(new_event("database", "x.y").id, EventStatus.COMPLETED),
            StatusUpdate("not-a-uuid", EventStatus.COMPLETED),
        ])
    finally:
        sa.event.remove(provider.engine, "before_cursor_execute", seen)
    updates = [st for st in statements if st.lstrip().upper().startswith("UPDATE")]
    assert len(updates) == 1
    got = {e.id: e for e in provider.list(EventFilter())}
    e0, e1, e2, e3, e4, e5 = (got[e.id] for e in events)
    assert (e0.status, e0.retry_count, e0.error) == (EventStatus.COMPLETED, 0, "")
    assert e0.processed_at is not None and e0.completed_at is not None
    assert (e1.status, e1.retry_count, e1.error) == (EventStatus.FAILED, 3, "boom")
    assert e1.completed_at is not None
    assert e2.status is EventStatus.COMPLETED
    assert e2.processed_at == before.processed_at  # kept: it was set earlier
    assert e2.completed_at is not None and e2.completed_at >= e2.processed_at
    assert e3.status is EventStatus.PROCESSING and e3.retry_count == 0
    assert e3.processed_at is not None and e3.completed_at is None
    assert (e4.status, e4.retry_count) == (EventStatus.COMPLETED, 2)
    assert e5.status is EventStatus.PENDING and e5.processed_at is None
    provider.update_status_many([])  # nothing to do


# -- transactional outbox ----------------------------------------------------------------------


def test_outbox__one_statement_per_call_and_rollback_leaves_nothing(
    provider: DatabaseProvider,
) -> None:
    """``write_in_transaction`` is one statement; a rollback takes the rows with it."""
    stream = provider.stream("*")
    events = [_ev(i=i) for i in range(50)]
    statements: list[str] = []
    with provider.engine.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute",
                        lambda *a: statements.append(a[2]))
        tx = conn.begin()
        provider.write_in_transaction(conn, events)
        tx.rollback()
    own = [st for st in statements
           if not re.match(r"\s*(SAVEPOINT|RELEASE|ROLLBACK TO|BEGIN)\b", st, re.IGNORECASE)]
    assert len(own) == 1 and "INSERT" in own[0].upper()  # (+ the savepoint's statements)
    assert provider.list(EventFilter()) == []
    assert stream.receive(timeout=0.3) is None
    with provider.engine.begin() as conn:
        provider.write_in_transaction(conn, events)
    provider.announce_committed(events)
    got = _drain(stream, 50)
    assert [e.id for e in got] == [e.id for e in events]
    assert stream.receive(timeout=0.3) is None


def test_outbox__data_and_events_commit_together(provider: DatabaseProvider) -> None:
    """An ORM session's data row and its event rows commit in the same transaction."""
    Base.metadata.create_all(provider.engine)
    with Session(provider.engine) as s, s.begin():
        s.add(Item(name="ada"))
        s.flush()
        assert provider.shares_transaction(s.connection())
        provider.write_in_transaction(s.connection(), [_ev("public.items.create", name="ada")])
    with Session(provider.engine) as s:
        s.add(Item(name="bob"))
        s.flush()
        provider.write_in_transaction(s.connection(), [_ev("public.items.create", name="bob")])
        s.rollback()
    assert [e.payload for e in provider.list(EventFilter())] == [{"name": "ada"}]
    with Session(provider.engine) as s:
        assert [i.name for i in s.query(Item)] == ["ada"]
    Base.metadata.drop_all(provider.engine)


def test_outbox__failing_write_leaves_the_callers_transaction_usable(
    provider: DatabaseProvider,
) -> None:
    """A write that fails inside the database (here: a duplicate id) undoes only itself:
    ProviderError, and the caller's earlier and later work in the transaction commits."""
    Base.metadata.create_all(provider.engine)
    try:
        stored = _ev(n=0)
        provider.store(stored)
        with Session(provider.engine) as s, s.begin():
            s.add(Item(name="before"))
            s.flush()
            good = _ev(n=1)
            provider.write_in_transaction(s.connection(), [good])
            marker = "-".join(["hidden", "payload"])  # (the source line shows no value)
            with pytest.raises(ProviderError) as info:
                provider.write_in_transaction(s.connection(), [_ev(n=2, note=marker), stored])
            shown = "".join(traceback.format_exception(info.value))
            assert marker not in shown  # not in the message, nor in the chained error
            s.add(Item(name="after"))
            s.flush()
            again = _ev(n=3)
            provider.write_in_transaction(s.connection(), [again])
        with Session(provider.engine) as s:
            assert sorted(i.name for i in s.query(Item)) == ["after", "before"]
        ids = {e.id for e in provider.list(EventFilter())}
        assert ids == {stored.id, good.id, again.id}
    finally:
        Base.metadata.drop_all(provider.engine)


def _listen(p: DatabaseProvider) -> psycopg.Connection[Any]:
    """A plain psycopg connection LISTENing on the provider's channel."""
    cargs = p.engine.url.translate_connect_args(username="user", database="dbname")
    conn = psycopg.connect(**cargs, autocommit=True)
    conn.execute(f'LISTEN "{p.channel}"')
    return conn


def _notifications(listen: psycopg.Connection[Any], done: Callable[[list[Any]], bool],
                   timeout: float = 5.0) -> list[Any]:
    """Notifications received until ``done(received)`` or the deadline (then whatever came)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while not done(got) and (left := deadline - time.monotonic()) > 0:
        got += list(listen.notifies(timeout=min(left, 0.05)))
    return got


def test_outbox__no_notify_inside_the_application_transaction(pg: DatabaseProvider) -> None:
    """Three flushes in one application transaction: the server sees no NOTIFY from that
    connection; after commit ``announce_committed`` makes the announcer send the wake-up."""
    with _listen(pg) as listen:
        with pg.engine.connect() as conn:
            app_pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            for i in range(3):
                pg.write_in_transaction(conn, [_ev(i=i), _ev(i=i)])
            conn.commit()
        assert list(listen.notifies(timeout=0.2)) == []  # committed, nothing announced yet
        pg.announce_committed([_ev()])
        got = _notifications(listen, bool)
    assert got, "the announcer never notified"
    assert all(n.pid != app_pid for n in got)
    assert all((n.channel, n.payload) == (pg.channel, pg.table_name) for n in got)
    assert {n.pid for n in got} == {pg.stats().provider_specific["announcer_pid"]}


def test_store_and_publish_many__notify_comes_from_the_announcer_only(pg: DatabaseProvider) -> None:
    """The insert statement notifies nothing: every wake-up comes from another backend."""
    writers: set[int] = set()

    def seen(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            writers.add(conn.connection.driver_connection.info.backend_pid)

    sa.event.listen(pg.engine, "before_cursor_execute", seen)
    try:
        with _listen(pg) as listen:
            pg.store_and_publish_many([_ev(i=i) for i in range(5)])
            got = _notifications(listen, bool)
    finally:
        sa.event.remove(pg.engine, "before_cursor_execute", seen)
    assert writers and got
    assert not {n.pid for n in got} & writers
    assert pg.stats().total_events == 5


def test_announcer__concurrent_commits_coalesce(pg: DatabaseProvider) -> None:
    """200 commits from 8 threads, each announced: fewer notifications than commits, at
    least one, none from an application connection, and every event delivered."""
    import threading

    stream = pg.stream("*")
    app_pids: set[int] = set()
    lock = threading.Lock()

    def writer(k: int) -> None:
        for i in range(25):
            batch = [_ev(w=k, i=i)]
            with pg.engine.begin() as conn:
                pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                pg.write_in_transaction(conn, batch)
            pg.announce_committed(batch)
            with lock:
                app_pids.add(pid)

    with _listen(pg) as listen:
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = [n for n in _notifications(
            listen, lambda got: len([n for n in got if n.payload == pg.table_name])
            == pg.stats().provider_specific["announcements"] > 0
        ) if n.payload == pg.table_name]  # (not the listener's self-test)
    assert 1 <= len(got) < 200
    assert not {n.pid for n in got} & app_pids
    assert len(_drain(stream, 200, timeout=10)) == 200


def test_announcer__terminated_connection_reconnects(postgres_url: str) -> None:
    """``pg_terminate_backend`` on the announcer's connection: the next wake-up still goes
    out (from a new connection), well before a long backstop would have read."""
    with DatabaseProvider(postgres_url, backstop_interval=60) as writer, \
            DatabaseProvider(postgres_url, backstop_interval=60) as reader:
        writer.create_schema()
        stream = reader.stream("*")
        _until(lambda: reader.stats().provider_specific["listener"] == "notify", what="LISTEN")
        first = _ev(n=1)
        writer.store_and_publish_many([first])
        assert [e.id for e in _drain(stream, 1)] == [first.id]
        _until(lambda: writer.stats().provider_specific["announcer_pid"] is not None,
               what="the announcer's connection")
        old = writer.stats().provider_specific["announcer_pid"]
        with writer.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": old}).scalar()
        second = _ev(n=2)
        writer.store_and_publish_many([second])
        assert [e.id for e in _drain(stream, 1, timeout=10)] == [second.id]
        assert writer.stats().provider_specific["announcer_pid"] not in (None, old)


def test_backstop__lost_wake_up_delays_delivery_never_loses_it(postgres_url: str) -> None:
    """A writer whose announcer is gone (it died before announcing): a listener and a group
    member in another provider instance still get the event within the backstop interval."""
    with DatabaseProvider(postgres_url, backstop_interval=0.3) as reader, \
            DatabaseProvider(postgres_url) as writer:
        reader.create_schema()
        stream = reader.stream("*")
        member = reader.group_stream("*", "backstop", lease=5)
        _until(lambda: reader.stats().provider_specific["listener"] == "notify", what="LISTEN")
        assert member.receive(timeout=0.1) is None
        assert writer._announcer is not None
        writer._announcer.stop()  # every later wake-up of the writer is lost
        e = _ev()
        t0 = time.monotonic()
        writer.store_and_publish_many([e])
        assert [x.id for x in _drain(stream, 1, timeout=3)] == [e.id]
        assert time.monotonic() - t0 < 0.3 + 1.5
        d = member.receive(timeout=3)
        assert d is not None and d.event.id == e.id
        d.ack()
        assert writer.stats().provider_specific["announcements"] == 0


def test_write__unstorable_payload_names_the_event_never_the_data(provider: DatabaseProvider) -> None:
    """A payload the backend cannot hold fails before any SQL, naming the event's id and
    never the payload; nothing of the batch is written and the caller's transaction goes on."""
    good, bad = _ev(n=1), _ev(n=2)
    bad.payload = {"note": "secret\x00value"}
    with pytest.raises(PayloadError) as info:
        provider.store_and_publish_many([good, bad])
    assert bad.id in str(info.value) and "secret" not in str(info.value)
    assert provider.get(good.id) is None
    with provider.engine.begin() as conn:
        with pytest.raises(PayloadError, match=bad.id):
            provider.write_in_transaction(conn, [good, bad])
        provider.write_in_transaction(conn, [good])
    assert provider.get(good.id) == good


def test_shares_transaction__same_database_only(db_url: str, provider: DatabaseProvider,
                                                tmp_path: Any) -> None:
    """True for the provider's engine and another engine on the same database, else False."""
    other_same = sa.create_engine(db_url)
    other_db = sa.create_engine(f"sqlite:///{tmp_path}/other.db")
    try:
        with provider.engine.connect() as c:
            assert provider.shares_transaction(c)
        with other_same.connect() as c:
            assert provider.shares_transaction(c)
        with other_db.connect() as c:
            assert not provider.shares_transaction(c)
    finally:
        other_same.dispose()
        other_db.dispose()


# -- store, publish, copies ---------------------------------------------------------------------


def test_publish__again_travels_again(provider: DatabaseProvider) -> None:
    """Publishing a stored, already delivered event (a redrive) delivers it again; stored once."""
    stream = provider.stream("*")
    e = _ev()
    provider.store(e)
    provider.publish(e)
    assert [x.id for x in _drain(stream, 1)] == [e.id]
    e.status = EventStatus.PENDING
    provider.publish(e)
    assert [x.id for x in _drain(stream, 1)] == [e.id]
    assert [x.id for x in provider.list(EventFilter())] == [e.id]


def test_store__mutating_payload_afterwards_is_not_seen(provider: DatabaseProvider) -> None:
    """Nested payload and metadata are copied at ``store`` time."""
    e = new_event("database", "public.t.create", {"a": [1, {"b": 2}]}, metadata={"m": {"x": 1}})
    provider.store(e)
    e.payload["a"][1]["b"] = 99  # type: ignore[index]
    e.metadata["m"]["x"] = 99  # type: ignore[index]
    got = provider.get(e.id)
    assert got is not None and got.payload == {"a": [1, {"b": 2}]}
    assert got.metadata == {"m": {"x": 1}}


def test_store__non_uuid_id_on_postgres__validation_error(pg: DatabaseProvider) -> None:
    """PostgreSQL stores ids as ``uuid``: another id is refused, naming the field."""
    e = _ev()
    e.id = "not-a-uuid"
    with pytest.raises(EventValidationError, match="event.id"):
        pg.store(e)
    assert pg.get("not-a-uuid") is None


def test_close__later_calls_raise_provider_error(db_url: str) -> None:
    """After ``close()`` the provider refuses work with a clear error."""
    p = DatabaseProvider(db_url)
    p.create_schema()
    p.close()
    with pytest.raises(ProviderError, match="closed"):
        p.store(_ev())


# -- audit: list, iterate, purge ----------------------------------------------------------------

TYPES = ["public.users.create", "public.users.delete", "public.orders.create",
         "auth.sessions.create", "public.users.create.extra", "ui", "a.b.x.c", "a.x.c",
         "public.us_rs.create", "public.users%.create"]


@pytest.mark.parametrize("pattern", [
    "*", "ui", "public.users.*", "*.*.create", "public.**", "*.x.**", "a.**", "*.b.*.*",
    "public.us_rs.*", "public.users%.*", "nothing.*",
])
def test_list__type_pattern_in_sql_matches_the_pattern_rules(
    provider: DatabaseProvider, pattern: str
) -> None:
    """``type_pattern`` selects exactly what ``matches`` selects, with limit/offset after it."""
    base = dt.datetime(2024, 1, 1, tzinfo=UTC)
    events = []
    for i, t in enumerate(TYPES * 2):
        e = _ev(t, i=i)
        e.created_at = base + dt.timedelta(seconds=i)
        events.append(e)
    provider.store_and_publish_many(events)
    expected = [e.id for e in events if matches(pattern, e.type)]
    assert [e.id for e in provider.list(EventFilter(type_pattern=pattern))] == expected
    paged = provider.list(EventFilter(type_pattern=pattern, offset=1, limit=3))
    assert [e.id for e in paged] == expected[1:4]


def test_list__type_pattern_uses_the_type_index(pg: DatabaseProvider) -> None:
    """On PostgreSQL a ``prefix.*`` pattern is an index range scan ("C" collation)."""
    t = pg.tables.events
    clause, exact = pg._dialect.type_clause("public.users.*")
    assert exact and clause is not None
    stmt = sa.select(t.c.seq).where(clause)
    sql = str(stmt.compile(pg.engine, compile_kwargs={"literal_binds": True}))
    with pg.engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN " + sql)))
    assert "ix_events_type" in plan


def test_list__every_field_filters(provider: DatabaseProvider) -> None:
    """source, status, user, schema/entity/operation, instance and time combine with AND."""
    base = dt.datetime(2024, 1, 1, tzinfo=UTC)
    a = new_event("database", "public.users.create", user_id=1, instance_id="i1")
    b = new_event("system", "public.users.delete", user_id=2, instance_id="i2")
    c = new_event("database", "auth.sessions.create", user_id=1, instance_id="i1")
    for i, e in enumerate((a, b, c)):
        e.created_at = base + dt.timedelta(minutes=i)
    provider.store_and_publish_many([a, b, c])
    provider.update_status(b.id, EventStatus.FAILED, "x")

    def ids(**kw: Any) -> list[str]:
        return [e.id for e in provider.list(EventFilter(**kw))]

    assert ids(source="database") == [a.id, c.id]
    assert ids(status=EventStatus.FAILED) == [b.id]
    assert ids(user_id=1, schema="auth") == [c.id]
    assert ids(entity="users", operation="create") == [a.id]
    assert ids(instance_id="i2") == [b.id]
    assert ids(start_time=base + dt.timedelta(minutes=1)) == [b.id, c.id]
    assert ids(end_time=base + dt.timedelta(minutes=1), type_pattern="public.**") == [a.id]


def test_iter_events__pages_in_order(provider: DatabaseProvider) -> None:
    """``iter_events`` reads page by page and yields what ``list`` returns, in order."""
    base = dt.datetime(2024, 1, 1, tzinfo=UTC)
    events = []
    for i in range(25):
        e = _ev(i=i)
        e.created_at = base + dt.timedelta(seconds=i // 2)  # ties broken by seq
        events.append(e)
    provider.store_and_publish_many(events)
    assert [e.id for e in provider.iter_events(page_size=4)] == [e.id for e in events]
    flt = EventFilter(offset=5, limit=9)
    assert [e.id for e in provider.iter_events(flt, page_size=4)] == [e.id for e in events[5:14]]


def test_purge__removes_finished_events_older_than(provider: DatabaseProvider) -> None:
    """Only events in the given statuses whose finish (or creation) is older go."""
    old = dt.datetime.now(UTC) - dt.timedelta(days=2)
    done_old, done_new, pending_old = _ev(), _ev(), _ev()
    pending_old.created_at = old
    provider.store_and_publish_many([done_old, done_new, pending_old])
    provider.update_status(done_old.id, EventStatus.COMPLETED)
    provider.update_status(done_new.id, EventStatus.COMPLETED)
    with provider.engine.begin() as conn:
        t = provider.tables.events
        conn.execute(t.update().where(t.c.id == done_old.id).values(completed_at=old))
    assert provider.purge(dt.timedelta(days=1), batch_size=1) == 1
    assert provider.get(done_old.id) is None and provider.get(done_new.id) is not None
    assert provider.purge(3600.0, statuses=None) == 1          # the old pending one
    assert [e.id for e in provider.list(EventFilter())] == [done_new.id]


# -- groups ---------------------------------------------------------------------------------


def test_group__starts_at_the_tail_when_first_opened(provider: DatabaseProvider) -> None:
    """Events stored before a group existed are not delivered to it; later ones are."""
    provider.store(_ev())
    gs = provider.group_stream("*", "tail", lease=5)
    assert gs.receive(timeout=0.2) is None
    e = _ev()
    provider.store(e)
    d = gs.receive(timeout=5)
    assert d is not None and d.event.id == e.id
    d.ack()


def test_group__purged_event_is_skipped(provider: DatabaseProvider) -> None:
    """A claim whose event was deleted meanwhile is dropped, not delivered as nothing."""
    gs = provider.group_stream("*", "purged", lease=5)
    gone, kept = _ev(), _ev()
    provider.store_and_publish_many([gone, kept])
    provider._groups.fill(gs)
    provider.delete(gone.id)
    d = gs.receive(timeout=5)
    assert d is not None and d.event.id == kept.id
    d.ack()
    assert gs.receive(timeout=0.2) is None


# -- PostgreSQL delivery: listener, reconnect, self-test ---------------------------------------


def _terminate_listener(p: DatabaseProvider) -> None:
    pid = p.stats().provider_specific["listener_pid"]
    assert pid
    with p.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()


def test_listener__terminated_connection_loses_and_repeats_nothing(pg: DatabaseProvider) -> None:
    """``pg_terminate_backend`` on the LISTEN connection: every event still arrives once."""
    stream = pg.stream("*")
    _until(lambda: pg.stats().provider_specific["listener"] == "notify", what="LISTEN")
    sent: list[str] = []
    for round_ in range(3):
        batch = [_ev(r=round_, i=i) for i in range(20)]
        pg.store_and_publish_many(batch[:10])
        old = pg.stats().provider_specific["listener_pid"]
        _terminate_listener(pg)
        pg.store_and_publish_many(batch[10:])  # committed while the listener is away
        sent += [e.id for e in batch]
        _until(lambda: pg.stats().provider_specific["listener_pid"] not in (None, old),
               what="a new LISTEN connection")
    got = _drain(stream, len(sent), timeout=10) + _drain(stream, 1, timeout=0.3)
    assert [e.id for e in got] == sent
    assert pg.stats().provider_specific["listener_reconnects"] >= 3


def test_listener__failed_self_test_falls_back_to_polling(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A LISTEN connection that never hears itself logs a warning; events arrive by polling."""
    monkeypatch.setattr(_listener.Listener, "_send_selftest", lambda self, conn, token: None)
    with DatabaseProvider(postgres_url, poll_interval=0.05, selftest_timeout=0.2) as p, \
            caplog.at_level(logging.WARNING, logger=database.__name__):
        p.create_schema()
        stream = p.stream("*")
        _until(lambda: p.stats().provider_specific["listener"] == "poll", what="poll mode")
        assert "falling back to polling" in caplog.text
        e = _ev()
        p.store(e)
        assert [x.id for x in _drain(stream, 1)] == [e.id]


# -- errors ---------------------------------------------------------------------------------


def test_errors__unreachable_server_names_address() -> None:
    """A closed port: ``ProviderError`` says unreachable and names host and port."""
    with pytest.raises(ProviderError, match=r"127\.0\.0\.1:1.*unreachable"):
        DatabaseProvider("postgresql+psycopg://u:secret@127.0.0.1:1/x", connect_timeout=2)


def test_errors__unknown_user_is_a_credentials_error(postgres_server_url: str) -> None:
    """A user the server does not know: ``ProviderError`` says wrong credentials."""
    url = sa.make_url(postgres_server_url).set(username="no_such_user_eb", password="pw")
    with pytest.raises(ProviderError, match="wrong credentials") as info:
        DatabaseProvider(url)
    assert "pw@" not in str(info.value)


def test_errors__missing_database_says_create_it(postgres_server_url: str) -> None:
    """A database that does not exist: the message says so."""
    url = sa.make_url(postgres_server_url).set(database="no_such_db_eb")
    with pytest.raises(ProviderError, match="database does not exist"):
        DatabaseProvider(url)


def test_errors__missing_table_says_run_the_migrations(db_url: str) -> None:
    """Without the table, operations raise ``ProviderError`` telling how to create it."""
    with DatabaseProvider(db_url) as p:
        with pytest.raises(ProviderError, match="run the migrations: python -m "
                                                "sqlalchemy_eventbroker.migrate upgrade"):
            p.store(_ev())
        with pytest.raises(ProviderError, match="create_schema"):
            p.stream("*")


def test_table_name__mixed_case_works_end_to_end(db_url: str) -> None:
    """A mixed-case table name is quoted everywhere: store, stream, group, list, drop."""
    with DatabaseProvider(db_url, table_name="MixedEvents", poll_interval=0.05) as p:
        p.create_schema()
        try:
            stream = p.stream("*")
            member = p.group_stream("*", "mixed", lease=5)
            e = _ev()
            p.store_and_publish_many([e])
            assert [x.id for x in _drain(stream, 1)] == [e.id]
            d = member.receive(timeout=5)
            assert d is not None and d.event.id == e.id
            d.ack()
            member.close()
            p.update_status(e.id, EventStatus.COMPLETED)
            assert [x.status for x in p.list(EventFilter())] == [EventStatus.COMPLETED]
        finally:
            p.drop_schema()
        assert not {"MixedEvents", "MixedEvents_groups", "MixedEvents_claims"} & set(
            sa.inspect(p.engine).get_table_names())


def test_errors__query_password_masked_in_repr_errors_and_hint(postgres_url: str) -> None:
    """``?password=`` and ``sslpassword=`` in the URL never appear in ``repr(provider)``,
    ``repr(Broker)``, ``address`` or the missing-table hint (issue 11, row 4)."""
    from sqlalchemy_eventbroker import Broker, EventFilter

    url = sa.make_url(postgres_url).set(
        password=None, query={"password": "S3cr3tQ", "application_name": "eb"})
    text = url.render_as_string(hide_password=False)
    provider = DatabaseProvider(text, table_name="no_schema_here")
    try:
        broker = Broker(provider, close_provider=False)
        shown = [repr(provider), repr(broker), provider.address]
        with pytest.raises(ProviderError, match="missing") as info:
            provider.list(EventFilter())
        shown.append(str(info.value))
        for s in shown:
            assert "S3cr3tQ" not in s and "password=***" in s, s
    finally:
        provider.close()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"table_name": "e" * 36}, ["table_name", "63 bytes", "eventbroker_alembic_version_"]),
        ({"table_name": "e" * 41}, ["table_name", "63 bytes"]),
        ({"table_name": "bad\x00name"}, ["table_name", "plain name"]),
        ({"channel": "é" * 40}, ["channel", "80 bytes", "63 bytes"]),
        ({"channel": "a\x00b"}, ["channel", "U+0000"]),
        ({"channel": ""}, ["channel"]),
    ],
)
def test_identifiers__checked_up_front_in_bytes(sqlite_url: str, kwargs: dict[str, str],
                                                words: list[str]) -> None:
    """table_name (with every identifier derived from it) and channel are checked in the
    constructor, in UTF-8 bytes, with a ConfigError (a ValueError) naming the 63-byte limit
    (issue 11, row 9)."""
    from sqlalchemy_eventbroker.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        DatabaseProvider(sqlite_url, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_identifiers__longest_names_work_on_postgresql(postgres_url: str) -> None:
    """A 35-character table name and a 63-byte non-ASCII channel create their schema and carry
    an event through LISTEN/NOTIFY on PostgreSQL."""
    p = DatabaseProvider(postgres_url, table_name="T" * 35, channel="é" * 31 + "c")
    try:
        p.create_schema()
        stream = p.stream("*")
        try:
            e = new_event("system", "a.b.c", {"n": 1})
            p.publish(e)
            assert [x.id for x in _drain(stream, 1)] == [e.id]
        finally:
            stream.close()
    finally:
        p.drop_schema()
        p.close()
