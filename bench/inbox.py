"""Inbox overhead: a handler doing one INSERT in its own transaction, with and without
``@inbox.handler``.

The plain handler opens a session, begins, inserts one row into ``bench_effects`` and commits.
The inbox handler does the same work through ``Inbox.handler``, which adds one statement to
the transaction (``INSERT ... ON CONFLICT DO NOTHING RETURNING`` into the inbox table, whose
primary key is ``(consumer, event_id)``). Handlers are called directly, ``n`` distinct events
each, so the figure is the inbox itself and not the broker. Variants are interleaved run by
run on freshly created tables; the median per event is reported. An info row gives the cost
of a redelivery the inbox skips (the insert finds the row; the function is not called).
On SQLite (a file, default ``synchronous``) and PostgreSQL (a database created for the run).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_eventbroker import Event, EventSource, new_event

from ._env import PG_ADMIN_URL, fresh_pg_engine, optional, reachable, sqlite_file_engine
from ._report import INFO, Row, median, na_row, profile_call, ratio_row, us

SECTION = "Inbox overhead (one INSERT per event in its own transaction)"
#: The inbox adds one statement (a round trip, a heap row and an index entry) to a transaction
#: of BEGIN, one INSERT and COMMIT: on PostgreSQL that is a third more round trips plus WAL.
TARGET = 1.8

_metadata = sa.MetaData()
effects = sa.Table(
    "bench_effects", _metadata,
    sa.Column("n", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(64), nullable=False),
)


def _work(event: Event, session: Session) -> None:
    session.execute(effects.insert().values(event_id=event.id))


def _plain(factory: sessionmaker[Session]) -> Callable[[Event], None]:
    def handler(event: Event) -> None:
        with factory() as session, session.begin():
            _work(event, session)

    return handler


class _Unavailable(Exception):
    pass


def _inbox(factory: sessionmaker[Session]) -> tuple[Callable[[Event], None], object]:
    inbox_cls, why = optional("inbox", "Inbox")
    if inbox_cls is None:
        raise _Unavailable(why)
    box = inbox_cls(factory, consumer="bench")
    box.create_schema()
    return box.handler(_work), box


def _reset(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS eventbroker_inbox")
    _metadata.drop_all(engine)
    _metadata.create_all(engine)


def _events(n: int) -> list[Event]:
    return [new_event(EventSource.INTERNAL, "bench.orders.create", payload={"i": i})
            for i in range(n)]


def _measure(engine: sa.Engine, variant: str, n: int) -> tuple[float, float]:
    """Seconds per event for ``n`` first deliveries, and (inbox) per skipped redelivery."""
    _reset(engine)
    factory = sessionmaker(engine)
    handler = _plain(factory) if variant == "plain" else _inbox(factory)[0]
    events = _events(n)
    gc.collect()
    t0 = time.perf_counter()
    for e in events:
        handler(e)
    t1 = time.perf_counter()
    skip = float("nan")
    if variant == "inbox":
        for e in events:
            handler(e)
        skip = (time.perf_counter() - t1) / n
    return (t1 - t0) / n, skip


def _backend_rows(label: str, engine: sa.Engine, n: int, runs: int) -> list[Row]:
    first: dict[str, list[float]] = {"plain": [], "inbox": []}
    skips: list[float] = []
    try:
        for _ in range(runs):
            for v in ("plain", "inbox"):
                per_event, skip = _measure(engine, v, n)
                first[v].append(per_event)
                if v == "inbox":
                    skips.append(skip)
    except _Unavailable as exc:
        return [na_row(SECTION, f"{label}: @inbox.handler vs plain handler", str(exc),
                       target=f"≤ {TARGET:g}×")]
    plain = median(first["plain"]) * 1e6
    boxed = median(first["inbox"]) * 1e6
    row = ratio_row(SECTION, f"{label}: @inbox.handler vs plain handler", boxed, plain, us,
                    at_most=TARGET, note=f"{n:,} events, one transaction each; "
                                         f"{boxed - plain:+,.0f} µs per event")
    row.profiler = lambda: profile_call(lambda: _measure(engine, "inbox", min(n, 500)))
    skip = median(skips) * 1e6
    info = Row(SECTION, f"{label}: redelivery skipped by the inbox", us(skip), us(plain),
               f"{skip / plain:.2f}×", "", INFO, "the function is not called")
    return [row, info]


def run(quick: bool, runs: int, profile_failures: Callable[[list[Row]], None]) -> list[Row]:
    n = 300 if quick else 2_000
    rows: list[Row] = []
    with sqlite_file_engine() as engine:
        part = _backend_rows("SQLite file", engine, n, runs)
        profile_failures(part)
        rows += part
    if not reachable(PG_ADMIN_URL):
        rows.append(na_row(SECTION, "PostgreSQL", f"server not reachable at {PG_ADMIN_URL}"))
        return rows
    with fresh_pg_engine() as engine:
        part = _backend_rows("PostgreSQL", engine, n, runs)
        profile_failures(part)
        rows += part
    return rows
