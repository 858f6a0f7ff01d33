"""Capture overhead: ORM inserts, updates and deletes with and without ``register_crud_hooks``.

One ``Session(expire_on_commit=False)`` writes ``n`` objects 100 per commit, then updates
each of them (100 per commit), then deletes them (100 per commit); the figure is the mean
time per operation over the 3·n operations. Baseline: the same session without capture.
Variants: capture into a broker on a ``MemoryProvider`` with no subscriber (SQLite and
PostgreSQL), and (PostgreSQL) capture into a ``DatabaseProvider`` on the same database, whose
rows are written in the session's own transaction (the outbox), at 100 rows per transaction
and again at 1 row per transaction (``n_single`` objects, every insert, update and delete its
own commit; against the plain ORM doing the same). Variants are interleaved run by run, each
on freshly created tables, and the median of the runs is reported.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_eventbroker import Broker, MemoryProvider

from ._env import PG_ADMIN_URL, fresh_pg_engine, optional, reachable, sqlite_file_engine
from ._report import Row, median, na_row, profile_call, ratio_row, us

SECTION = "1. ORM capture overhead (mean per insert/update/delete)"
TARGET_MEMORY = 1.15
#: Outbox targets by rows per transaction.
TARGET_OUTBOX = {100: 1.35, 1: 1.25}
PER_COMMIT = 100


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    email: Mapped[str] = mapped_column(sa.String(200))
    score: Mapped[int] = mapped_column(sa.Integer)
    active: Mapped[bool] = mapped_column(sa.Boolean)
    note: Mapped[str | None] = mapped_column(sa.Text, nullable=True)


def workload(factory: sessionmaker[Session], n: int,
             per_commit: int = PER_COMMIT) -> tuple[float, float, float]:
    """Seconds spent inserting, updating and deleting ``n`` objects, ``per_commit`` per commit."""
    objs = [Item(name=f"user-{i}", email=f"user{i}@example.com", score=i, active=True,
                 note="created by the benchmark") for i in range(n)]
    with factory() as s:
        t0 = time.perf_counter()
        for start in range(0, n, per_commit):
            s.add_all(objs[start:start + per_commit])
            s.commit()
        t1 = time.perf_counter()
        for start in range(0, n, per_commit):
            for o in objs[start:start + per_commit]:
                o.score += 1
                o.name = o.name + "!"
            s.commit()
        t2 = time.perf_counter()
        for start in range(0, n, per_commit):
            for o in objs[start:start + per_commit]:
                s.delete(o)
            s.commit()
        t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


@contextmanager
def _variant(name: str, engine: sa.Engine, factory: sessionmaker[Session],
             tag: str) -> Iterator[None]:
    """Set up capture for ``name`` (``plain``, ``memory``, ``outbox``) and tear it down."""
    if name == "plain":
        yield
        return
    register, why = optional("capture", "register_crud_hooks")
    config_cls, _ = optional("capture", "CRUDHookConfig")
    if register is None or config_cls is None:
        raise _Unavailable(why)
    if name == "memory":
        provider: Any = MemoryProvider()
    else:
        database_provider, why = optional("providers.database", "DatabaseProvider")
        if database_provider is None:
            raise _Unavailable(why)
        provider = database_provider(engine, table_name=f"events_{tag}")
        provider.create_schema()
    broker = Broker(provider, registry=CollectorRegistry(), instance_id="bench",
                    close_provider=True)
    broker.start()
    handle = register(factory, config_cls(), broker=broker)
    try:
        yield
    finally:
        handle.remove()
        broker.stop()
        if name == "outbox":
            with engine.begin() as conn:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS events_{tag}")


class _Unavailable(Exception):
    pass


def _measure(engine: sa.Engine, variant: str, n: int,
             per_commit: int = PER_COMMIT) -> tuple[float, float, float]:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine, expire_on_commit=False)
    tag = uuid.uuid4().hex[:8]
    with _variant(variant, engine, factory, tag):
        gc.collect()
        return workload(factory, n, per_commit)


def _backend_rows(label: str, engine: sa.Engine, variants: list[str], n: int,
                  runs: int, per_commit: int = PER_COMMIT) -> list[Row]:
    times: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    missing: dict[str, str] = {}
    for _ in range(runs):
        for v in variants:
            if v in missing:
                continue
            try:
                times[v].append(_measure(engine, v, n, per_commit))
            except _Unavailable as exc:
                missing[v] = str(exc)
    ops = 3 * n

    def per_op(v: str) -> float:
        return median([sum(t) for t in times[v]]) / ops * 1e6

    def phases(v: str) -> str:
        parts = []
        for k, phase in enumerate(("insert", "update", "delete")):
            lib = median([t[k] for t in times[v]])
            raw = median([t[k] for t in times["plain"]])
            parts.append(f"{phase} {lib / raw:.2f}×")
        return ", ".join(parts)

    rows = []
    rows_per_tx = f"{per_commit} row{'s' if per_commit > 1 else ''} per transaction"
    titles = {"memory": f"{label}: capture → MemoryProvider, no subscriber",
              "outbox": f"{label}: capture → DatabaseProvider outbox (same DB), {rows_per_tx}"}
    targets = {"memory": TARGET_MEMORY, "outbox": TARGET_OUTBOX[per_commit]}
    plain = per_op("plain")
    for v in variants[1:]:
        if v in missing:
            rows.append(na_row(SECTION, titles[v], missing[v], raw=us(plain),
                               target=f"≤ {targets[v]:g}×"))
            continue
        row = ratio_row(SECTION, titles[v], per_op(v), plain, us, at_most=targets[v],
                        note=f"{n:,} objects; {phases(v)}")
        row.profiler = _profiler(engine, v, min(n, 2_000), per_commit)
        rows.append(row)
    return rows


def _profiler(engine: sa.Engine, variant: str, n: int,
              per_commit: int = PER_COMMIT) -> Callable[[], str]:
    # Only called while the engine's database still exists: __main__ profiles right after
    # the measurement returns, inside run().
    def go() -> str:
        return profile_call(lambda: _measure(engine, variant, n, per_commit))

    return go


def run(quick: bool, runs: int, profile_failures: Callable[[list[Row]], None]) -> list[Row]:
    n = 2_000 if quick else 20_000
    #: Objects for the 1-row-per-transaction outbox row (3 commits per object).
    n_single = 300 if quick else 1_500
    rows: list[Row] = []
    # SQLite file.
    with sqlite_file_engine() as engine:
        part = _backend_rows("SQLite file", engine, ["plain", "memory"], n, runs)
        profile_failures(part)
        rows += part
    # PostgreSQL, a database created for this run.
    if not reachable(PG_ADMIN_URL):
        rows.append(na_row(SECTION, "PostgreSQL", f"server not reachable at {PG_ADMIN_URL}"))
        return rows
    with fresh_pg_engine() as engine:
        part = _backend_rows("PostgreSQL", engine, ["plain", "memory", "outbox"], n, runs)
        profile_failures(part)
        rows += part
        part = _backend_rows("PostgreSQL", engine, ["plain", "outbox"], n_single, runs,
                             per_commit=1)
        profile_failures(part)
        rows += part
    return rows
