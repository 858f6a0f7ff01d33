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
