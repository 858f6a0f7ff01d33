"""load_config, EventBrokerConfig and build_provider: every rule, every bad input named by path."""

from __future__ import annotations

import pathlib
import sys
import types
from typing import Any

import pytest

from sqlalchemy_eventbroker.config import (
    DatabaseConfig,
    EventBrokerConfig,
    MemoryConfig,
    NatsConfig,
    RedisConfig,
    build_provider,
    load_config,
    parse_duration,
)
from sqlalchemy_eventbroker.errors import ConfigError
from sqlalchemy_eventbroker.retry import RetryPolicy

FULL_YAML = """\
event_broker:
  enabled: true
  provider: memory          # memory | database | redis | nats
  mode: async               # sync | async
  worker_count: 10
  buffer_size: 1000
  instance_id: "${HOSTNAME}"
  retry_policy: {max_retries: 3, initial_delay: 1s, max_delay: 30s, backoff_factor: 2.0}
  memory: {max_events: 10000, cleanup_interval: 5m, max_age: 24h}
  database: {url: "postgresql+psycopg://127.0.0.1/app", table_name: events, channel: eventbroker_events}
  redis: {host: 127.0.0.1, port: 6379, db: 0, password: "", stream_name: "eventbroker:events", consumer_group: eventbroker-workers}
  nats: {url: "nats://127.0.0.1:4222", stream_name: EVENTBROKER_EVENTS}
"""


