"""Publisher, subscriber and group-consumer processes, and the parent that drives them.

Every side of every backend (``bench.raw_pg``, ``bench.raw_redis``, ``bench.raw_nats`` and
``bench.lib_side``) provides the same three classes:

* ``Publisher(cfg)``: ``make(phase, n)`` builds ``n`` items (not timed), ``stamp(item, t)``
  writes the send time into an item's payload, ``send(items)`` publishes them as one batch,
  ``close()``. It may override ``run_phase`` (asyncio clients run a whole phase in their loop).
* ``Subscriber(cfg, on_payload)``: a fan-out reader, ready when the constructor returns,
  calling ``on_payload(payload_dict)`` from its own thread(s) for every message; ``close()``.
* ``GroupConsumer(cfg, on_payload)``: one member of the consumer group ``cfg["group"]``.

Processes are started with the ``spawn`` method and talk to the parent through queues; all
loops are bounded by deadlines, so a lost message shows up as a short count, never a hang.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

WARM = -1
_ctx = mp.get_context("spawn")


def resolve(backend: str, side: str) -> Any:
    """The module providing ``Publisher``/``Subscriber``/``GroupConsumer`` for a side."""
    if side == "raw":
        return importlib.import_module(f"bench.raw_{backend}")
    mod = importlib.import_module("bench.lib_side")
    return mod.for_backend(backend)


def run_phase(pub: Any, items: list[Any], batch: int, interval: float) -> tuple[float, float]:
    """Publish ``items`` in batches, or one by one every ``interval`` seconds (stamped)."""
    custom = getattr(pub, "run_phase", None)
    if custom is not None:
        return custom(items, batch, interval)  # type: ignore[no-any-return]
    send, stamp, clock = pub.send, pub.stamp, time.perf_counter
    t0 = clock()
    if interval:
        for i, item in enumerate(items):
            delay = t0 + i * interval - clock()
            if delay > 0:
                time.sleep(delay)
            stamp(item, clock())
            send([item])
    else:
        for k in range(0, len(items), batch):
            send(items[k:k + batch])
    return t0, clock()


class Recorder:
    """Counts what a subscriber receives for the current phase; latencies when asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.phase = -99
        self.expected = 0
        self.count = 0
        self.t_last = 0.0
        self.latency = False
        self.lat: list[float] = []
        self.done = threading.Event()
        self.warm = threading.Event()

    def arm(self, phase: int, expected: int, latency: bool) -> None:
        with self.lock:
            self.phase, self.expected, self.latency = phase, expected, latency
            self.count, self.t_last, self.lat = 0, 0.0, []
            self.done.clear()

    def on_payload(self, p: Any) -> None:
        now = time.perf_counter()
        phase = p.get("p") if isinstance(p, dict) else None
        if phase == WARM:
            self.warm.set()
            return
        with self.lock:
            if phase != self.phase:
                return
            self.count += 1
            self.t_last = now
            if self.latency:
                self.lat.append(now - p["t"])
            if self.count >= self.expected:
                self.done.set()


def _maybe_profile(profile_path: str | None) -> None:
    if profile_path:
        from . import _threadprof

        _threadprof.install()


def _dump_profile(profile_path: str | None) -> None:
    if profile_path:
        from . import _threadprof

        _threadprof.dump(profile_path)


