"""Every command of API.md section 10 through the console script, on SQLite and PostgreSQL.

Each test runs a handful of subprocesses against the module's seeded store (see conftest):
the text output, ``--json`` and the exit status of each command.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys

import pytest

from sqlalchemy_eventbroker import Event, EventStatus, new_event
from tests.cli.conftest import EVENTBROKER, Seeded, one_line_error, read_lines, run


def _json_lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def test_events_list_and_show(seeded: Seeded) -> None:
    """list: oldest first, filters, --limit, --json as Event.to_dict(); show: every field,
    an unknown id exits 1 with one line."""
    u = seeded.url
    proc = run("events", "list", "--url", u)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "(7 events)"
    assert "shop.users.created" in lines[0]  # the day-old one is the oldest
    assert "error='smtp: down\\nsecond line'" in proc.stdout  # one line per event

    proc = run("events", "list", "--url", u, "--json", "--type", "shop.orders.*", "--limit", "3")
    got = [Event.from_dict(d) for d in _json_lines(proc.stdout)]
    assert proc.returncode == 0 and len(got) == 3
    assert [e.id for e in got] == [e.id for e in seeded.events["completed"][:3]]

    proc = run("events", "list", "--url", u, "--json", "--status", "pending", "--since", "2h")
    assert [d["id"] for d in _json_lines(proc.stdout)] == [seeded.events["pending"][1].id]
    proc = run("events", "list", "--url", u, "--json", "--until", "1h")
    assert [d["id"] for d in _json_lines(proc.stdout)] == [seeded.events["pending"][0].id]

    failed = seeded.events["failed"][0]
    proc = run("events", "show", failed.id, "--url", u)
    assert proc.returncode == 0
    assert f"id            {failed.id}" in proc.stdout
    assert 'error         "smtp: down\\nsecond line"' in proc.stdout
    proc = run("events", "show", failed.id, "--url", u, "--json")
    assert Event.from_dict(json.loads(proc.stdout)).to_dict() == failed.to_dict()

    proc = run("events", "show", "00000000-0000-0000-0000-000000000000", "--url", u)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "no stored event" in one_line_error(proc)
    proc = run("events", "list", "--url", u, "--since", "yesterday")
    assert proc.returncode == 2 and "ISO-8601" in proc.stderr


def test_stats_groups_and_dlq_list(seeded: Seeded) -> None:
    """stats and groups list report counts, ages, the group's lag, lease and member; dlq list
    shows the failed event."""
    u = seeded.url
    proc = run("stats", "--url", u, "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["total"] == 7
    assert s["by_status"] == {"pending": 2, "processing": 0, "completed": 4, "failed": 1}
    assert s["by_type"] == {"shop.orders.created": 4, "shop.users.created": 2, "shop.orders.paid": 1}
    assert 86000 < s["oldest_pending_age_s"] < 90000
    assert s["groups"] == [{"group": "mailer", "pattern": "shop.orders.*", "pending": 4,
                            "in_flight": 1, "oldest_unclaimed_age_s": s["groups"][0][
                                "oldest_unclaimed_age_s"], "members": 1}]
    if seeded.kind == "postgresql":
        assert 0.0 <= s["notify_queue_usage"] < 0.5
    else:
        assert s["notify_queue_usage"] is None

    proc = run("stats", "--url", u, "--top", "1")
    assert proc.returncode == 0
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["events", "7"] in rows and ["other", "3"] in rows and ["shop.orders.created", "4"] in rows
    assert "mailer" in proc.stdout and ("notify queue" in proc.stdout) == (seeded.kind == "postgresql")

    proc = run("groups", "list", "--url", u, "--json")
    assert proc.returncode == 0
    (g,) = _json_lines(proc.stdout)
    assert {k: g[k] for k in ("group", "pattern", "pending", "in_flight", "members")} == {
        "group": "mailer", "pattern": "shop.orders.*", "pending": 4, "in_flight": 1, "members": 1}
    proc = run("groups", "list", "--url", u)
    assert proc.stdout.splitlines()[0].split() == ["GROUP", "PATTERN", "PENDING", "IN-FLIGHT",
                                                   "OLDEST", "MEMBERS"]

    proc = run("dlq", "list", "--url", u, "--json")
    assert [d["id"] for d in _json_lines(proc.stdout)] == [seeded.events["failed"][0].id]
    proc = run("dlq", "list", "--url", u)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "(1 event)"


def test_dlq_redrive_purge_and_replay(seeded: Seeded, tmp_path: pathlib.Path) -> None:
    """On a table of its own: redrive by id and --all, purge (dry run, default status, named
    statuses) and replay into a handler module from the current directory."""
    table, p = seeded.new_table()
    try:
        old = new_event("internal", "a.b.c")
        old.created_at = old.created_at.replace(year=2020)
        fails = [new_event("internal", "a.b.fail") for _ in range(3)]
        for e in fails:
            e.status, e.error, e.retry_count = EventStatus.FAILED, "boom", 3
        done = new_event("internal", "a.b.done")
        done.status = EventStatus.COMPLETED
        p.store_and_publish_many([old, *fails, done])
        args = ("--url", seeded.url, "--table-name", table)

        proc = run("dlq", "redrive", fails[0].id, *args)
        assert proc.returncode == 0 and proc.stdout == "redrove 1 event\n", proc.stderr
        again = p.get(fails[0].id)
        assert again is not None and again.status is EventStatus.PENDING
        assert (again.error, again.retry_count) == ("", 0)
        proc = run("dlq", "redrive", fails[0].id, *args)
        assert proc.returncode == 1 and "is pending, not failed" in one_line_error(proc)
        assert run("dlq", "redrive", *args).returncode == 2
        proc = run("dlq", "redrive", "--all", "--json", *args)
        assert proc.returncode == 0
        assert sorted(d["redriven"] for d in _json_lines(proc.stdout)) == sorted(
            e.id for e in fails[1:])

        # replay: a module in the current directory, sync handler; a failing one exits 1
        (tmp_path / "replay_target.py").write_text(
            "seen = []\n"
            "def handle(event):\n"
            "    with open('seen.txt', 'a') as f:\n"
            "        f.write(event.type + '\\n')\n"
            "def fail(event):\n"
            "    raise RuntimeError('no\\nway')\n"
            "async def ahandle(event):\n"
            "    handle(event)\n")
        proc = run("events", "replay", "--handler", "replay_target:handle", "--type", "a.b.*",
                   "--since", "2021-01-01", *args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "replayed 4 events\n" and proc.stderr == ""  # no bar when piped
        assert sorted((tmp_path / "seen.txt").read_text().split()) == sorted(
            ["a.b.fail"] * 3 + ["a.b.done"])
        proc = run("events", "replay", "--handler", "replay_target:ahandle", "--json", "--type",
                   "a.b.done", *args, cwd=tmp_path)  # async def: awaited
        assert json.loads(proc.stdout) == {"replayed": 1}
        assert (tmp_path / "seen.txt").read_text().split().count("a.b.done") == 2
        proc = run("events", "replay", "--handler", "replay_target:fail", *args, cwd=tmp_path)
        assert proc.returncode == 1 and "RuntimeError: no way" in one_line_error(proc)
        assert run("events", "replay", "--handler", "nomodule", *args).returncode == 2

        # purge: completed by default, counted from created_at
        proc = run("events", "purge", "--older-than", "0s", "--dry-run", *args)
        assert proc.returncode == 0 and proc.stdout.startswith("would purge 1 event ")
        proc = run("events", "purge", "--older-than", "30d", "--status", "pending", "--json", *args)
        assert json.loads(proc.stdout)["purged"] == 1  # only the 2020 one
        assert p.get(old.id) is None
        proc = run("events", "purge", "--older-than", "0s", "--status", "completed,pending", *args)
        assert proc.returncode == 0 and proc.stdout.startswith("purged 4 events ")
        assert [e.id for e in p.list()] == []  # everything was completed or pending by now
    finally:
        p.drop_schema()
        p.close()


def test_events_tail_follows_live_events(seeded: Seeded) -> None:
    """A tail started first sees events published afterwards, a line each as it comes
    (flushed through a pipe), and Ctrl-C ends it with status 0 and no traceback."""
    table, p = seeded.new_table()
    proc = subprocess.Popen([EVENTBROKER, "events", "tail", "--url", seeded.url, "--table-name",
                             table, "--json", "--type", "live.*.*"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        ready = read_lines(proc.stderr, 1)[0]  # printed once its stream is open
        assert ready.startswith("following 'live.*.*'"), ready
        sent = [new_event("internal", f"live.item.{n}") for n in ("a", "b", "c")]
        p.store_and_publish_many([new_event("internal", "other.item.x")])
        for e in sent:
            p.publish(e)
        lines = read_lines(proc.stdout, 3)  # each flushed as it came, through a pipe
        assert [json.loads(line)["id"] for line in lines] == [e.id for e in sent]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert "Traceback" not in rest and rest == "", rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        p.drop_schema()
        p.close()


def test_migrate_current_and_downgrade(seeded: Seeded) -> None:
    """current prints the applied revision (none before upgrade); downgrade to base drops
    the tables of that table name only."""
    args = ("--url", seeded.url, "--table-name", "scratch")
    assert run("migrate", "current", *args).stdout == "none\n"
    assert run("migrate", "upgrade", *args).returncode == 0
    proc = run("migrate", "current", *args, "--json")
    head = json.loads(proc.stdout)["revision"]
    assert proc.returncode == 0 and head and head[:4].isdigit()
    proc = run("migrate", "downgrade", *args)
    assert proc.returncode == 0 and proc.stdout.startswith("downgrade to base: done")
    assert run("migrate", "current", *args).stdout == "none\n"
    assert run("migrate", "current", "--url", seeded.url).stdout.strip() == head


def test_config_file_instead_of_url(seeded: Seeded, tmp_path: pathlib.Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--config FILE names the store through its database section (${VAR} expanded)."""
    monkeypatch.setenv("EB_CLI_TEST_URL", seeded.url)
    cfg = tmp_path / "eb.yaml"
    cfg.write_text("event_broker:\n  provider: database\n  database: {url: '${EB_CLI_TEST_URL}'}\n")
    proc = run("stats", "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total"] == 7
    proc = run("config", "check", str(cfg), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["event_broker"]["provider"] == "database"


def test_failures_are_one_line_without_secrets_or_traceback(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unreachable server: 1, one line naming the address, no password; bad usage: 2; the
    memory provider in a config file is bad usage; python -m works like the script."""
    url = "postgresql+psycopg://alice:s3cr3t-pw@127.0.0.1:1/app?connect_timeout=2"
    for argv in (("stats", "--url", url), ("events", "tail", "--url", url),
                 ("migrate", "upgrade", "--url", url)):
        proc = run(*argv)
        assert proc.returncode == 1, proc.stderr
        line = one_line_error(proc)
        assert "s3cr3t" not in line and "127.0.0.1" in line
    monkeypatch.delenv("EVENTBROKER_DATABASE_URL", raising=False)
    proc = run("events", "list")  # no --url and no $EVENTBROKER_DATABASE_URL
    assert proc.returncode == 2 and "--url" in one_line_error(proc)
    cfg = tmp_path / "mem.yaml"
    cfg.write_text("provider: memory\n")
    proc = run("events", "list", "--config", str(cfg))
    assert proc.returncode == 2 and "memory" in one_line_error(proc)
    proc = run("events", "list", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 1 and "does not exist" in one_line_error(proc)
    proc = run("groups", "list", "--url", "redis://127.0.0.1:6379/0")
    assert proc.returncode == 2 and "needs a database" in one_line_error(proc)
    proc = subprocess.run([sys.executable, "-m", "sqlalchemy_eventbroker", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0
    for command in ("migrate", "config", "events", "dlq", "groups", "stats", "need a database"):
        assert command in " ".join(proc.stdout.split()), command