def error_of(source: Any, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(source, **kw)
    return info.value


# -- sources ---------------------------------------------------------------------------------


def test_load_config__api_example_yaml_string() -> None:
    """The API.md example loads, with durations in seconds and the variable expanded."""
    config = load_config(FULL_YAML, env={"HOSTNAME": "api-1"})
    assert config.enabled is True
    assert config.provider == "memory"
    assert config.mode == "async"
    assert config.worker_count == 10
    assert config.buffer_size == 1000
    assert config.instance_id == "api-1"
    assert config.retry_policy == RetryPolicy(3, 1.0, 30.0, 2.0)
    assert config.memory == MemoryConfig(max_events=10000, cleanup_interval=300.0, max_age=86400.0)
    assert config.database.url == "postgresql+psycopg://127.0.0.1/app"
    assert config.database.table_name == "events"
    assert config.database.channel == "eventbroker_events"
    assert config.redis == RedisConfig()
    assert config.nats == NatsConfig()


def test_load_config__file_path_str(tmp_path: pathlib.Path) -> None:
    """A str naming a YAML file is read as that file."""
    path = tmp_path / "broker.yaml"
    path.write_text("event_broker:\n  worker_count: 3\n")
    assert load_config(str(path)).worker_count == 3


def test_load_config__pathlike(tmp_path: pathlib.Path) -> None:
    """An os.PathLike is read as a file, whatever its suffix."""
    path = tmp_path / "broker.conf"
    path.write_text("mode: sync\n")
    assert load_config(path).mode == "sync"


def test_load_config__existing_file_without_yaml_suffix_as_str(tmp_path: pathlib.Path) -> None:
    """A one-line str that names an existing file is a path even without .yaml."""
    path = tmp_path / "broker.conf"
    path.write_text("buffer_size: 5\n")
    assert load_config(str(path)).buffer_size == 5


def test_load_config__missing_yaml_file(tmp_path: pathlib.Path) -> None:
    """A .yaml path that does not exist is a ConfigError naming the file."""
    missing = tmp_path / "nope.yaml"
    err = error_of(str(missing))
    assert err.path == "event_broker"
    assert "nope.yaml" in str(err)


def test_load_config__missing_path_looks_like_text() -> None:
    """A one-word string that is no file says a mapping or existing file was expected."""
    err = error_of("broker.conf")
    assert err.path == "event_broker"
    assert "expected a mapping" in str(err) and "broker.conf" in str(err)


def test_load_config__dict() -> None:
    """A dict is taken as the options."""
    assert load_config({"provider": "memory", "worker_count": 2}).worker_count == 2


def test_load_config__dict_under_event_broker() -> None:
    """Options may sit under an event_broker key."""
    assert load_config({"event_broker": {"mode": "sync"}}).mode == "sync"


def test_load_config__siblings_of_event_broker_ignored() -> None:
    """Beside event_broker, an application's own keys are not ours and are not checked."""
    config = load_config({"app": {"debug": True}, "event_broker": {"worker_count": 4}})
    assert config.worker_count == 4


def test_load_config__config_object_returned_as_is() -> None:
    """An EventBrokerConfig passes straight through."""
    config = EventBrokerConfig(worker_count=2)
    assert load_config(config) is config


@pytest.mark.parametrize("source", ["", "   \n", "event_broker:\n", {}, {"event_broker": None}])
def test_load_config__empty_means_defaults(source: Any) -> None:
    """Empty text, an empty mapping or an empty event_broker section give the defaults."""
    assert load_config(source) == EventBrokerConfig()


def test_load_config__empty_sections_mean_defaults() -> None:
    """A section written with no value keeps its defaults."""
    config = load_config("memory:\nredis:\n")
    assert config.memory == MemoryConfig() and config.redis == RedisConfig()


def test_load_config__invalid_yaml() -> None:
    """YAML that does not parse is a ConfigError at event_broker."""
    err = error_of("provider: [memory\n")
    assert err.path == "event_broker"
    assert "not valid YAML" in str(err)


def test_load_config__unreadable_source_type() -> None:
    """Something that is neither text, path nor mapping is refused."""
    err = error_of(42)
    assert "expected a YAML file path, YAML text or a mapping" in str(err)


def test_load_config__top_level_list() -> None:
    """A YAML document that is not a mapping is refused."""
    err = error_of("- memory\n- redis\n")
    assert err.path == "event_broker"
    assert "expected a mapping" in str(err)


def test_load_config__event_broker_not_mapping() -> None:
    """event_broker: must hold a mapping."""
    err = error_of({"event_broker": "memory"})
    assert str(err) == "event_broker: expected a mapping of options, got 'memory'"


def test_defaults__match_api() -> None:
    """The defaults are those of API.md sections 3, 4 and 6."""
    c = EventBrokerConfig()
    assert (c.enabled, c.provider, c.mode, c.worker_count, c.buffer_size, c.instance_id) == (
        True, "memory", "async", 10, 1000, "")
    assert c.retry_policy == RetryPolicy()
    assert (c.memory.max_events, c.memory.cleanup_interval, c.memory.max_age) == (
        10000, 300.0, 86400.0)
    assert (c.database.url, c.database.table_name, c.database.channel) == (
        "", "events", "eventbroker_events")
    assert (c.redis.host, c.redis.port, c.redis.db, c.redis.password, c.redis.stream_name,
            c.redis.consumer_group) == (
        "127.0.0.1", 6379, 0, "", "eventbroker:events", "eventbroker-workers")
    assert (c.nats.url, c.nats.stream_name) == ("nats://127.0.0.1:4222", "EVENTBROKER_EVENTS")


def test_metrics_section__defaults_and_values() -> None:
    """metrics is off by default on loopback; its values load like the others."""
    assert (EventBrokerConfig().metrics.enabled, EventBrokerConfig().metrics.addr) == (
        False, "127.0.0.1")
    config = load_config({"metrics": {"enabled": True, "port": "9100", "addr": "0.0.0.0"}})
    assert (config.metrics.enabled, config.metrics.port, config.metrics.addr) == (
        True, 9100, "0.0.0.0")


def test_config__frozen() -> None:
    """Config objects cannot be changed after they are made."""
    config = EventBrokerConfig()
    with pytest.raises(AttributeError):
        config.worker_count = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.memory.max_events = 3  # type: ignore[misc]


# -- environment -----------------------------------------------------------------------------


def test_env__variable_expands() -> None:
    """${VAR} takes the variable's value."""
    assert load_config({"instance_id": "${NODE}"}, env={"NODE": "n1"}).instance_id == "n1"


def test_env__from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without env=, variables come from os.environ."""
    monkeypatch.setenv("EB_TEST_NODE", "from-env")
    assert load_config("instance_id: ${EB_TEST_NODE}").instance_id == "from-env"


def test_env__default_used_when_unset() -> None:
    """${VAR:-default} gives the default when VAR is unset."""
    assert load_config({"instance_id": "${NODE:-fallback}"}, env={}).instance_id == "fallback"


def test_env__default_used_when_empty() -> None:
    """${VAR:-default} gives the default when VAR is empty, as in the shell."""
    config = load_config({"instance_id": "${NODE:-fallback}"}, env={"NODE": ""})
    assert config.instance_id == "fallback"


def test_env__default_ignored_when_set() -> None:
    """${VAR:-default} gives VAR's value when it is set."""
    assert load_config({"instance_id": "${NODE:-x}"}, env={"NODE": "y"}).instance_id == "y"


def test_env__empty_default() -> None:
    """${VAR:-} gives an empty string."""
    assert load_config({"instance_id": "${NODE:-}"}, env={}).instance_id == ""


def test_env__set_but_empty_without_default() -> None:
    """${VAR} of a set but empty variable is the empty string, not an error."""
    assert load_config({"instance_id": "${NODE}"}, env={"NODE": ""}).instance_id == ""


def test_env__unset_without_default() -> None:
    """An unset variable without default is a ConfigError naming the variable and the key."""
    err = error_of({"redis": {"host": "${REDIS_HOST}"}}, env={})
    assert err.path == "event_broker.redis.host"
    assert "REDIS_HOST" in str(err) and "not set" in str(err)


def test_env__unset_under_event_broker_yaml() -> None:
    """The path names the key inside an event_broker section too."""
    err = error_of("event_broker:\n  instance_id: ${HOSTNAME}\n", env={})
    assert err.path == "event_broker.instance_id"
    assert "HOSTNAME" in str(err)


def test_env__several_in_one_value() -> None:
    """Several references and plain text mix in one value."""
    config = load_config(
        {"database": {"url": "postgresql+psycopg://${U}:${P:-pw}@${H}/app"}},
        env={"U": "me", "H": "db.local"},
    )
    assert config.database.url == "postgresql+psycopg://me:pw@db.local/app"


def test_env__number_from_variable() -> None:
    """A number field accepts the string a variable expands to."""
    config = load_config("worker_count: ${WORKERS:-4}\nenabled: ${ON:-false}\n", env={})
    assert config.worker_count == 4 and config.enabled is False


def test_env__duration_from_variable() -> None:
    """A duration field accepts an expanded '2m'."""
    config = load_config({"memory": {"max_age": "${AGE}"}}, env={"AGE": "2m"})
    assert config.memory.max_age == 120.0


def test_env__escaped_dollar_brace() -> None:
    """$${ is a literal ${."""
    assert load_config({"instance_id": "a$${B}"}, env={}).instance_id == "a${B}"


def test_env__lone_dollar_kept() -> None:
    """A $ not followed by { stays as it is."""
    assert load_config({"redis": {"password": "pa$s"}}, env={}).redis.password == "pa$s"


def test_env__malformed_reference() -> None:
    """An unterminated or invalid ${ is a ConfigError naming the key."""
    err = error_of({"instance_id": "${NODE"}, env={})
    assert err.path == "event_broker.instance_id"
    assert "malformed variable reference" in str(err)
    assert error_of({"instance_id": "${1X}"}, env={}).path == "event_broker.instance_id"


def test_env__value_not_reexpanded() -> None:
    """A variable's value is not itself expanded (no surprise recursion)."""
    assert load_config({"instance_id": "${A}"}, env={"A": "${B}"}).instance_id == "${B}"


# -- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1s", 1.0),
        ("2m", 120.0),
        ("24h", 86400.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        (" 10 s ", 10.0),
        ("7", 7.0),
        ("0", 0.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration__valid(text: object, seconds: float) -> None:
    """Numbers are seconds; strings carry ms, s, m, h or d."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["soon", "1x", "-1s", "1 2s", "", "s", True, None, [1], -1,
                                 float("inf"), float("nan")])
def test_parse_duration__invalid(bad: object) -> None:
    """Anything else is a ConfigError saying a duration was expected."""
    with pytest.raises(ConfigError, match="expected a duration") as info:
        parse_duration(bad, "event_broker.memory.max_age")
    assert info.value.path == "event_broker.memory.max_age"


def test_parse_duration__positive_rejects_zero() -> None:
    """With positive=True, zero is refused."""
    with pytest.raises(ConfigError, match="> 0"):
        parse_duration("0s", "x", positive=True)


def test_durations__in_every_duration_field() -> None:
    """retry_policy delays and memory intervals all take duration strings."""
    config = load_config({
        "retry_policy": {"initial_delay": "500ms", "max_delay": "1m"},
        "memory": {"cleanup_interval": "30s", "max_age": "1h"},
    })
    assert config.retry_policy.initial_delay == 0.5
    assert config.retry_policy.max_delay == 60.0
    assert config.memory.cleanup_interval == 30.0
    assert config.memory.max_age == 3600.0


# -- bad values, each named by its path --------------------------------------------------------

BAD_VALUES = [
    ({"worker_count": "ten"}, "event_broker.worker_count",
     "event_broker.worker_count: expected int >= 1, got 'ten'"),
    ({"worker_count": -1}, "event_broker.worker_count",
     "event_broker.worker_count: expected int >= 1, got -1"),
    ({"worker_count": 0}, "event_broker.worker_count", "expected int >= 1, got 0"),
    ({"worker_count": 2.5}, "event_broker.worker_count", "expected int >= 1, got 2.5"),
    ({"worker_count": True}, "event_broker.worker_count", "expected int >= 1, got True"),
    ({"buffer_size": 0}, "event_broker.buffer_size", "expected int >= 1, got 0"),
    ({"buffer_size": None}, "event_broker.buffer_size", "expected int >= 1, got None"),
    ({"mode": "fast"}, "event_broker.mode",
     "event_broker.mode: expected one of sync, async, got 'fast'"),
    ({"provider": "kafka"}, "event_broker.provider",
     "event_broker.provider: expected one of memory, database, redis, nats, got 'kafka'"),
    ({"enabled": "maybe"}, "event_broker.enabled",
     "event_broker.enabled: expected a boolean (true or false), got 'maybe'"),
    ({"instance_id": ["a"]}, "event_broker.instance_id", "expected a string, got ['a']"),
    ({"retry_policy": 3}, "event_broker.retry_policy", "expected a mapping, got 3"),
    ({"retry_policy": {"max_retries": -1}}, "event_broker.retry_policy.max_retries",
     "expected int >= 0, got -1"),
    ({"retry_policy": {"initial_delay": "soon"}}, "event_broker.retry_policy.initial_delay",
     "expected a duration"),
    ({"retry_policy": {"max_delay": "-5s"}}, "event_broker.retry_policy.max_delay",
     "expected a duration"),
    ({"retry_policy": {"backoff_factor": 0.5}}, "event_broker.retry_policy.backoff_factor",
     "expected a number >= 1, got 0.5"),
    ({"retry_policy": {"backoff_factor": "fast"}}, "event_broker.retry_policy.backoff_factor",
     "expected a number >= 1, got 'fast'"),
    ({"retry_policy": {"jitter": "sometimes"}}, "event_broker.retry_policy.jitter",
     "expected a boolean"),
    ({"memory": "big"}, "event_broker.memory", "expected a mapping, got 'big'"),
    ({"memory": {"max_events": 0}}, "event_broker.memory.max_events", "expected int >= 1, got 0"),
    ({"memory": {"cleanup_interval": 0}}, "event_broker.memory.cleanup_interval",
     "expected a duration"),
    ({"memory": {"max_age": "soon"}}, "event_broker.memory.max_age",
     ("event_broker.memory.max_age: expected a duration (seconds, or a number with ms, s, m, h "
     "or d such as '500ms' or '2m'), got 'soon'")),
    ({"database": {"table_name": "drop table;"}}, "event_broker.database.table_name",
     "expected a table name"),
    ({"database": {"channel": ""}}, "event_broker.database.channel",
     "expected a non-empty string, got ''"),
    ({"provider": "database"}, "event_broker.database.url",
     "expected a database URL when provider is 'database'"),
    ({"redis": {"port": 70000}}, "event_broker.redis.port", "expected int from 1 to 65535"),
    ({"redis": {"port": "http"}}, "event_broker.redis.port", "got 'http'"),
    ({"redis": {"db": -1}}, "event_broker.redis.db", "expected int >= 0, got -1"),
    ({"redis": {"host": ""}}, "event_broker.redis.host", "expected a non-empty string"),
    ({"redis": {"stream_name": None}}, "event_broker.redis.stream_name",
     "expected a non-empty string"),
    ({"redis": {"consumer_group": {"a": 1}}}, "event_broker.redis.consumer_group",
     "expected a string"),
    ({"nats": {"url": ""}}, "event_broker.nats.url", "expected a non-empty string"),
    ({"metrics": {"port": -1}}, "event_broker.metrics.port", "expected int from 0 to 65535"),
    ({"metrics": {"enabled": "sure"}}, "event_broker.metrics.enabled", "expected a boolean"),
    ({"nats": {"stream_name": 5.5, "url": []}}, "event_broker.nats.url", "expected a string"),
]


@pytest.mark.parametrize(("source", "path", "message"), BAD_VALUES,
                         ids=[p for _, p, _ in BAD_VALUES])
def test_bad_value__named_by_path(source: dict[str, Any], path: str, message: str) -> None:
    """Every wrong value is a ConfigError whose path and message name the key and expectation."""
    err = error_of(source)
    assert err.path == path
    assert str(err).startswith(f"{path}: ")
    assert message in str(err)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(("source", "path", "message"), BAD_VALUES[:4],
                         ids=[p for _, p, _ in BAD_VALUES[:4]])
def test_bad_value__named_by_path_under_event_broker(
    source: dict[str, Any], path: str, message: str
) -> None:
    """The same paths come out when the options sit under event_broker:."""
    err = error_of({"event_broker": source})
    assert err.path == path and message in str(err)


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ({"workers": 3}, "event_broker.workers"),
        ({"event_broker": {"modee": "sync"}}, "event_broker.modee"),
        ({"retry_policy": {"retries": 3}}, "event_broker.retry_policy.retries"),
        ({"memory": {"max_event": 3}}, "event_broker.memory.max_event"),
        ({"database": {"uri": "x"}}, "event_broker.database.uri"),
        ({"redis": {"prot": 1}}, "event_broker.redis.prot"),
        ({"nats": {"servers": []}}, "event_broker.nats.servers"),
        ({"metric": {}}, "event_broker.metric"),
    ],
)
def test_unknown_key__named_by_path(source: dict[str, Any], path: str) -> None:
    """An unknown key is a ConfigError naming it and listing the known ones."""
    err = error_of(source)
    assert err.path == path
    assert str(err).startswith(f"{path}: unknown key; expected one of ")


def test_unknown_key__lists_known_keys() -> None:
    """The unknown-key message lists what is allowed at that level."""
    err = error_of({"redis": {"prot": 1}})
    assert "host, port, db, password, stream_name, consumer_group" in str(err)


def test_bad_value__yaml_source_names_path() -> None:
    """Values from YAML text are checked the same way."""
    err = error_of("event_broker:\n  worker_count: ten\n")
    assert str(err) == "event_broker.worker_count: expected int >= 1, got 'ten'"


def test_lenient_scalars__strings_for_numbers_and_booleans() -> None:
    """'10', 'yes' and 'off' are accepted where an int or bool is expected."""
    config = load_config({"worker_count": "10", "enabled": "off", "redis": {"port": "6380"}})
    assert config.worker_count == 10 and config.enabled is False and config.redis.port == 6380
    assert load_config({"enabled": "yes"}).enabled is True


def test_lenient_scalars__choices_case_insensitive() -> None:
    """Provider and mode names are normalised to lower case."""
    config = load_config({"provider": "Memory", "mode": "SYNC"})
    assert config.provider == "memory" and config.mode == "sync"


def test_lenient_scalars__numeric_instance_id() -> None:
    """A numeric instance_id (YAML turns 42 into an int) becomes the string '42'."""
    assert load_config("instance_id: 42\n").instance_id == "42"


# -- building in Python ------------------------------------------------------------------------


def test_config_in_python__checked_like_loaded() -> None:
    """EventBrokerConfig(...) checks its values exactly as load_config does."""
    with pytest.raises(ConfigError) as info:
        EventBrokerConfig(worker_count="ten")  # type: ignore[arg-type]
    assert str(info.value) == "event_broker.worker_count: expected int >= 1, got 'ten'"
    with pytest.raises(ConfigError) as info:
        MemoryConfig(max_age="soon")  # type: ignore[arg-type]
    assert info.value.path == "event_broker.memory.max_age"


def test_config_in_python__sections_as_mappings() -> None:
    """Sections and the retry policy may be given as mappings."""
    config = EventBrokerConfig(
        memory={"max_age": "1h"},  # type: ignore[arg-type]
        retry_policy={"max_retries": 1},  # type: ignore[arg-type]
    )
    assert config.memory.max_age == 3600.0
    assert config.retry_policy == RetryPolicy(max_retries=1)


def test_config_in_python__retry_policy_object_kept() -> None:
    """A RetryPolicy object is kept as it is."""
    policy = RetryPolicy(max_retries=0, jitter=True)
    assert EventBrokerConfig(retry_policy=policy).retry_policy is policy


def test_to_dict__round_trips_through_load_config() -> None:
    """to_dict() fed back to load_config gives an equal config."""
    config = load_config(FULL_YAML, env={"HOSTNAME": "h"})
    assert load_config(config.to_dict()) == config


def test_to_dict__redact_hides_passwords() -> None:
    """With redact=True, the Redis password and the database URL's password are masked."""
    config = EventBrokerConfig(
        database=DatabaseConfig(url="postgresql+psycopg://me:s3cret@db/app"),
        redis=RedisConfig(password="hunter2"),
    )
    data = config.to_dict(redact=True)
    assert data["database"] == {
        "url": "postgresql+psycopg://me:***@db/app", "table_name": "events",
        "channel": "eventbroker_events", "backstop_interval": 1.0,
    }
    assert data["redis"]["password"] == "***"  # type: ignore[index,call-overload]
    assert "s3cret" not in repr(data) and "hunter2" not in repr(data)
    assert config.to_dict()["redis"]["password"] == "hunter2"  # type: ignore[index,call-overload]


def test_repr__hides_redis_password() -> None:
    """The Redis password never appears in a repr."""
    assert "hunter2" not in repr(EventBrokerConfig(redis=RedisConfig(password="hunter2")))


@pytest.mark.parametrize(
    ("redis", "url"),
    [
        (RedisConfig(), "redis://127.0.0.1:6379/0"),
        (RedisConfig(host="cache", port=6380, db=2), "redis://cache:6380/2"),
        (RedisConfig(password="p@ss:w/rd"), "redis://:p%40ss%3Aw%2Frd@127.0.0.1:6379/0"),
        (RedisConfig(host="::1"), "redis://[::1]:6379/0"),
    ],
)
def test_redis_url__from_host_port_db_password(redis: RedisConfig, url: str) -> None:
    """The Redis URL is built from the section, the password percent-encoded."""
    assert redis.url == url


# -- build_provider ----------------------------------------------------------------------------


class _Recorder:
    """Stands in for a provider class: records how it was constructed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, cls_name: str, cls: Any) -> None:
    module = types.ModuleType(f"sqlalchemy_eventbroker.providers.{name}")
    setattr(module, cls_name, cls)
    monkeypatch.setitem(sys.modules, module.__name__, module)


def test_build_provider__memory() -> None:
    """provider: memory builds a MemoryProvider from the memory section."""
    from sqlalchemy_eventbroker.providers.memory import MemoryProvider

    provider = build_provider(load_config({"memory": {"max_events": 7, "max_age": "1h"}}))
    try:
        assert isinstance(provider, MemoryProvider)
        assert provider.stats().provider_type == "memory"
    finally:
        provider.close()


@pytest.mark.parametrize(
    ("source", "module", "cls_name", "args", "kwargs"),
    [
        ({"provider": "database", "database": {"url": "sqlite://", "table_name": "ev",
                                              "channel": "ch"}},
         "database", "DatabaseProvider", ("sqlite://",), {"table_name": "ev", "channel": "ch",
                                                            "backstop_interval": 1.0}),
        ({"provider": "redis", "redis": {"host": "r", "port": 1, "db": 3, "password": "pw",
                                         "stream_name": "s", "consumer_group": "g"}},
         "redis", "RedisProvider", ("redis://:pw@r:1/3",),
         {"stream_name": "s", "consumer_group": "g"}),
        ({"provider": "nats", "nats": {"url": "nats://n:1", "stream_name": "S"}},
         "nats", "NatsProvider", ("nats://n:1",), {"stream_name": "S"}),
    ],
)
def test_build_provider__passes_section(
    monkeypatch: pytest.MonkeyPatch, source: dict[str, Any], module: str, cls_name: str,
    args: tuple[Any, ...], kwargs: dict[str, Any],
) -> None:
    """Each provider is constructed from its own section's values."""
    _fake_module(monkeypatch, module, cls_name, _Recorder)
    provider: Any = build_provider(load_config(source))
    assert isinstance(provider, _Recorder)
    assert provider.args == args and provider.kwargs == kwargs


@pytest.mark.parametrize(
    ("provider", "module", "cls_name", "driver", "extra"),
    [
        ("database", "database", "DatabaseProvider", "psycopg", "postgres"),
        ("redis", "redis", "RedisProvider", "redis", "redis"),
        ("nats", "nats", "NatsProvider", "nats", "nats"),
    ],
)
def test_build_provider__missing_driver_names_extra(
    monkeypatch: pytest.MonkeyPatch, provider: str, module: str, cls_name: str, driver: str,
    extra: str,
) -> None:
    """A missing driver is a ConfigError naming the pip install command of its extra."""

    def missing(*args: Any, **kwargs: Any) -> None:
        raise ModuleNotFoundError(f"No module named {driver!r}", name=driver)

    _fake_module(monkeypatch, module, cls_name, missing)
    config = load_config({"provider": provider, "database": {"url": "postgresql+psycopg://x/y"}})
    with pytest.raises(ConfigError) as info:
        build_provider(config)
    assert info.value.path == "event_broker.provider"
    assert f"pip install 'sqlalchemy-eventbroker[{extra}]'" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_build_provider__missing_driver_at_module_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider module whose own import fails for want of its driver gives the same error."""
    monkeypatch.setitem(sys.modules, "redis", None)  # makes `import redis` fail
    monkeypatch.delitem(sys.modules, "sqlalchemy_eventbroker.providers.redis", raising=False)
    fake = types.ModuleType("sqlalchemy_eventbroker.providers.redis")

    def getattr_(name: str) -> Any:
        import redis  # noqa: F401 - fails: None in sys.modules

        raise AssertionError("unreachable")

    fake.__getattr__ = getattr_  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    with pytest.raises(ConfigError, match=r"pip install 'sqlalchemy-eventbroker\[redis\]'"):
        build_provider(load_config({"provider": "redis"}))


def test_build_provider__other_import_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ImportError that is not a missing driver is not disguised as a config problem."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ModuleNotFoundError("No module named 'something_else'", name="something_else")

    _fake_module(monkeypatch, "nats", "NatsProvider", broken)
    with pytest.raises(ModuleNotFoundError):
        build_provider(load_config({"provider": "nats"}))


@pytest.mark.parametrize(
    ("provider", "module", "driver", "extra"),
    [
        ("redis", "sqlalchemy_eventbroker.providers.redis", "redis", "redis"),
        ("nats", "sqlalchemy_eventbroker.providers.nats", "nats", "nats"),
        ("database", "sqlalchemy_eventbroker.providers.database", "psycopg", "postgres"),
    ],
)
def test_build_provider__real_module_without_driver(
    monkeypatch: pytest.MonkeyPatch, provider: str, module: str, driver: str, extra: str
) -> None:
    """With the driver made unimportable, the real provider module gives the extra's command."""
    monkeypatch.setitem(sys.modules, driver, None)  # `import <driver>` now fails
    if driver != "psycopg":  # these import their driver at module import
        # The provider is a package: forget its submodules too, or they are reused as cached.
        for name in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
            monkeypatch.delitem(sys.modules, name, raising=False)
    config = load_config({"provider": provider,
                          "database": {"url": "postgresql+psycopg://127.0.0.1:1/none"}})
    with pytest.raises(ConfigError) as info:
        build_provider(config)
    assert f"pip install 'sqlalchemy-eventbroker[{extra}]'" in str(info.value)


def test_database_backstop_interval__a_duration_passed_to_the_provider() -> None:
    """``database.backstop_interval`` takes a duration (default 1 s) and must be positive."""
    from sqlalchemy_eventbroker.config import ConfigError, load_config

    assert load_config({"database": {"url": "sqlite://"}}).database.backstop_interval == 1.0
    cfg = load_config({"database": {"url": "sqlite://", "backstop_interval": "250ms"}})
    assert cfg.database.backstop_interval == 0.25
    with pytest.raises(ConfigError, match="event_broker.database.backstop_interval"):
        load_config({"database": {"url": "sqlite://", "backstop_interval": 0}})


def _alias_bomb() -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(8):
        prev, name = chr(97 + i), chr(98 + i)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("worker_count: *i")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb__config_error_at_once() -> None:
    """A few hundred bytes of nested YAML aliases (a billion references once expanded) is a
    ConfigError in well under a second, not minutes of expansion (issue 11, row 10)."""
    import time

    bomb = _alias_bomb()
    assert len(bomb) < 400
    started = time.monotonic()
    with pytest.raises(ConfigError, match="more than 10000 values") as info:
        load_config(bomb)
    assert info.value.path == "event_broker"
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("source", ["yaml", "dict"])
def test_deep_nesting__config_error_not_recursion_error(source: str) -> None:
    """20,000 levels of nesting, as YAML text or as a dict, is a ConfigError."""
    if source == "yaml":
        doc: Any = "memory: " + "[" * 20_000 + "]" * 20_000
    else:
        doc = []
        for _ in range(20_000):
            doc = [doc]
        doc = {"memory": doc}
    with pytest.raises(ConfigError, match="nested deeper than 32"):
        load_config(doc)


def test_nested_default__refused() -> None:
    """``${A:-${B}}`` is refused naming the key, instead of silently yielding ``${B}``."""
    with pytest.raises(ConfigError, match="may not hold another variable") as info:
        load_config({"instance_id": "${A:-${B}}"}, env={"B": "b"})
    assert info.value.path == "event_broker.instance_id"


@pytest.mark.parametrize(
    ("key", "value", "path"),
    [
        ("worker_count", 99999999999999999999, "event_broker.worker_count"),
        ("worker_count", "1025", "event_broker.worker_count"),
        ("buffer_size", 10_000_001, "event_broker.buffer_size"),
        ("memory", {"max_events": 10_000_001}, "event_broker.memory.max_events"),
    ],
)
def test_upper_bounds__config_error(key: str, value: object, path: str) -> None:
    """worker_count is at most 1024, buffer_size and memory.max_events at most 10,000,000."""
    with pytest.raises(ConfigError, match="expected int <=") as info:
        load_config({key: value})
    assert info.value.path == path
    assert load_config({"worker_count": 1024, "buffer_size": 10_000_000}).worker_count == 1024


def test_bad_value__message_is_bounded() -> None:
    """A huge wrong value is shown shortened, never whole."""
    with pytest.raises(ConfigError) as info:
        load_config({"worker_count": "x" * 100_000})
    assert len(str(info.value)) < 300


def test_instance_id__at_most_255_characters() -> None:
    """instance_id goes on every event, so it is bounded like Event.instance_id (255)."""
    assert len(load_config({"instance_id": "i" * 255}).instance_id) == 255
    with pytest.raises(ConfigError, match="at most 255") as info:
        load_config({"instance_id": "i" * 256})
    assert info.value.path == "event_broker.instance_id"