def subscriber_main(backend: str, side: str, cfg: dict[str, Any], cmds: Any, results: Any,
                    profile_path: str | None = None) -> None:
    try:
        _maybe_profile(profile_path)
        rec = Recorder()
        sub = resolve(backend, side).Subscriber(cfg, rec.on_payload)
        results.put(("sub", "ready", None))
        while True:
            cmd = cmds.get(timeout=600)
            if cmd[0] == "warm":
                results.put(("sub", "warm", rec.warm.wait(cmd[1])))
            elif cmd[0] == "phase":
                _, phase, n, latency, wait = cmd
                rec.arm(phase, n, latency)
                results.put(("sub", "armed", phase))
                rec.done.wait(wait)
                with rec.lock:
                    results.put(("sub", "done", (rec.count, rec.t_last, list(rec.lat))))
            else:
                break
        sub.close()
        _dump_profile(profile_path)
        results.put(("sub", "closed", None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(("sub", "error", f"{type(exc).__name__}: {exc}"))


def publisher_main(backend: str, side: str, cfg: dict[str, Any], cmds: Any, results: Any,
                   warm_done: Any, profile_path: str | None = None) -> None:
    try:
        _maybe_profile(profile_path)
        pub = resolve(backend, side).Publisher(cfg)
        results.put(("pub", "ready", None))
        while True:
            cmd = cmds.get(timeout=600)
            if cmd[0] == "warm":
                # One event every 20 ms until the subscriber has seen one.
                deadline = time.monotonic() + cmd[1]
                i = 0
                while not warm_done.is_set() and time.monotonic() < deadline:
                    items = pub.make(WARM, 1)
                    pub.stamp(items[0], time.perf_counter())
                    pub.send(items)
                    i += 1
                    warm_done.wait(0.02)
                results.put(("pub", "warm", i))
            elif cmd[0] == "phase":
                _, phase, n, batch, interval = cmd
                items = pub.make(phase, n)
                results.put(("pub", "sent", run_phase(pub, items, batch, interval)))
            else:
                break
        pub.close()
        _dump_profile(profile_path)
        results.put(("pub", "closed", None))
    except BaseException as exc:  # noqa: BLE001
        results.put(("pub", "error", f"{type(exc).__name__}: {exc}"))


class _Inbox:
    """The parent's view of the result queue: wait for a given (who, kind)."""

    def __init__(self, q: Any, procs: list[Any]) -> None:
        self.q = q
        self.procs = procs
        self.pending: list[tuple[str, str, Any]] = []

    def expect(self, who: str, kind: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for i, (w, k, data) in enumerate(self.pending):
                if w == who and k == kind:
                    del self.pending[i]
                    return data
                if k == "error":
                    raise RuntimeError(f"{w} process failed: {data}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind!r} from the {who} process within {timeout:.0f} s")
            try:
                self.pending.append(self.q.get(timeout=min(remaining, 1.0)))
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"a child process died (exit code {dead[0].exitcode})")


#: One phase: (name, events, batch size, interval between events in seconds or 0).
Phase = tuple[str, int, int, float]


def fanout_pair(backend: str, side: str, cfg: dict[str, Any], phases: list[Phase],
                profile_paths: tuple[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Run a publisher process and a subscriber process through ``phases``.

    Returns per phase: ``sent`` (events), ``received``, ``rate`` (events/s from the first
    publish to the last receipt) and, for paced phases, ``lat`` (seconds, per event).
    """
    cmds_sub, cmds_pub, results = _ctx.Queue(), _ctx.Queue(), _ctx.Queue()
    warm_done = _ctx.Event()
    sub = _ctx.Process(target=subscriber_main, daemon=True,
                       args=(backend, side, cfg, cmds_sub, results,
                             profile_paths[1] if profile_paths else None))
    pub = _ctx.Process(target=publisher_main, daemon=True,
                       args=(backend, side, cfg, cmds_pub, results, warm_done,
                             profile_paths[0] if profile_paths else None))
    inbox = _Inbox(results, [sub, pub])
    out: dict[str, dict[str, Any]] = {}
    try:
        sub.start()
        inbox.expect("sub", "ready", 60)
        pub.start()
        inbox.expect("pub", "ready", 60)
        cmds_sub.put(("warm", 30.0))
        cmds_pub.put(("warm", 30.0))
        if not inbox.expect("sub", "warm", 40):
            raise RuntimeError("the subscriber saw no warm-up event within 30 s")
        warm_done.set()
        inbox.expect("pub", "warm", 10)
        for k, (name, n, batch, interval) in enumerate(phases):
            wait = max(30.0, n * interval * 2 + 20.0, n / 200.0)
            cmds_sub.put(("phase", k, n, bool(interval), wait))
            inbox.expect("sub", "armed", 10)
            cmds_pub.put(("phase", k, n, batch, interval))
            t0, t1 = inbox.expect("pub", "sent", wait + 30)
            count, t_last, lat = inbox.expect("sub", "done", wait + 30)
            out[name] = {"sent": n, "received": count,
                         "rate": count / (t_last - t0) if count and t_last > t0 else 0.0,
                         "pub_rate": n / (t1 - t0) if t1 > t0 else 0.0, "lat": lat}
        cmds_sub.put(("stop",))
        cmds_pub.put(("stop",))
        inbox.expect("sub", "closed", 30)
        inbox.expect("pub", "closed", 30)
    finally:
        for p in (pub, sub):
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return out


# -- consumer groups ----------------------------------------------------------------------


def group_member_main(backend: str, side: str, cfg: dict[str, Any], go: Any, stop: Any,
                      counter: Any, results: Any, profile_path: str | None = None) -> None:
    try:
        mod = resolve(backend, side)
        _maybe_profile(profile_path)
        lock = threading.Lock()
        seen: list[int] = []
        last = [0.0]

        def on_payload(p: Any) -> None:
            with lock:
                seen.append(p["i"])
                last[0] = time.perf_counter()
                counter.value = len(seen)

        results.put(("member", "ready", os.getpid()))
        if not go.wait(120):
            raise TimeoutError("no go signal")
        member = mod.GroupConsumer(cfg, on_payload)
        stop.wait(600)
        member.close()
        _dump_profile(profile_path)
        with lock:
            results.put(("member", "done", (list(seen), last[0])))
    except BaseException as exc:  # noqa: BLE001
        results.put(("member", "error", f"{type(exc).__name__}: {exc}"))


def group_drain(backend: str, side: str, cfg: dict[str, Any], n: int, members: int = 2,
                deadline: float = 180.0,
                profile_paths: list[str] | None = None) -> dict[str, Any]:
    """Start ``members`` consumer processes on a backlog of ``n`` events; time the drain.

    Returns ``handled`` (total handler calls), ``unique``, ``twice`` (handled more than
    once), ``missing`` and ``rate`` (events/s from the go signal to the last handled event).
    """
    go, stop, results = _ctx.Event(), _ctx.Event(), _ctx.Queue()
    counters = [_ctx.RawValue("q", 0) for _ in range(members)]
    procs = [
        _ctx.Process(target=group_member_main, daemon=True,
                     args=(backend, side, cfg, go, stop, counters[i], results,
                           profile_paths[i] if profile_paths else None))
        for i in range(members)
    ]
    inbox = _Inbox(results, procs)
    try:
        for p in procs:
            p.start()
        for _ in procs:
            inbox.expect("member", "ready", 60)
        t0 = time.perf_counter()
        go.set()
        end = time.monotonic() + deadline
        while sum(c.value for c in counters) < n and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.3)  # let a duplicate delivery, if any, show up
        stop.set()
        seen: list[int] = []
        t_last = 0.0
        for _ in procs:
            ids, last = inbox.expect("member", "done", 60)
            seen += ids
            t_last = max(t_last, last)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    unique = len(set(seen))
    return {"handled": len(seen), "unique": unique, "twice": len(seen) - unique,
            "missing": n - unique, "rate": unique / (t_last - t0) if t_last > t0 else 0.0}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


OnPayload = Callable[[Any], None]
