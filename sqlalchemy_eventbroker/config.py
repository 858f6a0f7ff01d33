"""Configuration: ``EventBrokerConfig`` (a frozen dataclass per section) and ``load_config``.

A configuration comes from a YAML file, a YAML string or a dict, with the options either at
the top level or under an ``event_broker:`` key::

    event_broker:
      enabled: true
      provider: memory          # memory | database | redis | nats
      mode: async               # sync | async
      worker_count: 10
      buffer_size: 1000
      instance_id: "${HOSTNAME:-api-1}"
      retry_policy: {max_retries: 3, initial_delay: 1s, max_delay: 30s, backoff_factor: 2.0}
      memory: {max_events: 10000, cleanup_interval: 5m, max_age: 24h}
      database: {url: "postgresql+psycopg://127.0.0.1/app", table_name: events,
                 channel: eventbroker_events}
      redis: {host: 127.0.0.1, port: 6379, db: 0, password: "",
              stream_name: "eventbroker:events", consumer_group: eventbroker-workers}
      nats: {url: "nats://127.0.0.1:4222", stream_name: EVENTBROKER_EVENTS}
      metrics: {enabled: false, port: 9464, addr: 127.0.0.1}   # not in API.md: our extension

Rules, all enforced with :class:`~sqlalchemy_eventbroker.errors.ConfigError` whose ``.path``
is the dotted key path (always starting ``event_broker.``) and whose message says what was
expected and what was found:

* Every key is known; an unknown key is an error (a typo never silently becomes a default).
* When a document has an ``event_broker`` key, only that key is read, so the section can live
  in an application's own config file beside unrelated keys.
* ``${VAR}`` and ``${VAR:-default}`` in string values expand from the environment (``:-`` uses
  the default when the variable is unset *or* empty, as in the shell); ``$${`` is a literal
  ``${``. An unset variable without a default is an error naming it, and so is a default
  that holds another reference (``${A:-${B}}`` is not supported).
* Bounds: ``worker_count`` is at most 1024, ``buffer_size`` and ``memory.max_events`` at most
  10,000,000. A document holds at most 10,000 values (a YAML alias counts once per use, so an
  alias bomb is refused) nested at most 32 deep.
* Numbers and booleans may be given as strings (``"10"``, ``"true"``), so that values can come
  from environment variables.
* Durations are numbers of seconds or strings with a unit: ``"500ms"``, ``"1s"``, ``"2m"``,
  ``"24h"``, ``"1d"``; they end up as float seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from ._config_values import (
    as_bool,
    as_choice,
    as_float,
    as_int,
    as_str,
    fail,
    parse_duration,
    set_field,
)
from ._types import JSON
from .broker import MAX_BUFFER_SIZE, MAX_WORKER_COUNT
from .errors import ConfigError
from .event import FIELD_LIMITS
from .providers._urls import redact_url
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .providers.base import Provider

__all__ = [
    "DatabaseConfig",
    "EventBrokerConfig",
    "MemoryConfig",
    "MetricsConfig",
    "NatsConfig",
    "RedisConfig",
    "build_provider",
    "load_config",
    "parse_duration",
]

ROOT = "event_broker"

# Upper bounds of ``worker_count`` (threads) and of ``buffer_size`` / ``memory.max_events``
# are the broker's own MAX_WORKER_COUNT / MAX_BUFFER_SIZE (``Broker`` checks them too).

ProviderName = Literal["memory", "database", "redis", "nats"]
ModeName = Literal["sync", "async"]
PROVIDERS: tuple[str, ...] = ("memory", "database", "redis", "nats")
MODES: tuple[str, ...] = ("sync", "async")


# -- sections ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryConfig:
    """``event_broker.memory``: options of ``MemoryProvider``."""

    #: Events kept before the least recently used are evicted.
    max_events: int = 10000
    #: Seconds between sweeps of old completed events.
    cleanup_interval: float = 300.0
    #: Seconds a completed event is kept, counted from ``completed_at``.
    max_age: float = 86400.0

    def __post_init__(self) -> None:
        p = f"{ROOT}.memory"
        set_field(self, "max_events", _at_most(
            as_int(self.max_events, f"{p}.max_events", minimum=1), f"{p}.max_events",
            maximum=MAX_BUFFER_SIZE))
        set_field(self, "cleanup_interval",
                  parse_duration(self.cleanup_interval, f"{p}.cleanup_interval", positive=True))
        set_field(self, "max_age", parse_duration(self.max_age, f"{p}.max_age"))


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseConfig:
    """``event_broker.database``: options of ``DatabaseProvider``."""

    #: SQLAlchemy URL of the database that holds the events table; required for this provider.
    url: str = ""
    #: Name of the events table.
    table_name: str = "events"
    #: PostgreSQL LISTEN/NOTIFY channel.
    channel: str = "eventbroker_events"
    #: Seconds between re-reads when no wake-up arrives: a lost wake-up delays delivery by
    #: at most this long and never loses it (one cheap indexed read per interval).
    backstop_interval: float = 1.0

    def __post_init__(self) -> None:
        p = f"{ROOT}.database"
        set_field(self, "url", as_str(self.url, f"{p}.url", required=False))
        set_field(self, "table_name", as_str(self.table_name, f"{p}.table_name"))
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.table_name):
            raise fail(f"{p}.table_name", "a table name (letters, digits, _)", self.table_name)
        set_field(self, "channel", as_str(self.channel, f"{p}.channel"))
        set_field(self, "backstop_interval",
                  parse_duration(self.backstop_interval, f"{p}.backstop_interval", positive=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisConfig:
    """``event_broker.redis``: where Redis is and which stream and group to use."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str = field(default="", repr=False)
    stream_name: str = "eventbroker:events"
    consumer_group: str = "eventbroker-workers"

    def __post_init__(self) -> None:
        p = f"{ROOT}.redis"
        set_field(self, "host", as_str(self.host, f"{p}.host"))
        set_field(self, "port", as_int(self.port, f"{p}.port", minimum=1, maximum=65535))
        set_field(self, "db", as_int(self.db, f"{p}.db", minimum=0))
        set_field(self, "password", as_str(self.password, f"{p}.password", required=False))
        set_field(self, "stream_name", as_str(self.stream_name, f"{p}.stream_name"))
        set_field(self, "consumer_group", as_str(self.consumer_group, f"{p}.consumer_group"))

    @property
    def url(self) -> str:
        """``redis://[:password@]host:port/db``, the password percent-encoded."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{host}:{self.port}/{self.db}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsConfig:
    """``event_broker.nats``: the NATS server and JetStream stream."""

    url: str = "nats://127.0.0.1:4222"
    stream_name: str = "EVENTBROKER_EVENTS"

    def __post_init__(self) -> None:
        p = f"{ROOT}.nats"
        set_field(self, "url", as_str(self.url, f"{p}.url"))
        set_field(self, "stream_name", as_str(self.stream_name, f"{p}.stream_name"))


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """``event_broker.metrics``: serve Prometheus metrics over HTTP from ``initialize()``.

    Off by default. The server binds to loopback unless ``addr`` says otherwise, because
    metric labels name event types.
    """

    enabled: bool = False
    port: int = 9464
    addr: str = "127.0.0.1"

    def __post_init__(self) -> None:
        p = f"{ROOT}.metrics"
        set_field(self, "enabled", as_bool(self.enabled, f"{p}.enabled"))
        set_field(self, "port", as_int(self.port, f"{p}.port", minimum=0, maximum=65535))
        set_field(self, "addr", as_str(self.addr, f"{p}.addr"))


def _at_most(value: int, path: str, *, maximum: int) -> int:
    if value > maximum:
        raise ConfigError(f"{path}: expected int <= {maximum}, got {value}", path=path)
    return value


def _check_retry_policy(value: object, path: str) -> RetryPolicy:
    if isinstance(value, RetryPolicy):
        return value
    if not isinstance(value, Mapping):
        raise fail(path, "a mapping", value)
    _reject_unknown(value, ("max_retries", "initial_delay", "max_delay", "backoff_factor",
                            "jitter"), path)
    d = RetryPolicy()
    return RetryPolicy(
        max_retries=as_int(value.get("max_retries", d.max_retries), f"{path}.max_retries",
                            minimum=0),
        initial_delay=parse_duration(value.get("initial_delay", d.initial_delay),
                                     f"{path}.initial_delay"),
        max_delay=parse_duration(value.get("max_delay", d.max_delay), f"{path}.max_delay"),
        backoff_factor=as_float(value.get("backoff_factor", d.backoff_factor),
                                 f"{path}.backoff_factor", minimum=1.0),
        jitter=as_bool(value.get("jitter", d.jitter), f"{path}.jitter"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class EventBrokerConfig:
    """The whole configuration: broker options plus one section per provider.

    Only the section of the chosen ``provider`` is used; the others keep their defaults.
    Built by :func:`load_config`, or directly in Python (values are checked the same way;
    a section may also be given as a mapping).

    Raises:
        ConfigError: a value is wrong; ``.path`` names it.
    """

    #: ``False`` turns the library off: ``initialize`` starts nothing (see ``default``).
    enabled: bool = True
    #: Which provider stores and carries events.
    provider: ProviderName = "memory"
    #: ``async``: a queue and worker threads; ``sync``: handlers run in the publishing thread.
    mode: ModeName = "async"
    #: Worker threads in async mode.
    worker_count: int = 10
    #: Capacity of the async queue; a full queue makes publish raise ``QueueFull``.
    buffer_size: int = 1000
    #: This broker's name on the bus; empty means the host name.
    instance_id: str = ""
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        p = ROOT
        set_field(self, "enabled", as_bool(self.enabled, f"{p}.enabled"))
        set_field(self, "provider", as_choice(self.provider, f"{p}.provider", PROVIDERS))
        set_field(self, "mode", as_choice(self.mode, f"{p}.mode", MODES))
        set_field(self, "worker_count", _at_most(
            as_int(self.worker_count, f"{p}.worker_count", minimum=1), f"{p}.worker_count",
            maximum=MAX_WORKER_COUNT))
        set_field(self, "buffer_size", _at_most(
            as_int(self.buffer_size, f"{p}.buffer_size", minimum=1), f"{p}.buffer_size",
            maximum=MAX_BUFFER_SIZE))
        set_field(self, "instance_id", as_str(self.instance_id, f"{p}.instance_id", required=False))
        if len(self.instance_id) > FIELD_LIMITS["instance_id"]:
            # Every event carries it: longer, and every publish would fail validate().
            raise ConfigError(
                f"{p}.instance_id: expected at most {FIELD_LIMITS['instance_id']} characters, "
                f"got {len(self.instance_id)}", path=f"{p}.instance_id")
        set_field(self, "retry_policy", _check_retry_policy(self.retry_policy, f"{p}.retry_policy"))
        for name, cls in _SECTIONS.items():
            set_field(self, name, _section(getattr(self, name), cls, f"{p}.{name}"))
        if self.provider == "database" and not self.database.url.strip():
            raise ConfigError(
                f"{p}.database.url: expected a database URL when provider is 'database', got ''",
                path=f"{p}.database.url",
            )

    def to_dict(self, *, redact: bool = False) -> dict[str, JSON]:
        """The configuration as plain data (durations in seconds), as ``load_config`` takes it.

        With ``redact``, secrets are replaced by ``***``, for printing: the Redis password and
        every secret of the database and NATS URLs (``user:password@``, ``token@``,
        ``?password=``), as ``providers._urls.redact_url`` masks them everywhere.
        """
        out: dict[str, JSON] = {
            name: getattr(self, name)
            for name in ("enabled", "provider", "mode", "worker_count", "buffer_size",
                         "instance_id")
        }
        for name in ("retry_policy", *_SECTIONS):
            section = getattr(self, name)
            out[name] = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        if redact:
            redis = out["redis"]
            database = out["database"]
            assert isinstance(redis, dict) and isinstance(database, dict)
            if redis["password"]:
                redis["password"] = "***"
            database["url"] = redact_url(self.database.url)
            nats = out["nats"]
            assert isinstance(nats, dict)
            nats["url"] = redact_url(self.nats.url)
        return out


_SECTIONS: dict[str, type[Any]] = {
    "memory": MemoryConfig,
    "database": DatabaseConfig,
    "redis": RedisConfig,
    "nats": NatsConfig,
    "metrics": MetricsConfig,
}


def _section(value: object, cls: type[Any], path: str) -> Any:
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise fail(path, "a mapping", value)
    names = tuple(f.name for f in dataclasses.fields(cls))
    _reject_unknown(value, names, path)
    return cls(**{str(k): v for k, v in value.items()})


def _reject_unknown(mapping: Mapping[Any, Any], known: tuple[str, ...], path: str) -> None:
    for key in mapping:
        if key not in known:
            key_path = f"{path}.{key}"
            raise ConfigError(
                f"{key_path}: unknown key; expected one of {', '.join(known)}", path=key_path
            )


# -- loading -------------------------------------------------------------------------------

#: Upper bounds of a configuration document: it is small, hand-written data. Larger or deeper
#: input (a YAML alias bomb expands exponentially; deep nesting exhausts the recursion limit)
#: is refused with ``ConfigError`` before anything walks it recursively.
MAX_CONFIG_NODES = 10_000
MAX_CONFIG_DEPTH = 32


def _check_shape(data: object) -> None:
    # Iterative and counting every visit, so shared (aliased) nodes count once per reference,
    # as the expansion below would copy them.
    budget = MAX_CONFIG_NODES
    todo: list[tuple[object, int]] = [(data, 0)]
    while todo:
        value, depth = todo.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(
                f"{ROOT}: the configuration holds more than {MAX_CONFIG_NODES} values "
                f"(YAML aliases count once per use)", path=ROOT)
        if isinstance(value, Mapping | list):
            if depth >= MAX_CONFIG_DEPTH:
                raise ConfigError(
                    f"{ROOT}: the configuration is nested deeper than {MAX_CONFIG_DEPTH} levels",
                    path=ROOT)
            items = value.values() if isinstance(value, Mapping) else value
            todo.extend((v, depth + 1) for v in items)


_TOP_LEVEL = ("enabled", "provider", "mode", "worker_count", "buffer_size", "instance_id",
              "retry_policy", *_SECTIONS)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(text: str, path: str, env: Mapping[str, str]) -> str:
    out: list[str] = []
    i = 0
    while True:
        j = text.find("$", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        if text.startswith("$${", j):
            out.append("${")
            i = j + 3
            continue
        if not text.startswith("${", j):
            out.append("$")
            i = j + 1
            continue
        m = _VAR.match(text, j)
        if m is None:
            raise ConfigError(
                f"{path}: malformed variable reference in {text!r}; expected ${{NAME}} or "
                f"${{NAME:-default}}",
                path=path,
            )
        name, default = m.group(1), m.group(2)
        if default is not None and "${" in default:
            # ``[^}]*`` stops at the inner ``}``: ${A:-${B}} would silently become "${B}".
            raise ConfigError(
                f"{path}: a default may not hold another variable reference "
                f"(${{{name}:-${{...}}}} is not supported); write the default literally",
                path=path,
            )
        value = env.get(name)
        if default is not None:
            out.append(value if value else default)
        elif value is None:
            raise ConfigError(
                f"{path}: environment variable {name} is not set "
                f"(write ${{{name}:-default}} to give a default)",
                path=path,
            )
        else:
            out.append(value)
        i = m.end()


def _expand_all(value: object, path: str, env: Mapping[str, str]) -> object:
    if isinstance(value, str):
        return _expand(value, path, env)
    if isinstance(value, Mapping):
        return {k: _expand_all(v, f"{path}.{k}", env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_all(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


def _looks_like_path(text: str) -> bool:
    if "\n" in text or not text.strip():
        return False
    return text.endswith((".yaml", ".yml")) or os.path.isfile(text)


def _read_yaml(text: str, origin: str) -> object:
    import yaml  # type: ignore[import-untyped,unused-ignore]

    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(
            f"{ROOT}: {origin} is nested deeper than {MAX_CONFIG_DEPTH} levels", path=ROOT
        ) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{ROOT}: {origin} is not valid YAML: {detail}", path=ROOT) from exc


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | EventBrokerConfig,
    *,
    env: Mapping[str, str] | None = None,
) -> EventBrokerConfig:
    """Read and check a configuration.

    Args:
        source: a path (``str`` or ``os.PathLike``) to a YAML file, YAML text, a mapping, or an
            ``EventBrokerConfig`` (returned as it is). A ``str`` is taken as a path when it is
            one line and names an existing file or ends in ``.yaml``/``.yml``; otherwise as
            YAML text. Empty text means all defaults.
        env: variables for ``${VAR}`` expansion; defaults to ``os.environ``.

    Raises:
        ConfigError: the file cannot be read, the YAML does not parse, a key is unknown, a
            value is wrong, or a referenced variable is unset; ``.path`` names the key.
    """
    if isinstance(source, EventBrokerConfig):
        return source
    data: object
    if isinstance(source, Mapping):
        data = source
    elif isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_path(source)):
        filename = os.fspath(source)
        try:
            with open(filename, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(
                f"{ROOT}: cannot read config file {filename!r}: {exc.strerror or exc}", path=ROOT
            ) from exc
        data = _read_yaml(text, f"config file {filename!r}")
    elif isinstance(source, str):
        data = _read_yaml(source, "the config text")
    else:
        raise ConfigError(
            f"{ROOT}: expected a YAML file path, YAML text or a mapping, "
            f"got {type(source).__name__}",
            path=ROOT,
        )
    if data is None:
        data = {}
    _check_shape(data)
    if not isinstance(data, Mapping):
        hint = " (or the path of an existing YAML file)" if isinstance(source, str) else ""
        raise fail(ROOT, f"a mapping of options{hint}", data)
    if ROOT in data:
        data = data[ROOT]
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise fail(ROOT, "a mapping of options", data)
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{ROOT}.{key}: keys must be strings", path=f"{ROOT}.{key}")
    _reject_unknown(data, _TOP_LEVEL, ROOT)
    expanded = _expand_all(data, ROOT, os.environ if env is None else env)
    assert isinstance(expanded, dict)
    return EventBrokerConfig(**expanded)


# -- building ------------------------------------------------------------------------------

#: The top-level module a missing driver raises ImportError for → the extra that installs it.
_DRIVER_EXTRAS = {
    "psycopg": "postgres",
    "psycopg_binary": "postgres",
    "psycopg_c": "postgres",
    "psycopg2": "postgres",
    "redis": "redis",
    "nats": "nats",
}


def build_provider(config: EventBrokerConfig) -> Provider:
    """Create the provider that ``config.provider`` names, from its section.

    The provider's module is imported here, lazily, so choosing ``memory`` never needs an
    extra. It is not started or connected beyond what its constructor does.

    Raises:
        ConfigError: the provider's driver is not installed; the message names the
            ``pip install 'sqlalchemy-eventbroker[...]'`` command.
        ProviderError: the provider's constructor could not reach its backend.
    """
    name = config.provider
    try:
        return _BUILDERS[name](config)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        extra = _DRIVER_EXTRAS.get(missing)
        if extra is None:
            raise
        raise ConfigError(
            f"{ROOT}.provider: the {name} provider needs the {missing} package, which is not "
            f"installed: pip install 'sqlalchemy-eventbroker[{extra}]'",
            path=f"{ROOT}.provider",
        ) from exc


def _memory(config: EventBrokerConfig) -> Provider:
    from .providers.memory import MemoryProvider

    c = config.memory
    return MemoryProvider(c.max_events, c.cleanup_interval, c.max_age)


def _database(config: EventBrokerConfig) -> Provider:
    from .providers.database import DatabaseProvider  # type: ignore[import-not-found,import-untyped,unused-ignore]

    c = config.database
    return DatabaseProvider(  # type: ignore[no-any-return,unused-ignore]
        c.url, table_name=c.table_name, channel=c.channel,
        backstop_interval=c.backstop_interval,
    )


def _redis(config: EventBrokerConfig) -> Provider:
    from .providers.redis import RedisProvider  # type: ignore[import-not-found,import-untyped,unused-ignore]

    c = config.redis
    return RedisProvider(  # type: ignore[no-any-return,unused-ignore]
        c.url, stream_name=c.stream_name, consumer_group=c.consumer_group
    )


def _nats(config: EventBrokerConfig) -> Provider:
    from .providers.nats import NatsProvider  # type: ignore[import-not-found,import-untyped,unused-ignore]

    c = config.nats
    return NatsProvider(c.url, stream_name=c.stream_name)  # type: ignore[no-any-return,unused-ignore]


_BUILDERS: dict[str, Callable[[EventBrokerConfig], Provider]] = {
    "memory": _memory,
    "database": _database,
    "redis": _redis,
    "nats": _nats,
}
