"""The library's background threads, kept deaf to process signals.

A process-directed signal (SIGINT from Ctrl-C, SIGTERM from an orchestrator) is delivered by
the kernel to any thread that does not block it. Python runs signal handlers only in the main
thread, and only wakes a main thread blocked in ``lock.acquire``/``Event.wait`` when the signal
interrupted *that* thread; if a busy background thread catches it instead, the handler waits
until the main thread happens to run Python code again (``KeyboardInterrupt`` or a graceful
shutdown delayed by minutes). So every thread this library starts blocks the asynchronous
signals first, leaving them to the main thread.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["QuietThread"]

_SYNCHRONOUS = {"SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGKILL", "SIGSTOP", "SIGABRT",
                "SIGTRAP", "SIGSYS"}


def _async_signals() -> set[signal.Signals]:
    if not hasattr(signal, "pthread_sigmask"):
        return set()
    found: set[signal.Signals] = set()
    for sig in signal.valid_signals():
        try:
            sig = signal.Signals(sig)
        except ValueError:  # real-time signals have no name
            continue
        if sig.name not in _SYNCHRONOUS:
            found.add(sig)
    return found


_BLOCKED = _async_signals()


def block_signals() -> None:
    """Block the asynchronous signals in the calling thread (best effort)."""
    if _BLOCKED:
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
        except (OSError, ValueError):
            pass


class QuietThread(threading.Thread):
    """A ``threading.Thread`` that blocks asynchronous signals before running its target."""

    def run(self) -> None:
        block_signals()
        super().run()
