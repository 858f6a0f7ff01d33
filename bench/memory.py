"""Memory: RSS growth of a process pushing many events through a bounded ``MemoryProvider``.

Each side runs in a fresh interpreter (``python -m bench.memory --child ...``) so the figures
are that process's own. The library side publishes (sync mode, one handler, metrics on) into
``MemoryProvider(max_events=10_000)``; the raw side sends the same events through a blinker
signal. RSS is read after a warm-up (by then the store has filled and evicted for a while)
and at the end, after ``gc.collect()``; the target is growth < 50 MB.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable

from ._report import FAIL, PASS, Row, na_row, profile_call

SECTION = "5. memory (RSS growth after warm-up)"
LIMIT_MB = 50.0
TYPES = [f"public.table{k}.{op}" for k in range(5) for op in ("create", "update", "delete")]


def _push(side: str, n: int, warmup: int) -> dict[str, float]:
    from sqlalchemy_eventbroker import EventSource, new_event

    from ._env import rss_bytes

    if side == "library":
        from prometheus_client import CollectorRegistry

        from sqlalchemy_eventbroker import Broker, MemoryProvider

        broker = Broker(MemoryProvider(max_events=10_000), mode="sync",
                        registry=CollectorRegistry(), instance_id="bench")
        broker.subscribe("public.**", lambda e: None)
        broker.start()
        send = broker.publish_sync
    else:
        from blinker import Signal

        signal = Signal()
        signal.connect(lambda sender, event: None)

        def send(event: object) -> None:
            signal.send(None, event=event)

    types = TYPES
    rss_warm = peak = 0
    t0 = time.perf_counter()
    for i in range(n):
        send(new_event(EventSource.DATABASE, types[i % len(types)],
                       {"id": i, "name": "user", "email": "user@example.com"}))
        if i + 1 == warmup:
            gc.collect()
            rss_warm = peak = rss_bytes()
        elif i > warmup and i % 20_000 == 0:
            peak = max(peak, rss_bytes())
    elapsed = time.perf_counter() - t0
    gc.collect()
    rss_end = rss_bytes()
    return {"warm_mb": rss_warm / 2**20, "end_mb": rss_end / 2**20,
            "growth_mb": (max(peak, rss_end) - rss_warm) / 2**20, "rate": n / elapsed}


def _child(side: str, n: int, warmup: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--child", side, str(n), str(warmup)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory child ({side}) failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(quick: bool, runs: int, profile_failures: Callable[[list[Row]], None]) -> list[Row]:
    n = 200_000 if quick else 1_000_000
    warmup = 50_000 if quick else 100_000
    try:
        lib = _child("library", n, warmup)
        raw = _child("raw", n, warmup)
    except Exception as exc:  # noqa: BLE001
        return [na_row(SECTION, f"{n:,} events, max_events=10,000", str(exc)[:200],
                       target=f"< {LIMIT_MB:g} MB")]
    ok = lib["growth_mb"] < LIMIT_MB
    row = Row(
        SECTION, f"{n:,} events through MemoryProvider(max_events=10,000), sync, 1 handler",
        f"+{lib['growth_mb']:.1f} MB (RSS {lib['warm_mb']:.0f}→{lib['end_mb']:.0f} MB)",
        f"+{raw['growth_mb']:.1f} MB (blinker send)",
        "–", f"< {LIMIT_MB:g} MB", PASS if ok else FAIL,
        f"warm-up {warmup:,} events; peak sampled every 20k; one run per side",
    )
    if not ok:
        row.profiler = lambda: profile_call(lambda: _push("library", 50_000, 10_000))
    return [row]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3, metavar=("SIDE", "N", "WARMUP"), required=True)
    args = ap.parse_args()
    side, n, warm = args.child[0], int(args.child[1]), int(args.child[2])
    print(json.dumps(_push(side, n, warm)))
