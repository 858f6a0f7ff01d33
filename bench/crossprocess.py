"""Cross-process fan-out through PostgreSQL, Redis and NATS: throughput and latency.

For each backend and side (raw client code, then the library), a publisher process and a
subscriber process go through three phases after a warm-up: N events in batches of 1, N
events in batches of 100 (events/s from the first publish to the last receipt), and events
one at a time at 200 events/s, each stamped with its send time (latency p50/p99 from before
the publish call to the handler). Raw and library runs alternate; medians over the runs.
Targets: throughput ≥ 0.6× raw on PostgreSQL, ≥ 0.8× on Redis and NATS (issue 12: their
clients are the whole transport, so the library's share should be small); p99 ≤ raw p99 + 3 ms.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from . import lib_side
from ._env import NATS_URL, PG_ADMIN_URL, REDIS_URL, fresh_pg_database, reachable
from ._procs import Phase, fanout_pair, percentile
from ._report import FAIL, PASS, Row, load_profiles, median, ms, na_row, rate, ratio_row

SECTION = "3. cross-process fan-out (publisher process → subscriber process)"
#: Throughput target (× raw) per backend, every batch size.
TARGET_RATE = {"pg": 0.6, "redis": 0.8, "nats": 0.8}
TARGET_P99_MS = 3.0
BACKENDS = {"pg": ("PostgreSQL", PG_ADMIN_URL), "redis": ("Redis", REDIS_URL),
            "nats": ("NATS", NATS_URL)}


def phases(quick: bool) -> list[Phase]:
    if quick:
        return [("b1", 200, 1, 0.0), ("b100", 3_000, 100, 0.0), ("lat", 300, 1, 1 / 200)]
    return [("b1", 1_000, 1, 0.0), ("b100", 10_000, 100, 0.0), ("lat", 1_000, 1, 1 / 200)]


@contextmanager
def backend_context(backend: str) -> Iterator[str]:
    """PostgreSQL: a fresh database for this measurement (its URL); others: nothing."""
    if backend == "pg":
        with fresh_pg_database() as url:
            yield url
    else:
        yield ""


def raw_setup(backend: str, pg_url: str, tag: str, group: bool = False) -> tuple[Any, dict[str, Any]]:
    from importlib import import_module

    mod = import_module(f"bench.raw_{backend}")
    cfg = mod.setup(pg_url, tag, group=group) if backend == "pg" else mod.setup(tag, group=group)
    return mod, cfg


def _one(backend: str, side: str, pg_url: str, ph: list[Phase],
         profile_paths: tuple[str, str] | None = None) -> dict[str, dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    if side == "raw":
        mod, cfg = raw_setup(backend, pg_url, tag)
        try:
            return fanout_pair(backend, "raw", cfg, ph, profile_paths)
        finally:
            mod.cleanup(cfg)
    cfg = lib_side.setup(backend, tag, pg_url=pg_url)
    try:
        return fanout_pair(backend, "lib", cfg, ph, profile_paths)
    finally:
        lib_side.cleanup(backend, cfg)


def _profiler(backend: str, pg_url: str, ph: list[Phase]) -> Callable[[], str]:
    """One profile per backend (shared by its rows): 100 events one by one, then batches."""

    def go() -> str:
        n = {p[0]: p[1] for p in ph}["b100"]
        small = [("b1", 100, 1, 0.0), ("b100", max(1_000, n // 4), 100, 0.0)]
        d = tempfile.mkdtemp(prefix="ebbench-prof-")
        paths = (os.path.join(d, "pub.prof"), os.path.join(d, "sub.prof"))
        _one(backend, "lib", pg_url, small, paths)
        return ("profile run: 100 events one by one, then batches of 100\n"
                "publisher process:\n" + load_profiles([paths[0]])
                + "\n\nsubscriber process (all threads):\n" + load_profiles([paths[1]]))

    return go


def run(quick: bool, runs: int, profile_failures: Callable[[list[Row]], None]) -> list[Row]:
    rows: list[Row] = []
    ph = phases(quick)
    for backend, (label, url) in BACKENDS.items():
        if not reachable(url):
            rows.append(na_row(SECTION, label, f"server not reachable at {url}"))
            continue
        with backend_context(backend) as pg_url:
            part = _backend(backend, label, pg_url, ph, runs)
            profile_failures(part)
            rows += part
    return rows


def _backend(backend: str, label: str, pg_url: str, ph: list[Phase], runs: int) -> list[Row]:
    results: dict[str, list[dict[str, dict[str, Any]]]] = {"raw": [], "lib": []}
    lib_missing = ""
    errors: dict[str, str] = {}
    for _ in range(runs):
        for side in ("raw", "lib"):
            if side == "lib" and lib_missing:
                continue
            try:
                results[side].append(_one(backend, side, pg_url, ph))
            except lib_side.Unavailable as exc:
                lib_missing = str(exc)
            except Exception as exc:  # noqa: BLE001 - reported in the row
                errors[side] = f"{type(exc).__name__}: {exc}"[:240]
    by_name = {p[0]: p for p in ph}
    profiler = _profiler(backend, pg_url, ph)
    rows: list[Row] = []
    titles = {"b1": "events/s, batch 1", "b100": "events/s, batch 100"}
    for name in ("b1", "b100"):
        n = by_name[name][1]
        title = f"{label}: {titles[name]} ({n:,} events)"
        raw = [r[name]["rate"] for r in results["raw"]]
        lib = [r[name]["rate"] for r in results["lib"]]
        if lib_missing:
            rows.append(na_row(SECTION, title, lib_missing, raw=rate(median(raw)),
                               target=f"≥ {TARGET_RATE[backend]:g}×"))
            continue
        if not lib or not raw:
            rows.append(Row(SECTION, title, rate(median(lib)), rate(median(raw)), "–",
                            f"≥ {TARGET_RATE[backend]:g}×", FAIL, errors.get("lib") or errors.get("raw", "")))
            continue
        lost = _lost(results["lib"], name)
        row = ratio_row(SECTION, title, median(lib), median(raw), rate, at_least=TARGET_RATE[backend],
                        note=_notes(results, name))
        if lost:
            row.status = FAIL
        row.profiler = profiler
        rows.append(row)
    # Latency.
    n = by_name["lat"][1]
    title = f"{label}: latency p50 / p99 at 200 events/s ({n:,} events)"
    raw50 = median([percentile(r["lat"]["lat"], 0.5) for r in results["raw"]]) * 1000
    raw99 = median([percentile(r["lat"]["lat"], 0.99) for r in results["raw"]]) * 1000
    if lib_missing:
        rows.append(na_row(SECTION, title, lib_missing, raw=f"{ms(raw50)} / {ms(raw99)}",
                           target=f"p99 ≤ raw + {TARGET_P99_MS:g} ms"))
        return rows
    if not results["lib"]:
        rows.append(Row(SECTION, title, "error", f"{ms(raw50)} / {ms(raw99)}", "–",
                        f"p99 ≤ raw + {TARGET_P99_MS:g} ms", FAIL, errors.get("lib", "")))
        return rows
    lib50 = median([percentile(r["lat"]["lat"], 0.5) for r in results["lib"]]) * 1000
    lib99 = median([percentile(r["lat"]["lat"], 0.99) for r in results["lib"]]) * 1000
    ok = lib99 <= raw99 + TARGET_P99_MS and not _lost(results["lib"], "lat")
    row = Row(SECTION, title, f"{ms(lib50)} / {ms(lib99)}", f"{ms(raw50)} / {ms(raw99)}",
              f"p99 +{lib99 - raw99:.2f} ms", f"p99 ≤ raw + {TARGET_P99_MS:g} ms",
              PASS if ok else FAIL, _notes(results, "lat"))
    row.profiler = profiler
    rows.append(row)
    return rows


def _lost(results: list[dict[str, dict[str, Any]]], name: str) -> int:
    return sum(r[name]["sent"] - r[name]["received"] for r in results)


def _notes(results: dict[str, list[dict[str, dict[str, Any]]]], name: str) -> str:
    notes = []
    for side in ("lib", "raw"):
        lost = _lost(results[side], name)
        if lost:
            notes.append(f"{side}: {lost} events not received")
    if name != "lat" and results["lib"]:
        notes.append(f"lib publish side alone {rate(median([r[name]['pub_rate'] for r in results['lib']]))}")
    return "; ".join(notes)
