"""Rows, the markdown table, the machine description and profile summaries.

Every measurement module returns a list of :class:`Row`; ``__main__`` prints them as one
markdown table. A row compares the library's figure with the raw baseline measured in the
same run; its status is ``pass``, ``FAIL`` or ``n/a`` (could not be measured: never a pass).
"""

from __future__ import annotations

import cProfile
import math
import os
import platform
import pstats
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

PASS, FAIL, NA, INFO = "pass", "FAIL", "n/a", "info"


@dataclass(slots=True)
class Row:
    """One line of the table."""

    section: str
    name: str
    library: str
    raw: str
    ratio: str = ""
    target: str = ""
    status: str = INFO
    note: str = ""
    #: cProfile summary of the library side, filled when the target was missed.
    profile: str = ""
    #: Re-runs the library side under cProfile (called only for a FAIL row).
    profiler: Callable[[], str] | None = field(default=None, repr=False)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rate(x: float) -> str:
    """An events-per-second figure."""
    if math.isnan(x):
        return "–"
    if x >= 10_000:
        return f"{x / 1000:,.1f}k/s"
    return f"{x:,.0f}/s"


def us(x: float) -> str:
    return f"{x:,.1f} µs/op"


def ms(x: float) -> str:
    return f"{x:.2f} ms"


def ratio_row(
    section: str,
    name: str,
    library: float,
    raw: float,
    fmt: Callable[[float], str],
    *,
    at_most: float | None = None,
    at_least: float | None = None,
    note: str = "",
) -> Row:
    """A row whose pass/fail is ``library / raw`` against a bound."""
    if raw <= 0 or math.isnan(library) or math.isnan(raw):
        return Row(section, name, fmt(library), fmt(raw), "–", _target(at_most, at_least),
                   FAIL, note or "no valid measurement")
    r = library / raw
    ok = (at_most is None or r <= at_most) and (at_least is None or r >= at_least)
    return Row(section, name, fmt(library), fmt(raw), f"{r:.2f}×", _target(at_most, at_least),
               PASS if ok else FAIL, note)


def _target(at_most: float | None, at_least: float | None) -> str:
    if at_most is not None:
        return f"≤ {at_most:g}×"
    if at_least is not None:
        return f"≥ {at_least:g}×"
    return ""


def na_row(section: str, name: str, why: str, raw: str = "", target: str = "") -> Row:
    return Row(section, name, "not available", raw, "–", target, NA, why)


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| measurement | library | raw baseline | ratio | target | result | note |",
        "|---|---|---|---|---|---|---|",
    ]
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            lines.append(f"| **{section}** | | | | | | |")
        lines.append(
            f"| {r.name} | {r.library} | {r.raw} | {r.ratio} | {r.target} | "
            f"{'**FAIL**' if r.status == FAIL else r.status} | {r.note} |"
        )
    return "\n".join(lines)


# -- profiling ----------------------------------------------------------------------------


def profile_call(fn: Callable[[], Any], limit: int = 14) -> str:
    """Run ``fn`` under cProfile; a summary of where the time went."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    return summarize(pstats.Stats(prof), limit)


#: Blocking primitives: in a multi-thread profile they are idle time, not work.
_WAITS = ("acquire", "SimpleQueue", "select", "poll", "sleep", "wait", "epoll", "gc.collect",
          "marshal.loads", "builtins.compile", "_imp.create_dynamic", "__build_class__")


def summarize(stats: pstats.Stats, limit: int = 14) -> str:
    """Where the time went: busiest functions by own time (waiting and imports left out),
    then the library's own functions by cumulative time."""
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = []
    for (filename, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        entries.append((tt, ct, nc, _where(filename, line, func)))
    busy = sorted((e for e in entries if not any(w in e[3] for w in _WAITS)), reverse=True)
    ours = sorted((e for e in entries if e[3].startswith("sqlalchemy_eventbroker/")),
                  key=lambda e: e[1], reverse=True)
    waited = sum(e[0] for e in entries if any(w in e[3] for w in _WAITS))
    out = [(f"{total:.2f} s profiled over all threads, {waited:.2f} s of it blocked/idle "
            "or importing"),
           "busiest functions by own time:", "    own s   cum s     calls  function"]
    for tt, ct, nc, where in busy[:limit]:
        out.append(f"  {tt:7.3f} {ct:7.3f} {nc:9d}  {where}")
    out += ["library functions by cumulative time:", "    own s   cum s     calls  function"]
    for tt, ct, nc, where in ours[:limit]:
        out.append(f"  {tt:7.3f} {ct:7.3f} {nc:9d}  {where}")
    return "\n".join(out)


def _where(filename: str, line: int, func: str) -> str:
    if filename == "~":
        return func
    parts = filename.replace("\\", "/").split("/")
    for anchor in ("sqlalchemy_eventbroker", "sqlalchemy", "psycopg", "redis", "nats",
                   "prometheus_client", "blinker", "bench"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return f"{'/'.join(parts[i:])}:{line}({func})"
    return f"{parts[-1]}:{line}({func})"


def load_profiles(paths: Sequence[str], limit: int = 14) -> str:
    """Merge cProfile dumps written by child processes into one summary."""
    existing = [p for p in paths if os.path.exists(p)]
    if not existing:
        return "(no profile written)"
    stats = pstats.Stats(existing[0])
    for p in existing[1:]:
        stats.add(p)
    return summarize(stats, limit)


# -- machine ------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sqlalchemy_eventbroker"],
                               capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(servers: dict[str, str]) -> str:
    """A markdown bullet list describing this machine, the libraries and the servers."""
    libs = ", ".join(
        f"{name} {_version(dist)}"
        for name, dist in (
            ("SQLAlchemy", "SQLAlchemy"), ("psycopg", "psycopg"), ("redis-py", "redis"),
            ("nats-py", "nats-py"), ("blinker", "blinker"),
            ("prometheus_client", "prometheus_client"),
        )
    )
    server_text = ", ".join(f"{k} {v}" for k, v in servers.items()) or "none reached"
    return "\n".join([
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores; RAM {_mem_total()}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}); {libs}",
        f"- Servers (all on 127.0.0.1): {server_text}",
        f"- sqlalchemy-eventbroker {_version('sqlalchemy-eventbroker')} at commit {_git_commit()}",
    ])
