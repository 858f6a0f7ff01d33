"""The eventbroker command: usage, config check, migrate and events list (on SQLite files)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import subprocess
import sys

import pytest
import sqlalchemy as sa
import yaml

from sqlalchemy_eventbroker.cli import URL_ENV, main
from sqlalchemy_eventbroker.cli._common import Progress, parse_time
from sqlalchemy_eventbroker.config import EventBrokerConfig

# -- usage ---------------------------------------------------------------------------------------


def test_main__no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command, the help goes to stderr and the status is 2."""
    assert main([]) == 2
    assert "usage: eventbroker" in capsys.readouterr().err


def test_main__help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints the commands and returns 0 instead of raising SystemExit."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "migrate" in out and "config" in out and "events" in out


@pytest.mark.parametrize("argv", [["nope"], ["migrate", "sideways"], ["events", "list", "--limit",
                                                                       "-1"]])
def test_main__usage_error_is_two(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command or bad option is a usage error: status 2, message on stderr."""
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("group", ["migrate", "config", "events", "dlq", "groups"])
def test_main__group_without_action_prints_its_help(
    group: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command group without its action shows that group's help, status 2."""
    assert main([group]) == 2
    assert f"usage: eventbroker {group}" in capsys.readouterr().err


# -- config check --------------------------------------------------------------------------------


def test_config_check__prints_effective_config(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A good file prints the whole effective configuration as YAML, defaults filled in."""
    path = tmp_path / "eb.yaml"
    path.write_text("event_broker:\n  worker_count: 3\n  memory: {max_age: 1h}\n")
    assert main(["config", "check", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = EventBrokerConfig(worker_count=3, memory={"max_age": 3600.0})  # type: ignore[arg-type]
    assert printed == {"event_broker": expected.to_dict()}


def test_config_check__json_format(tmp_path: pathlib.Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--format json prints JSON."""
    path = tmp_path / "eb.yaml"
    path.write_text("mode: sync\n")
    assert main(["config", "check", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["event_broker"]["mode"] == "sync"


def test_config_check__hides_passwords(tmp_path: pathlib.Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Passwords in the Redis section and the database URL are not printed."""
    path = tmp_path / "eb.yaml"
    path.write_text("redis: {password: hunter2}\n"
                    "database: {url: 'postgresql+psycopg://me:s3cret@db/app'}\n")
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "s3cret" not in out and "***" in out


def test_config_check__any_file_name(tmp_path: pathlib.Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """FILE is read as a file whatever its suffix."""
    path = tmp_path / "eventbroker.conf"
    path.write_text("buffer_size: 7\n")
    assert main(["config", "check", str(path)]) == 0
    assert "buffer_size: 7" in capsys.readouterr().out


def test_config_check__bad_value_is_one(tmp_path: pathlib.Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A file that fails to load is a failed command (API.md section 10): status 1, one line
    naming the file and the ConfigError's path."""
    path = tmp_path / "eb.yaml"
    path.write_text("event_broker:\n  worker_count: ten\n")
    assert main(["config", "check", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"error: {path}: event_broker.worker_count: expected int >= 1, got 'ten'")
    assert captured.out == ""


def test_config_check__unset_variable_is_one(tmp_path: pathlib.Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """An unset ${VAR} is reported with the variable's name."""
    monkeypatch.delenv("EB_CLI_TEST_UNSET", raising=False)
    path = tmp_path / "eb.yaml"
    path.write_text("instance_id: ${EB_CLI_TEST_UNSET}\n")
    assert main(["config", "check", str(path)]) == 1
    assert "EB_CLI_TEST_UNSET" in capsys.readouterr().err


def test_config_check__missing_file_is_one(tmp_path: pathlib.Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A file that does not exist is reported, status 1."""
    assert main(["config", "check", str(tmp_path / "none.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err


# -- migrate -------------------------------------------------------------------------------------


def tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrate__upgrade_then_downgrade(sqlite_url: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """upgrade creates the events table under our own version table; downgrade drops it."""
    assert main(["migrate", "upgrade", "--url", sqlite_url]) == 0
    after_up = tables(sqlite_url)
    assert "events" in after_up
    assert "alembic_version" not in after_up
    assert any(t.startswith("eventbroker_alembic_version") for t in after_up)
    assert "upgrade to head: done" in capsys.readouterr().out
    assert main(["migrate", "downgrade", "--url", sqlite_url]) == 0
    assert "events" not in tables(sqlite_url)


def test_migrate__upgrade_twice_is_harmless(sqlite_url: str) -> None:
    """Running upgrade on an up-to-date database changes nothing and succeeds."""
    assert main(["migrate", "upgrade", "--url", sqlite_url]) == 0
    assert main(["migrate", "upgrade", "--url", sqlite_url]) == 0


def test_migrate__table_name_option(sqlite_url: str) -> None:
    """--table-name creates the events table under that name."""
    assert main(["migrate", "upgrade", "--url", sqlite_url, "--table-name", "audit_events"]) == 0
    assert "audit_events" in tables(sqlite_url)


def test_migrate__url_from_environment(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --url, EVENTBROKER_DATABASE_URL is used."""
    monkeypatch.setenv(URL_ENV, sqlite_url)
    assert main(["migrate", "upgrade"]) == 0
    assert "events" in tables(sqlite_url)


def test_migrate__no_url_is_two(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """Without --url or the variable, the command says what is missing, status 2."""
    monkeypatch.delenv(URL_ENV, raising=False)
    assert main(["migrate", "upgrade"]) == 2
    assert URL_ENV in capsys.readouterr().err


def test_migrate__bad_url_is_one(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL SQLAlchemy cannot use fails the operation: status 1, a one-line error."""
    assert main(["migrate", "upgrade", "--url", "not a url"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


# -- events list ---------------------------------------------------------------------------------


@pytest.fixture
def stored(sqlite_url: str) -> str:
    """A SQLite database holding three events: two users events (one failed), one order."""
    from sqlalchemy_eventbroker.event import EventStatus, new_event
    from sqlalchemy_eventbroker.providers.base import EventFilter
    from sqlalchemy_eventbroker.providers.database import DatabaseProvider

    assert main(["migrate", "upgrade", "--url", sqlite_url]) == 0
    provider = DatabaseProvider(sqlite_url)
    try:
        for t in ("public.users.create", "public.orders.create", "public.users.update"):
            provider.store(new_event("database", t, {"t": t}))
        failed = provider.list(EventFilter(type_pattern="public.users.update"))[0]
        provider.update_status(failed.id, EventStatus.FAILED, "boom", retry_count=2)
    finally:
        provider.close()
    return sqlite_url


def test_events_list__all_oldest_first(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    """events list prints every stored event, oldest first, with a count."""
    assert main(["events", "list", "--url", stored]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[3] for line in lines[:-1]] == [
        "public.users.create", "public.orders.create", "public.users.update"]
    assert "retries=2" in lines[2] and "error='boom'" in lines[2]
    assert lines[-1] == "(3 events)"


def test_events_list__type_pattern_and_limit(stored: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--type filters by pattern and --limit caps the count."""
    assert main(["events", "list", "--url", stored, "--type", "public.users.*", "--limit",
                 "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "public.users.create" in lines[0]
    assert lines[1] == "(the first 1 event; --limit 0 for all)"  # says the list may go on


def test_events_list__status_and_json(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--status filters; --json prints one event object per line."""
    from sqlalchemy_eventbroker.event import Event

    assert main(["events", "list", "--url", stored, "--status", "failed", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    event = Event.from_json(lines[0])
    assert (event.type, event.error, event.retry_count) == ("public.users.update", "boom", 2)


def test_events_list__bad_pattern_is_two(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid --type pattern is reported, not a traceback."""
    assert main(["events", "list", "--url", stored, "--type", "a..b"]) == 2
    assert "a..b" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_config_check__redacts_every_url(tmp_path: pathlib.Path, fmt: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """NATS user:password (the password holding '@'), a NATS token and ?password= /
    sslpassword= in the database URL are masked in YAML and JSON output (issue 11, rows 2, 4)."""
    path = tmp_path / "eb.yaml"
    path.write_text(
        "nats: {url: 'nats://app:p@ss@S3cr3tA@h1:4222,nats://T0kenB@h2:4222,c:S3cr3tC@h3:4222'}\n"
        "database: {url: 'postgresql+psycopg://me@db/app?password=S3cr3tD&sslpassword=S3cr3tE'}\n"
        "redis: {password: S3cr3tF}\n")
    assert main(["config", "check", str(path), "--format", fmt]) == 0
    out = capsys.readouterr().out
    for secret in ("p@ss", "S3cr3tA", "T0kenB", "S3cr3tC", "S3cr3tD", "S3cr3tE", "S3cr3tF"):
        assert secret not in out, secret
    assert "nats://app:***@h1:4222" in out and "nats://***@h2:4222" in out
    assert "password=***" in out and "sslpassword=***" in out


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://u:S3cr3tX@127.0.0.1:1/x",
     "postgresql+psycopg://u@127.0.0.1:1/x?password=S3cr3tX",
     "postgresql+psycopg://u@127.0.0.1:1/x?sslpassword=S3cr3tX&connect_timeout=2"],
)
def test_events_list__error_hides_url_secrets(url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A failed command's error message never shows the URL's password, in any form."""
    assert main(["events", "list", "--url", url]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "S3cr3tX" not in err


@pytest.mark.parametrize(
    "name", ["bad-name", "x" * 36, "événements", "a\x00b", "1st"],
)
def test_table_name__one_check_for_migrate_and_events_list(
        sqlite_url: str, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """migrate and events list refuse the same table names, with the same message and status 2
    (issue 11, rows 17 and 9); nothing is created."""
    assert main(["migrate", "upgrade", "--url", sqlite_url, "--table-name", name]) == 2
    migrate_err = capsys.readouterr().err
    assert main(["events", "list", "--url", sqlite_url, "--table-name", name]) == 2
    list_err = capsys.readouterr().err
    assert migrate_err == list_err and "table_name" in migrate_err
    if len(name) == 36:
        assert "63 bytes" in migrate_err
    assert tables(sqlite_url) <= set()


def test_table_name__longest_accepted_name_works_end_to_end(
        sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A 35-character name (the longest whose version table fits 63 bytes) migrates and lists."""
    name = "t" * 35
    assert main(["migrate", "upgrade", "--url", sqlite_url, "--table-name", name]) == 0
    assert main(["events", "list", "--url", sqlite_url, "--table-name", name]) == 0
    assert name in tables(sqlite_url)


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://u:S3cr3tM%40x@127.0.0.1:1/x",
     "postgresql+psycopg://u@127.0.0.1:1/x?password=S3cr3tM&connect_timeout=2"],
)
def test_migrate_module__error_hides_url_secrets(url: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m sqlalchemy_eventbroker.migrate`` masks the URL's secrets in its errors,
    percent-encoded or not (issue 11, row 4)."""
    from sqlalchemy_eventbroker import migrate

    assert migrate.main(["upgrade", "--url", url]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "S3cr3tM" not in err


def test_redact_text__every_form_of_the_secret() -> None:
    """redact_text masks the URL as given, its password raw and percent-decoded, a token and
    query passwords."""
    from sqlalchemy_eventbroker.providers._urls import redact_text

    url = "postgresql://u:p%40ss123@h/x?sslpassword=S3cr,nats://T0ken9@h2"
    text = f"at {url}: p@ss123 / p%40ss123 / S3cr / T0ken9"
    out = redact_text(text, url)
    for secret in ("p@ss123", "p%40ss123", "S3cr", "T0ken9"):
        assert secret not in out


# -- times and progress (API.md section 10: T, and the bar on a terminal only) -------------------


@pytest.mark.parametrize(("text", "seconds"), [("15m", 900), ("24h", 86400), ("30d", 2592000),
                                               ("90s", 90), ("1h30m", 5400), ("2w", 1209600)])
def test_parse_time__durations_count_back_from_now(text: str, seconds: int) -> None:
    now = dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)
    assert parse_time(text, now=now) == now - dt.timedelta(seconds=seconds)


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-01-02T03:04:05Z", dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)),
    ("2026-01-02T03:04:05+02:00", dt.datetime(2026, 1, 2, 1, 4, 5, tzinfo=dt.UTC)),
    ("2026-01-02", dt.datetime(2026, 1, 2, tzinfo=dt.UTC)),  # naive: UTC
])
def test_parse_time__iso_8601(text: str, expected: dt.datetime) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "15", "5x", "m15", ""])
def test_parse_time__anything_else_is_a_usage_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="ISO-8601"):
        parse_time(text)


def test_progress__a_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Piped stderr: nothing at all. A terminal with tqdm: a bar on stderr, never stdout."""
    bar = Progress("purge")
    bar.start(3)
    bar.update(3)
    bar.close()
    assert capsys.readouterr() == ("", "")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = Progress("purge")
    bar.start(3)
    bar.update(3)
    bar.close()
    out, err = capsys.readouterr()
    assert out == "" and "purge:" in err and "/3 " in err  # cleared at the end (leave=False)


def test_progress__without_tqdm_no_bar(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """tqdm is the optional [cli] extra: without it the work runs the same, with no bar."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    bar = Progress("replay")
    bar.start(None)
    bar.update(1)
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_cli__tqdm_is_imported_lazily() -> None:
    """Importing the command line (or running a command that shows no bar) loads no tqdm."""
    code = ("import sys; from sqlalchemy_eventbroker.cli import main; "
            "main(['--help']); assert 'tqdm' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True,
                          check=False).returncode == 0


def test_errors__a_database_user_name_alone_is_not_masked_everywhere(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """postgresql://postgres@host: the user is no secret, and masking it in the whole message
    would garble it ('***ql+psycopg://'); a password still never shows."""
    assert main(["stats", "--url", "postgresql+psycopg://postgres@127.0.0.1:1/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: database at postgresql+psycopg://") and "***ql" not in err
    assert err.count("\n") == 1  # the driver's two-line message, folded
    assert main(["stats", "--url", "postgresql+psycopg://postgres:pw-9x@127.0.0.1:1/x"]) == 1
    assert "pw-9x" not in capsys.readouterr().err
