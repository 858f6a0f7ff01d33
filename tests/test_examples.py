"""The examples run as a user would run them: a fresh interpreter, exit code 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_quickstart__runs_and_prints_the_captured_events() -> None:
    """examples/quickstart.py exits 0 and shows create, update, bulk and cascade events."""
    proc = _run("examples/quickstart.py")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in ("main.users.create", "main.orders.create", "main.users.update",
                     "'old': 'free', 'new': 'pro'", "main.orders.update", "main.orders.delete",
                     "main.users.delete", "user_id=7"):
        assert expected in out, out
    assert "ghost" not in out
    assert "s3cr3t" not in out and "password_hash" not in out  # exclude_columns


@pytest.mark.parametrize("args", [(), ("--database",)], ids=["memory", "database"])
def test_audit_trail__prints_who_changed_what(args: tuple[str, ...]) -> None:
    """examples/audit_trail.py exits 0 with the history, without the rolled-back change, and
    replaying the link events rebuilds the many-to-many table."""
    proc = _run("examples/audit_trail.py", *args)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "update  by user 2   (request deposit-7): balance: 100.00 -> 125.50" in out, out
    assert "bad-9" not in out
    assert "(matches the table)" in out, out


def test_replicas__each_mail_once_every_replica_sees_every_change() -> None:
    """examples/replicas.py: two worker processes on a shared SQLite file split the group
    events (each once) and both see every fan-out event."""
    proc = _run("examples/replicas.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "each mail sent once, every replica saw every change" in proc.stdout


def test_quickstart__runs_without_greenlet() -> None:
    """The README's first command needs only the core install: SQLAlchemy 2.1 without greenlet
    (its asyncio extension cannot import) must not stop capture on plain sessions."""
    code = ("import sys, runpy; sys.modules['greenlet'] = None; sys.argv = ['quickstart.py']; "
            "runpy.run_path('examples/quickstart.py', run_name='__main__')")
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "main.users.create" in proc.stdout


FASTAPI_DONE = ("worker confirmed 3 of 3 orders",
                "the request's trace continued in the worker for 3 of 3 orders")


def test_fastapi_app__worker_confirms_each_order_in_the_requests_trace() -> None:
    """examples/fastapi_app.py on SQLite: the worker process mails each order once, and its
    process spans carry the trace ids the requests returned (the SDK is a test dependency)."""
    pytest.importorskip("fastapi")
    proc = _run("examples/fastapi_app.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for expected in FASTAPI_DONE:
        assert expected in proc.stdout, proc.stdout
    assert "'process main.orders.create' trace=" in proc.stdout


def test_fastapi_app__runs_on_postgresql(postgres_url: str) -> None:
    """The same demo given a PostgreSQL URL (LISTEN/NOTIFY wakes the worker)."""
    pytest.importorskip("fastapi")
    proc = _run("examples/fastapi_app.py", "--url", postgres_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for expected in FASTAPI_DONE:
        assert expected in proc.stdout, proc.stdout
    assert "'process public.orders.create' trace=" in proc.stdout


def test_inbox__each_order_invoiced_once() -> None:
    """examples/inbox.py: a failed first attempt and a redelivery of every event still leave
    one invoice per order."""
    proc = _run("examples/inbox.py")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "deliveries: 7" in out and "function calls: 4" in out, out
    assert "each order invoiced once" in out and "purged 3 inbox rows" in out, out


def test_ordered__two_replicas_keep_each_orders_commit_order() -> None:
    """examples/ordered.py: an ordered group over two replicas handles each order's create,
    paid and shipped in commit order, never two of one order at once, on both replicas."""
    proc = _run("examples/ordered.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every order's events handled in commit order, never two at once" in proc.stdout
    assert "main.orders:1 -> new -> paid -> shipped" in proc.stdout
