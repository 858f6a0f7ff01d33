"""One long-lived asyncio event loop in a thread, serving an async-only driver to sync callers.

nats-py only speaks asyncio, while the provider contract is synchronous and thread-safe. Each
provider owns one :class:`LoopThread`; every call is scheduled onto that loop with
``asyncio.run_coroutine_threadsafe`` and the calling thread waits for the result. The loop and
its connection live as long as the provider, so there is never an ``asyncio.run`` per call
(which would build and tear down a loop, and a connection, every time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .._threads import QuietThread

__all__ = ["LoopClosed", "LoopThread"]

T = TypeVar("T")


class LoopClosed(RuntimeError):
    """The loop thread was stopped; nothing more can run on it."""


class LoopThread:
    """An asyncio loop running forever in a daemon thread until :meth:`close`.

    Thread-safe: any thread may call :meth:`run` or :meth:`submit` concurrently. Calling
    :meth:`run` from the loop's own thread would deadlock, so it raises ``RuntimeError``.
    """

    def __init__(self, name: str = "eventbroker-loop") -> None:
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = QuietThread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._started.wait()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def is_running(self) -> bool:
        return not self._closed and self._thread.is_alive()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._started.set)
        try:
            self._loop.run_forever()
        finally:
            # Whatever close() did not get to: cancel, let the cancellations run, then close.
            pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(
                    asyncio.gather(*pending, return_exceptions=True)
                )
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; return a future the caller may wait on or cancel.

        Raises:
            LoopClosed: the loop was closed.
        """
        with self._lock:
            if self._closed:
                coro.close()
                raise LoopClosed("the provider's event loop is closed")
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result (or raise its exception).

        On ``timeout`` the coroutine is cancelled and ``TimeoutError`` raised.

        Raises:
            LoopClosed: the loop was closed.
            TimeoutError: ``timeout`` seconds passed first.
        """
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("LoopThread.run() called from the loop thread itself")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"operation did not finish within {timeout} s") from None
        except concurrent.futures.CancelledError:
            raise LoopClosed("the operation was cancelled: the provider is closing") from None

    def call_soon(self, callback: Any, *args: Any) -> None:
        """Run a plain callback on the loop soon, without waiting (ignored once closed)."""
        with self._lock:
            if not self._closed:
                self._loop.call_soon_threadsafe(callback, *args)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs, stop the loop and join its thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.in_loop_thread():  # pragma: no cover - defensive
            self._loop.stop()
            return

        async def _cancel_all() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)

        with contextlib.suppress(Exception):  # best effort; the loop is stopped below anyway
            asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(timeout + 1)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout + 1)
