"""Concurrent writers on PostgreSQL: commit rate with capture + outbox vs plain SQLAlchemy.

A pool of writer processes (spawned once) goes through phases of ``DURATION`` seconds: 1, 8
and 32 of them each commit one ORM insert per transaction into a small mapped table, as fast
as they can. Variants, interleaved per writer count (order alternating run by run):

* ``plain``: a ``sessionmaker`` without capture;
* ``capture``: ``register_crud_hooks`` on a broker whose ``DatabaseProvider`` outbox lives in
  the same database (each writer process has its own broker, as an application would).

In both variants a listening broker runs in another process: a fan-out subscription on the
same ``DatabaseProvider`` table, counting the distinct events it handles. After every capture
phase the parent waits (up to ``CATCH_UP`` seconds) until the listener has seen every event
committed so far, and warns when it has not. Figure: commits per second summed over the
writers, counted between a common start time and the deadline (all writers connected and
warmed up before the start). Target: capture ≥ 0.8× plain at every writer count. Only the
public API is used, so the measurement survives rewrites of the internals.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from ._env import PG_ADMIN_URL, fresh_pg_database, optional, reachable
from ._procs import _ctx, _Inbox
from ._report import FAIL, Row, median, na_row, profile_call, rate, ratio_row

SECTION = "6. concurrent writers on PostgreSQL (1 ORM insert per transaction, tx/s summed)"
TARGET = 0.8
WRITERS = (1, 8, 32)
#: Seconds per phase (one writer count, one variant); --quick uses DURATION_QUICK.
DURATION, DURATION_QUICK = 4.0, 2.0
#: Transactions each writer commits before the common start (connection, compiled caches).
WARMUP = 20
#: Seconds the listener may take, after a capture phase, to have seen every event.
CATCH_UP = 30.0
TABLE = "bench_writes"


class _Unavailable(Exception):
    pass


class _Base(DeclarativeBase):
    pass


class Write(_Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True)
    writer: Mapped[int] = mapped_column(sa.Integer)
    seq: Mapped[int] = mapped_column(sa.Integer)
    name: Mapped[str] = mapped_column(sa.String(100))


def _capture(engine: Any, factory: Any, events_table: str, instance: str) -> Callable[[], None]:
    """Hook ``factory`` into a broker on a same-database outbox; returns the teardown."""
    from prometheus_client import CollectorRegistry

    from sqlalchemy_eventbroker import Broker

    register, why = optional("capture", "register_crud_hooks")
    config_cls, _ = optional("capture", "CRUDHookConfig")
    provider_cls, why2 = optional("providers.database", "DatabaseProvider")
    if register is None or config_cls is None or provider_cls is None:
        raise _Unavailable(why or why2)
    provider = provider_cls(engine, table_name=events_table)
    broker = Broker(provider, registry=CollectorRegistry(), instance_id=instance,
                    close_provider=True)
    broker.start()
    handle = register(factory, config_cls(), broker=broker)

    def teardown() -> None:
        handle.remove()
        broker.stop()

    return teardown


def _write(session: Any, model: Any, writer: int, seq: int) -> None:
    session.add(model(writer=writer, seq=seq, name=f"writer-{writer}-{seq}"))
    session.commit()


def writer_main(index: int, url: str, events_table: str, cmds: Any, results: Any, go: Any,
                start_at: Any) -> None:
    """One writer process: waits for phase commands, writes during each phase it is in."""
    who = f"w{index}"
    try:
        import sqlalchemy_eventbroker  # noqa: F401 - imported before the first phase

        model = Write
        engine = sa.create_engine(url, pool_size=2, max_overflow=4)
        results.put((who, "alive", os.getpid()))
        seq = 0
        while True:
            cmd = cmds.get(timeout=1800)
            if cmd[0] != "phase":
                break
            _, phase, variant, duration = cmd
            factory = sessionmaker(engine, expire_on_commit=False)
            teardown: Callable[[], None] = lambda: None
            if variant == "capture":
                teardown = _capture(engine, factory, events_table, f"writer-{index}-{os.getpid()}")
            total = counted = 0
            try:
                with factory() as s:
                    for _ in range(WARMUP):
                        seq += 1
                        total += 1
                        _write(s, model, index, seq)
                    results.put((who, "ready", phase))
                    if not go.wait(120):
                        raise TimeoutError("no start signal")
                    start = start_at.value
                    end = start + duration
                    delay = start - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    clock = time.monotonic
                    while True:
                        seq += 1
                        _write(s, model, index, seq)
                        total += 1
                        now = clock()
                        if now >= end:
                            break
                        if now >= start:
                            counted += 1
            finally:
                teardown()
            results.put((who, "done", (phase, counted, total)))
        engine.dispose()
        results.put((who, "closed", None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((who, "error", f"{type(exc).__name__}: {exc}"))


def listener_main(url: str, events_table: str, seen_count: Any, results: Any, stop: Any) -> None:
    """The listening broker: a fan-out subscription counting distinct events."""
    try:
        import threading

        from prometheus_client import CollectorRegistry

        from sqlalchemy_eventbroker import Broker

        provider_cls, why = optional("providers.database", "DatabaseProvider")
        if provider_cls is None:
            raise _Unavailable(why)
        lock = threading.Lock()
        seen: set[str] = set()

        def handler(event: Any) -> None:
            with lock:
                seen.add(str(event.id))
                seen_count.value = len(seen)

        broker = Broker(provider_cls(url, table_name=events_table), registry=CollectorRegistry(),
                        instance_id=f"listener-{os.getpid()}", close_provider=True)
        broker.subscribe("*", handler)
        broker.start()
        results.put(("listener", "ready", None))
        stop.wait(1800)
        broker.stop(timeout=5)
        results.put(("listener", "closed", None))
    except BaseException as exc:  # noqa: BLE001
        results.put(("listener", "error", f"{type(exc).__name__}: {exc}"))


class _Pool:
    """The writer processes, the listener process, and the phases the parent drives."""

    def __init__(self, url: str, events_table: str, size: int) -> None:
        self.results = _ctx.Queue()
        self.go = _ctx.Event()
        self.stop = _ctx.Event()
        self.start_at = _ctx.RawValue("d", 0.0)
        self.seen = _ctx.RawValue("q", 0)
        self.cmds = [_ctx.Queue() for _ in range(size)]
        self.listener = _ctx.Process(target=listener_main, daemon=True,
                                     args=(url, events_table, self.seen, self.results, self.stop))
        self.writers = [
            _ctx.Process(target=writer_main, daemon=True,
                         args=(i, url, events_table, self.cmds[i], self.results, self.go,
                               self.start_at))
            for i in range(size)
        ]
        self.inbox = _Inbox(self.results, [self.listener, *self.writers])
        self.expected = 0  # events committed by capture phases so far (warm-up included)
        self.phase = 0

    def __enter__(self) -> _Pool:
        self.listener.start()
        self.inbox.expect("listener", "ready", 90)
        for p in self.writers:
            p.start()
        for i in range(len(self.writers)):
            self.inbox.expect(f"w{i}", "alive", 180)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for q in self.cmds:
            q.put(("stop",))
        for p in [*self.writers, self.listener]:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)

    def run_phase(self, variant: str, writers: int, duration: float) -> dict[str, Any]:
        self.phase += 1
        self.go.clear()
        for i in range(writers):
            self.cmds[i].put(("phase", self.phase, variant, duration))
        for i in range(writers):
            self.inbox.expect(f"w{i}", "ready", 180)
        self.start_at.value = time.monotonic() + 0.2
        self.go.set()
        counted = total = 0
        for i in range(writers):
            phase, c, t = self.inbox.expect(f"w{i}", "done", duration + 120)
            assert phase == self.phase
            counted += c
            total += t
        out: dict[str, Any] = {"rate": counted / duration, "lost": 0, "catch_up": 0.0}
        if variant == "capture":
            self.expected += total
            t0 = time.monotonic()
            while self.seen.value < self.expected and time.monotonic() - t0 < CATCH_UP:
                time.sleep(0.01)
            out["catch_up"] = time.monotonic() - t0
            out["lost"] = max(0, self.expected - self.seen.value)
            if out["lost"]:
                print(f"WARNING: writers: the listening broker saw {self.seen.value:,} of "
                      f"{self.expected:,} captured events {CATCH_UP:g} s after the phase "
                      f"({writers} writers) ended", file=sys.stderr, flush=True)
                self.expected = self.seen.value  # report each shortfall once
        return out


def _prepare(url: str, events_table: str) -> None:
    provider_cls, why = optional("providers.database", "DatabaseProvider")
    if provider_cls is None or optional("capture", "register_crud_hooks")[0] is None:
        raise _Unavailable(why or "sqlalchemy_eventbroker.capture not available")
    engine = sa.create_engine(url)
    try:
        _Base.metadata.create_all(engine)
        provider = provider_cls(engine, table_name=events_table)
        try:
            provider.create_schema()
        finally:
            provider.close()
    finally:
        engine.dispose()


def _profiler(url: str, events_table: str) -> Callable[[], str]:
    """One capture writer in this process, 1,000 transactions, under cProfile."""

    def go() -> str:
        model = Write
        engine = sa.create_engine(url)
        factory = sessionmaker(engine, expire_on_commit=False)
        teardown = _capture(engine, factory, events_table, "bench-profile")

        def work() -> None:
            with factory() as s:
                for i in range(1_000):
                    _write(s, model, -1, i)

        try:
            return "one capture writer, 1,000 transactions:\n" + profile_call(work)
        finally:
            teardown()
            engine.dispose()

    return go


def run(quick: bool, runs: int, profile_failures: Callable[[list[Row]], None]) -> list[Row]:
    duration = DURATION_QUICK if quick else DURATION
    titles = {w: f"PostgreSQL: {w} writer process{'es' if w > 1 else ''}, capture → outbox "
                 "vs plain ORM" for w in WRITERS}
    target = f"≥ {TARGET:g}×"
    if not reachable(PG_ADMIN_URL):
        return [na_row(SECTION, titles[w], f"server not reachable at {PG_ADMIN_URL}",
                       target=target) for w in WRITERS]
    events_table = f"events_{uuid.uuid4().hex[:8]}"
    rates: dict[tuple[str, int], list[float]] = {}
    lost: dict[int, int] = dict.fromkeys(WRITERS, 0)
    catch_up: dict[int, list[float]] = {w: [] for w in WRITERS}
    rows: list[Row] = []
    with fresh_pg_database() as url:
        try:
            _prepare(url, events_table)
        except _Unavailable as exc:
            return [na_row(SECTION, titles[w], str(exc), target=target) for w in WRITERS]
        with _Pool(url, events_table, max(WRITERS)) as pool:
            for k in range(runs):
                order = ("plain", "capture") if k % 2 == 0 else ("capture", "plain")
                for w in WRITERS:
                    for variant in order:
                        out = pool.run_phase(variant, w, duration)
                        rates.setdefault((variant, w), []).append(out["rate"])
                        if variant == "capture":
                            lost[w] += out["lost"]
                            catch_up[w].append(out["catch_up"])
                        print(f"    writers: run {k + 1}, {w:2d} writers, {variant:7s} "
                              f"{out['rate']:8,.0f} tx/s", file=sys.stderr, flush=True)
        profiler = _profiler(url, events_table)
        for w in WRITERS:
            lib = median(rates[("capture", w)])
            raw = median(rates[("plain", w)])
            note = (f"{duration:g} s per phase, {runs} run(s); the listening broker had every "
                    f"event {max(catch_up[w]):.1f} s after the writers stopped (worst run)")
            if lost[w]:
                note = (f"{duration:g} s per phase, {runs} run(s); the listening broker missed "
                        f"{lost[w]:,} captured events (still missing {CATCH_UP:g} s after the "
                        "writers stopped)")
            row = ratio_row(SECTION, titles[w], lib, raw, _tx_rate, at_least=TARGET, note=note)
            if lost[w]:
                row.status = FAIL
            row.profiler = profiler
            rows.append(row)
        profile_failures(rows)  # while the database still exists
    return rows


def _tx_rate(x: float) -> str:
    return rate(x).replace("/s", " tx/s")

