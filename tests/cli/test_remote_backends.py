"""The commands that work through the Provider protocol, on redis:// and nats:// URLs."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator

import pytest

from sqlalchemy_eventbroker import EventStatus, new_event
from sqlalchemy_eventbroker.providers.base import EventFilter, Provider
from tests.cli.conftest import EVENTBROKER, one_line_error, read_lines, run
from tests.conftest import NATS_URL, REDIS_URL, require_service


@pytest.fixture(params=["redis", "nats"])
def remote(request: pytest.FixtureRequest, unique_name: str) -> Iterator[tuple[Provider, list[str]]]:
    """A provider on its own stream, and the CLI arguments that name the same stream."""
    if request.param == "redis":
        from sqlalchemy_eventbroker.providers.redis import RedisProvider

        url = require_service("Redis", REDIS_URL, 6379)
        stream = f"test:cli:{unique_name}"
        provider: Provider = RedisProvider(url, stream_name=stream)
    else:
        from sqlalchemy_eventbroker.providers.nats import NatsProvider

        url = require_service("NATS", NATS_URL, 4222)
        stream = f"TCLI{unique_name}"
        provider = NatsProvider(url, stream_name=stream)
    try:
        yield provider, ["--url", url, "--stream-name", stream]
    finally:
        provider.drop()  # type: ignore[attr-defined]
        provider.close()


def test_remote__list_show_stats_dlq_purge_and_tail(remote: tuple[Provider, list[str]]) -> None:
    """list, show, stats, dlq list/redrive, purge and a live tail through the protocol; groups
    list is refused as needing a database (status 2)."""
    provider, args = remote
    ok = new_event("internal", "r.orders.created", {"n": 1})
    bad = new_event("internal", "r.orders.paid", {"n": 2})
    bad.status, bad.error = EventStatus.FAILED, "boom"
    for e in (ok, bad):
        provider.publish(e)

    tail = subprocess.Popen([EVENTBROKER, "events", "tail", "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc = run("events", "list", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        assert sorted(json.loads(x)["id"] for x in proc.stdout.splitlines()) == sorted([ok.id, bad.id])
        proc = run("events", "show", bad.id, "--json", *args)
        assert json.loads(proc.stdout)["error"] == "boom"
        assert run("events", "show", "nope", *args).returncode == 1
        s = json.loads(run("stats", "--json", *args).stdout)
        assert (s["total"], s["by_status"]["failed"], s["groups"]) == (2, 1, [])
        assert s["by_type"] == {"r.orders.created": 1, "r.orders.paid": 1}
        proc = run("dlq", "list", "--json", *args)
        assert [json.loads(x)["id"] for x in proc.stdout.splitlines()] == [bad.id]
        assert run("groups", "list", *args).returncode == 2

        assert tail.stderr is not None and tail.stdout is not None
        assert read_lines(tail.stderr, 1)[0].startswith("following '*'")
        assert run("dlq", "redrive", bad.id, *args).returncode == 0  # travels again: tail sees it
        seen = json.loads(read_lines(tail.stdout, 1)[0])
        assert (seen["id"], seen["status"]) == (bad.id, "pending")
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=30) == 0
        assert "Traceback" not in tail.stderr.read()

        proc = run("events", "purge", "--older-than", "0s", "--status", "pending", *args)
        assert proc.returncode == 0 and proc.stdout.startswith("purged 2 events"), proc.stderr
        assert provider.list(EventFilter()) == []
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()


def test_remote__unreachable_is_one_line() -> None:
    """An unreachable Redis: status 1, one line, the password masked."""
    proc = run("stats", "--url", "redis://:hunter22@127.0.0.1:1/0")
    assert proc.returncode == 1 and "hunter22" not in one_line_error(proc)
