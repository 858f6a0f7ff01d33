"""The provider's two background threads on PostgreSQL: the listener and the announcer.

:class:`Listener` reads pages past its cursor and dispatches them to the fan-out streams. It
waits for a NOTIFY on its own LISTEN connection, for a local kick, or at most the backstop
interval, then reads again; in poll mode (other databases, or no working LISTEN) it reads
every ``poll_interval``. On any connection failure it backs off, reconnects and catches up
from the cursor it kept, so nothing is lost or repeated.

:class:`Announcer` sends the wake-ups: ``SELECT pg_notify(channel, table)`` on its own
autocommit connection, after the writes committed, never inside an application's
transaction. Requests coalesce: one notification covers every request that arrived since the
previous one was sent. It never blocks or fails a caller; a lost connection is re-made with
backoff, and a wake-up lost meanwhile is covered by the readers' backstop interval.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._threads import QuietThread
from .._backoff import Backoff
from ._engine import psycopg_connection
from ._reader import Cursor, FanOut, Page
from ._wake import Waker

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["Announcer", "Listener"]

logger = logging.getLogger(__name__.rpartition("._")[0])


class Announcer:
    """Coalesced ``pg_notify`` from a thread of its own (see the module docstring).

    Started by the first :meth:`announce`, stopped by :meth:`stop`. Thread-safe.
    """

    def __init__(self, engine: Engine, channel: str, payload: str, address: str) -> None:
        self._engine = engine
        self._channel = channel
        self._payload = payload
        self._address = address
        self._cond = threading.Condition()
        self._asked = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        #: Notifications sent, and the backend pid of the announcing connection (or None).
        self.sent = 0
        self.backend_pid: int | None = None

    def announce(self) -> None:
        """Ask for one wake-up soon. Never blocks on the database; never raises.

        A request made before :meth:`stop` is still sent (once, best effort)."""
        with self._cond:
            if self._stopping:
                return
            self._asked = True
            if self._thread is None:
                self._thread = QuietThread(target=self._run, daemon=True,
                                           name=f"eventbroker-db-announcer-{self._payload}")
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and threading.current_thread() is not thread:
            thread.join(timeout=10)

    def _run(self) -> None:
        retry = Backoff(5.0, base=0.05)
        while True:
            with self._cond:
                while not self._asked and not self._stopping:
                    self._cond.wait()
                if not self._asked:
                    break  # stopping, and nothing left to announce
                self._asked = False  # requests arriving from now on need another send
                stopping = self._stopping  # a last request before close() still goes out
            try:
                self._send()
                retry.reset()
            except Exception as exc:  # noqa: BLE001 - reconnect; readers have the backstop
                logger.warning("eventbroker announcer on %s: %s; reconnecting", self._address,
                               type(exc).__name__)
                self._close_conn()
                if stopping:
                    break
                with self._cond:
                    self._asked = True  # the wake-up still has to go out
                    deadline = time.monotonic() + retry.next()
                    while not self._stopping and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
        self._close_conn()

    def _send(self) -> None:
        if self._conn is None:
            conn = psycopg_connection(self._engine, "eventbroker-announcer")
            if conn is None:
                return  # no psycopg 3: readers rely on the backstop interval
            self._conn = conn
            self.backend_pid = conn.info.backend_pid
        self._conn.execute("SELECT pg_notify(%s, %s)", (self._channel, self._payload))
        self.sent += 1

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        self.backend_pid = None
        _close_quietly(conn, "announcer")


class Listener:
    """The provider's reader: one thread, and on PostgreSQL one dedicated LISTEN connection.

    Args:
        fanout: where pages go.
        waker: woken whenever rows were read or a notification arrived (group members).
        read_page: a page past a cursor on a pooled connection.
        read_page_raw: the same on the LISTEN connection (PostgreSQL), or ``None``.
        engine, channel, address: for the LISTEN connection (``engine is None``: poll only).
        cursor: where to start.
        page_size, poll_interval, backstop_interval, selftest_timeout: see the provider.
    """

    def __init__(
        self, *, fanout: FanOut, waker: Waker, read_page: Callable[[Cursor, int], Page],
        read_page_raw: Callable[[Any, Cursor, int], Page] | None, engine: Engine | None,
        channel: str, address: str, cursor: Cursor, page_size: int, poll_interval: float,
        backstop_interval: float, selftest_timeout: float,
    ) -> None:
        self._fanout = fanout
        self._waker = waker
        self._read_page = read_page
        self._read_page_raw = read_page_raw
        self._engine = engine
        self._channel = channel
        self._address = address
        self._page_size = page_size
        self._poll = poll_interval
        self._backstop = backstop_interval
        self._selftest_timeout = selftest_timeout
        self.cursor = cursor
        self.mode = "connecting" if engine is not None else "poll"
        self.backend_pid: int | None = None
        self.reconnects = 0
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._conn: Any = None
        self._thread = QuietThread(target=self._run, daemon=True, name="eventbroker-db-listener")

    def start(self) -> None:
        self._thread.start()

    # -- control (other threads) --

    def kick(self) -> None:
        """Read now (a local write, a new stream)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def stop(self) -> None:
        self._stopping.set()
        self.kick()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        for s in (self._wake_r, self._wake_w):
            s.close()

    # -- the loop --

    def _run(self) -> None:
        retry = Backoff(5.0, base=0.05)
        first = True
        while not self._stopping.is_set():
            try:
                if self._engine is not None and self.mode != "poll":
                    self._connect()
                if not first:
                    self.reconnects += 1
                first = False
                self._loop(retry)
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect and catch up
                if self._stopping.is_set():
                    break
                logger.warning(
                    "eventbroker listener on %s: %s; reconnecting and catching up from seq %s",
                    self._address, exc, self.cursor[1],
                )
                self._close_conn()
                if self.mode == "notify":
                    self.mode = "connecting"
                self._sleep(retry.next())
        self._close_conn()

    def _loop(self, retry: Backoff) -> None:
        # Held-back rows wait for some other transaction to end, usually a short one (a
        # status write, a claim): look again within milliseconds, then less often.
        soon = Backoff(0.25, base=0.002)
        while not self._stopping.is_set():
            held = self._drain()
            retry.reset()
            if self._notified():
                continue  # a wake-up arrived while reading: read again at once
            if held:
                timeout = soon.next()
            else:
                soon.reset()
                # The backstop: even without any wake-up, read again after this long.
                timeout = self._backstop if self.mode == "notify" else self._poll
            self._wait(timeout)

    def _drain(self) -> bool:
        """Read every page past the cursor; True when rows are held back (look again soon)."""
        raw = self._conn if self.mode == "notify" else None
        while not self._stopping.is_set():
            active, jump = self._fanout.reading_state()
            if not active:
                # Nobody to deliver to (the listener only wakes group members): read nothing.
                # The next stream's start point moves the cursor (FanOut.register).
                return False
            if jump is not None and jump > self.cursor:
                self.cursor = jump
            if raw is not None and self._read_page_raw is not None:
                page = self._read_page_raw(raw, self.cursor, self._page_size)
            else:
                page = self._read_page(self.cursor, self._page_size)
            self.cursor = page.cursor
            if page.rows:
                self._fanout.dispatch(page.rows)
                self._fanout.retire_starts(self.cursor)
                self._waker.wake()
            if not page.full:
                return page.held_back
        return False

    def _notified(self) -> bool:
        """Take the notifications already received (also those that came in while the
        connection ran a query, which psycopg keeps); True if there were any."""
        conn = self._conn
        if conn is None:
            return False
        got = False
        for _ in conn.notifies(timeout=0):
            got = True
        if got:
            self._waker.wake()  # group members wait on the same news
        return got

    def _wait(self, timeout: float) -> None:
        conn = self._conn
        fds: list[Any] = [self._wake_r]
        if conn is not None:
            fds.append(conn.fileno())
        ready, _, _ = select.select(fds, [], [], timeout)
        if self._wake_r in ready:
            self._drain_wake()
        if conn is not None and not self._notified() and not ready:
            conn.execute("SELECT 1")  # idle: prove the connection is still alive

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            if select.select([self._wake_r], [], [], left)[0]:
                self._drain_wake()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass

    # -- the LISTEN connection --

    def _connect(self) -> None:
        assert self._engine is not None
        self._close_conn()
        conn = psycopg_connection(self._engine, "eventbroker-listener")
        if conn is None:
            logger.warning(
                "eventbroker: psycopg 3 is not available for LISTEN on %s; polling every %ss",
                self._address, self._poll,
            )
            self.mode = "poll"
            return
        self._conn = conn
        quoted = self._engine.dialect.identifier_preparer.quote_identifier(self._channel)
        conn.execute(f"LISTEN {quoted}")
        token = f"selftest:{uuid.uuid4().hex}"
        self._send_selftest(conn, token)
        deadline = time.monotonic() + self._selftest_timeout
        while (left := deadline - time.monotonic()) > 0:
            if any(n.payload == token for n in conn.notifies(timeout=left, stop_after=1)):
                self.mode = "notify"
                self.backend_pid = conn.info.backend_pid
                return
        logger.warning(
            "eventbroker: the LISTEN connection to %s did not receive its own test notification "
            "within %ss (a pooler in transaction mode?); falling back to polling every %ss",
            self._address, self._selftest_timeout, self._poll,
        )
        self._close_conn()
        self.mode = "poll"

    def _send_selftest(self, conn: Any, token: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (self._channel, token))

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        self.backend_pid = None
        _close_quietly(conn, "LISTEN")


def _close_quietly(conn: Any, what: str) -> None:
    """Close a dedicated connection, best effort: it may be broken already."""
    if conn is None:
        return
    try:
        conn.close()
    except Exception:  # best effort on a broken connection
        logger.debug("closing the %s connection failed", what, exc_info=True)
