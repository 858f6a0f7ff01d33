"""Consumer groups: two processes in one group drain a backlog; nothing may be handled twice.

Per backend and side: the group is created (so it is durable), N events are published into
it from this process (not timed), then two member processes start together and drain it.
Figure: events/s from the start signal to the last handled event, and how many events were
handled more than once or never. The target is 0 of both and at least ``MIN_RATIO`` of the
raw client's rate (issue 12; the library's group members also write each event's final
status back, which the raw ones do not). A miss is profiled.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

from . import lib_side
from ._env import fresh_pg_database, reachable  # noqa: F401 - re-exported for symmetry
from ._procs import group_drain, resolve, run_phase
from ._report import FAIL, PASS, Row, load_profiles, median, na_row, rate
from .crossprocess import BACKENDS, backend_context, raw_setup

#: Seconds a drain may take; a slower one is stopped and reported as not drained (FAIL).
DEADLINE, DEADLINE_QUICK = 45.0, 15.0
SECTION = "4. consumer groups (2 member processes draining a backlog)"
#: The library's drain rate must reach this fraction of the raw client's.
MIN_RATIO = 0.3
TARGET = f"≥ {MIN_RATIO:g}×, 0 twice, 0 lost"


def _fill(backend: str, side: str, cfg: dict[str, Any], n: int) -> None:
    pub = resolve(backend, side).Publisher(cfg)
    try:
        run_phase(pub, pub.make(0, n), 100, 0.0)
    finally:
        pub.close()


def _one(backend: str, side: str, pg_url: str, n: int, deadline: float,
         profile_paths: list[str] | None = None) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    if side == "raw":
        mod, cfg = raw_setup(backend, pg_url, tag, group=True)
        cleanup: Callable[[], None] = lambda: mod.cleanup(cfg)
    else:
        cfg = lib_side.setup(backend, tag, pg_url=pg_url, group=f"bench-{tag}")
        cleanup = lambda: lib_side.cleanup(backend, cfg)
    try:
        _fill(backend, side, cfg, n)
        return group_drain(backend, side, cfg, n, deadline=deadline,
                           profile_paths=profile_paths)
    finally:
        cleanup()


def _profiler(backend: str, pg_url: str, n: int) -> Callable[[], str]:
    def go() -> str:
        d = tempfile.mkdtemp(prefix="ebbench-prof-")
        paths = [os.path.join(d, f"member{i}.prof") for i in range(2)]
        _one(backend, "lib", pg_url, max(1_000, n // 10), 30.0, paths)
        return "both member processes, all threads:\n" + load_profiles(paths)

    return go


def run(quick: bool, runs: int, profile_failures: Callable[[list[Row]], None]) -> list[Row]:
    n = 2_000 if quick else 50_000
    deadline = DEADLINE_QUICK if quick else DEADLINE
    rows: list[Row] = []
    for backend, (label, url) in BACKENDS.items():
        title = f"{label}: {n:,} events, 2 members"
        if not reachable(url):
            rows.append(na_row(SECTION, title, f"server not reachable at {url}"))
            continue
        with backend_context(backend) as pg_url:
            results: dict[str, list[dict[str, Any]]] = {"raw": [], "lib": []}
            missing = ""
            errors: dict[str, str] = {}
            for _ in range(runs):
                for side in ("raw", "lib"):
                    if side == "lib" and missing:
                        continue
                    try:
                        results[side].append(_one(backend, side, pg_url, n, deadline))
                    except lib_side.Unavailable as exc:
                        missing = str(exc)
                    except Exception as exc:  # noqa: BLE001
                        errors[side] = f"{type(exc).__name__}: {exc}"[:240]
            raw_rate = median([r["rate"] for r in results["raw"]])
            raw_text = rate(raw_rate) + (
                f", {sum(r['twice'] for r in results['raw'])} twice" if results["raw"] else
                f" ({errors.get('raw', 'error')})")
            if missing:
                rows.append(na_row(SECTION, title, missing, raw=raw_text, target=TARGET))
                continue
            if not results["lib"]:
                rows.append(Row(SECTION, title, "error", raw_text, "–", TARGET,
                                FAIL, errors.get("lib", "")))
                continue
            lib_rate = median([r["rate"] for r in results["lib"]])
            twice = sum(r["twice"] for r in results["lib"])
            lost = sum(r["missing"] for r in results["lib"])
            ratio = lib_rate / raw_rate if raw_rate else 0.0
            ok = twice == 0 and lost == 0 and (not raw_rate or ratio >= MIN_RATIO)
            note = f"twice/lost summed over {len(results['lib'])} run(s)"
            if lost:
                note += (f"; {lost} not handled when the drain was stopped after {deadline:g} s"
                         " (the rate is over what was handled)")
            row = Row(SECTION, title, f"{rate(lib_rate)}, {twice} twice, {lost} lost", raw_text,
                      f"{ratio:.2f}×" if raw_rate else "–", TARGET, PASS if ok else FAIL, note)
            row.profiler = _profiler(backend, pg_url, n)
            profile_failures([row])
            rows.append(row)
    return rows
