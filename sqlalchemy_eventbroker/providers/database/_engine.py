"""Connections: the provider's engine, its dedicated psycopg connections, and its errors.

Driver errors become :class:`~sqlalchemy_eventbroker.errors.ProviderError` here, in one place
(:class:`ErrorTranslator`), with a message that says what is wrong and what to do, names the
address and never shows the password.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ...errors import ProviderError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

__all__ = ["Database", "ErrorTranslator", "make_engine", "psycopg_connection"]

_ASYNC_DRIVERS = {"asyncpg": "psycopg", "psycopg_async": "psycopg", "aiosqlite": "pysqlite"}

#: A pooled connection idle for longer than this is pinged before use (see _ping_when_idle).
_PING_AFTER_IDLE = 1.0

_UNREACHABLE = (
    "connection refused", "could not connect", "connection failed", "timeout", "timed out",
    "name or service not known", "unable to open database", "server closed the connection",
    "terminating connection", "no route",
)  # fmt: skip


def make_engine(target: Any, connect_timeout: float) -> tuple[Engine, bool]:
    """The engine to use for ``target`` and whether the provider owns (disposes) it.

    Async URLs and engines are mapped to their sync driver; PostgreSQL gets psycopg 3 and a
    connect timeout; an in-memory SQLite database is one shared connection.
    """
    if isinstance(target, sa.Engine):
        return target, False
    sync_engine = getattr(target, "sync_engine", None)  # an AsyncEngine
    if isinstance(sync_engine, sa.Engine):
        target = sync_engine.url
    url = sa.make_url(target)
    backend, _, driver = url.drivername.partition("+")
    if driver in _ASYNC_DRIVERS:
        url = url.set(drivername=f"{backend}+{_ASYNC_DRIVERS[driver]}")
    kwargs: dict[str, Any] = {}
    if backend == "postgresql":
        if not driver or driver in _ASYNC_DRIVERS:
            url = url.set(drivername="postgresql+psycopg")
        if "connect_timeout" not in url.query:
            kwargs["connect_args"] = {"connect_timeout": max(1, int(connect_timeout))}
    elif backend == "sqlite" and url.database in (None, "", ":memory:"):
        kwargs = {"poolclass": sa.pool.StaticPool, "connect_args": {"check_same_thread": False}}
    engine = sa.create_engine(url, **kwargs)
    if backend != "sqlite":
        _ping_when_idle(engine)
    return engine, True


def _ping_when_idle(engine: Engine, after: float = _PING_AFTER_IDLE) -> None:
    """``pool_pre_ping``, but only for connections that sat in the pool over ``after`` s.

    A ping is a round trip, as much as the statement it protects when the provider is busy.
    A connection that was in use a moment ago is alive with near certainty; one that slept
    may have been cut (server restart, idle timeout, ``pg_terminate_backend``) and is replaced
    transparently. One that dies between uses anyway fails its statement with a ProviderError
    and the engine then invalidates the pool, so the next call reconnects.
    """

    @sa.event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        record.info["eventbroker_idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("eventbroker_idle_since")
        if since is None or time.monotonic() - since <= after:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # noqa: BLE001 - any failure: this connection is gone
            raise sa_exc.DisconnectionError(str(exc)) from exc
        if not alive:
            raise sa_exc.DisconnectionError("ping failed")


def psycopg_connection(engine: Engine, application_name: str) -> Any:
    """A dedicated autocommit psycopg 3 connection made with the engine's connect arguments,
    or ``None`` when psycopg 3 is not installed. Used for LISTEN and for announcements."""
    try:
        import psycopg
    except ImportError:
        return None
    creator = getattr(engine.pool, "_creator", None)
    conn: Any
    if engine.dialect.driver == "psycopg" and callable(creator):
        # A NEW connection made exactly as the engine makes them (its URL, connect_args and
        # do_connect hooks), never a pooled one: a pooled connection's backend was just used
        # by the application, and this one must be told apart from it (and outlive the pool).
        conn = creator()
    elif engine.dialect.driver == "psycopg":
        raw = engine.raw_connection()
        conn = raw.driver_connection
        raw.detach()
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
    else:
        args = engine.url.translate_connect_args(username="user", database="dbname")
        args.update({k: v for k, v in engine.url.query.items() if isinstance(v, str)})
        conn = psycopg.connect(**args)
    conn.autocommit = True
    conn.execute("SELECT set_config('application_name', %s, false)", (application_name,))
    return conn


class ErrorTranslator:
    """Turns driver errors into :class:`ProviderError` for one provider's address and table."""

    def __init__(self, address: str, table_name: str) -> None:
        self.address = address
        self.table_name = table_name

    @contextmanager
    def __call__(self) -> Iterator[None]:
        try:
            yield
        except ProviderError:
            raise
        except sa_exc.StatementError as exc:
            # The chained error is kept for debugging, but never prints its parameters: they
            # hold payloads (an outbox write's whole JSON document).
            exc.hide_parameters = True
            if isinstance(exc, sa_exc.DBAPIError):
                raise self.describe(exc) from exc
            orig = exc.orig
            first = (str(orig).splitlines() or [""])[0]
            raise ProviderError(f"database at {self.address}: {type(orig).__name__}: {first}") from exc
        except sa_exc.SQLAlchemyError as exc:
            raise ProviderError(f"database at {self.address}: {exc}") from exc

    def describe(self, exc: sa_exc.DBAPIError) -> ProviderError:
        """A :class:`ProviderError` saying what ``exc`` means and what to do about it.

        Only the driver's own message is quoted (the statement and its parameters, which may
        hold payloads, never are).
        """
        orig = exc.orig
        diag = getattr(orig, "diag", None)
        # PostgreSQL's primary message only: its DETAIL/CONTEXT lines may quote row data.
        text = (getattr(diag, "message_primary", None) or str(orig)).strip()
        low = text.lower()
        code = getattr(orig, "sqlstate", None) or getattr(diag, "sqlstate", None)
        addr = f"database at {self.address}"
        if code == "42P01" or "no such table" in low or ("relation" in low and "does not exist" in low):
            return ProviderError(
                f"{addr}: the events table {self.table_name!r} (or its _groups/_claims tables) "
                f"is missing: run the migrations: python -m sqlalchemy_eventbroker.migrate upgrade "
                f"--url '{self.address}' --table-name {self.table_name} "
                f"(or call DatabaseProvider.create_schema()). Driver said: {text}"
            )
        if code in ("28P01", "28000") or "password authentication failed" in low or (
            "role" in low and "does not exist" in low
        ) or "no password supplied" in low:
            return ProviderError(
                f"{addr}: wrong credentials: the server rejected the user or password; "
                f"check them in the URL. Driver said: {text}"
            )
        if code == "3D000" or ("database" in low and "does not exist" in low):
            return ProviderError(
                f"{addr}: the database does not exist: create it first "
                f"(CREATE DATABASE ...). Driver said: {text}"
            )
        if exc.connection_invalidated or any(s in low for s in _UNREACHABLE):
            return ProviderError(
                f"{addr}: unreachable: is the server running and are host and port right? "
                f"Driver said: {text}"
            )
        return ProviderError(f"{addr}: {text}")


class Database:
    """How the provider's pieces use the engine: every use translates errors, and uses of an
    in-memory SQLite database (one shared connection) are serialised."""

    def __init__(self, engine: Engine, errors: ErrorTranslator, *, serialise: bool,
                 autocommit_single: bool) -> None:
        self.engine = engine
        self.errors = errors
        self._serial: AbstractContextManager[Any] = threading.RLock() if serialise else nullcontext()
        self._autocommit_single = autocommit_single

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection for reads (no transaction is committed)."""
        with self.errors(), self._serial, self.engine.connect() as conn:
            yield conn

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection in a transaction, committed on success."""
        with self.errors(), self._serial, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def one_statement(self) -> Iterator[Connection]:
        """A connection for work that is ONE statement (stores, group claim/ack/renew).

        PostgreSQL: autocommit (a single statement is its own transaction: no BEGIN/COMMIT
        round trips); elsewhere a transaction (SQLite's claim is a compare-and-set of two
        statements, which it keeps together)."""
        with self.errors(), self._serial:
            if self._autocommit_single:
                with self.engine.connect() as conn:
                    yield conn.execution_options(isolation_level="AUTOCOMMIT")
            else:
                with self.engine.begin() as conn:
                    yield conn
