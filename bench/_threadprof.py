"""cProfile across every thread of a process (cProfile alone sees only the calling thread).

``install()`` profiles the calling thread and every thread started afterwards (through
``threading.setprofile``, whose hook runs in the new thread before its target); ``dump(path)``
merges them into one pstats file. Used in child processes when a target was missed.
"""

from __future__ import annotations

import cProfile
import pstats
import threading
from typing import Any

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _start_in_thread(*_args: Any) -> None:
    prof = cProfile.Profile()
    with _lock:
        _profiles.append(prof)
    prof.enable()  # replaces this hook for the thread with the C profiler


def install() -> None:
    threading.setprofile(_start_in_thread)
    _start_in_thread()


def dump(path: str) -> None:
    threading.setprofile(None)  # type: ignore[arg-type]
    with _lock:
        profiles = list(_profiles)
    stats: pstats.Stats | None = None
    for prof in profiles:
        prof.create_stats()
        if not getattr(prof, "stats", None):
            continue
        if stats is None:
            stats = pstats.Stats(prof)
        else:
            stats.add(prof)
    if stats is not None:
        stats.dump_stats(path)
