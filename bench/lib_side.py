"""The library's side of the cross-process measurements: brokers on a shared provider.

The publisher is a sync-mode ``Broker`` without subscriptions: a batch of 1 is
``publish_sync(event)``, a larger batch ``publish_many(events)``. The fan-out subscriber is a
``Broker`` (async mode, 4 workers) with one ``subscribe("bench.**", handler)``; group members
are the same with ``group=...``. Everything the broker does per event (store, announce,
status write-back, metrics) is part of the figure.
"""

from __future__ import annotations

import os
import types
from typing import Any

from prometheus_client import CollectorRegistry

from sqlalchemy_eventbroker import Broker, Event, EventSource, new_event

from ._env import EVENT_TYPE, NATS_URL, REDIS_URL, optional, payload

PATTERN = "bench.**"


class Unavailable(Exception):
    """The provider module is not there (yet)."""


def provider_class(backend: str) -> Any:
    module, name = {"pg": ("providers.database", "DatabaseProvider"),
                    "redis": ("providers.redis", "RedisProvider"),
                    "nats": ("providers.nats", "NatsProvider")}[backend]
    cls, why = optional(module, name)
    if cls is None:
        raise Unavailable(why)
    return cls


def make_provider(backend: str, cfg: dict[str, Any]) -> Any:
    cls = provider_class(backend)
    if backend == "pg":
        return cls(cfg["url"], table_name=cfg["table"], channel=cfg["channel"])
    if backend == "redis":
        return cls(cfg["url"], stream_name=cfg["stream"], consumer_group=cfg["consumer_group"])
    return cls(cfg["url"], stream_name=cfg["stream"])


def setup(backend: str, tag: str, *, pg_url: str = "", group: str = "") -> dict[str, Any]:
    """Config for both processes; creates the schema, and the group so it holds a backlog."""
    if backend == "pg":
        cfg = {"url": pg_url, "table": f"events_{tag}", "channel": f"eb_{tag}"}
    elif backend == "redis":
        cfg = {"url": REDIS_URL, "stream": f"ebbench:lib:{tag}",
               "consumer_group": f"ebbench-{tag}"}
    else:
        cfg = {"url": NATS_URL, "stream": f"EBBENCH_LIB_{tag}"}
    cfg["group"] = group
    provider = make_provider(backend, cfg)
    try:
        if backend == "pg":
            provider.create_schema()
        if group:
            provider.group_stream(PATTERN, group, lease=30.0).close()
    finally:
        provider.close()
    return cfg


def cleanup(backend: str, cfg: dict[str, Any]) -> None:
    provider = make_provider(backend, cfg)
    try:
        if backend == "pg":
            with provider.engine.begin() as conn:  # type: ignore[attr-defined]
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {cfg['table']} CASCADE")
        elif hasattr(provider, "drop"):
            provider.drop()
        elif backend == "nats":
            provider._run(provider._js.delete_stream(cfg["stream"]))
    except Exception:  # noqa: BLE001, S110 - best effort; the database is dropped anyway
        pass
    finally:
        provider.close()


def _broker(backend: str, cfg: dict[str, Any], mode: str, name: str) -> Broker:
    return Broker(make_provider(backend, cfg), mode=mode, worker_count=4, buffer_size=10_000,
                  instance_id=f"{name}-{os.getpid()}", registry=CollectorRegistry(),
                  close_provider=True)


def for_backend(backend: str) -> types.SimpleNamespace:
    # Import the provider now, before a member reports ready: the raw side's client is
    # imported with its module, so the clock must not include the library's import either.
    provider_class(backend)

    class Publisher:
        def __init__(self, cfg: dict[str, Any]) -> None:
            self.broker = _broker(backend, cfg, "sync", "pub").start()

        @staticmethod
        def make(phase: int, n: int) -> list[Event]:
            return [new_event(EventSource.SYSTEM, EVENT_TYPE, payload(phase, i))
                    for i in range(n)]

        @staticmethod
        def stamp(item: Event, t: float) -> None:
            item.payload["t"] = t  # type: ignore[index]

        def send(self, items: list[Event]) -> None:
            if len(items) == 1:
                self.broker.publish_sync(items[0])
            else:
                self.broker.publish_many(items)

        def close(self) -> None:
            self.broker.stop()

    class Subscriber:
        def __init__(self, cfg: dict[str, Any], on_payload: Any) -> None:
            self.broker = _broker(backend, cfg, "async", "sub")
            self.broker.subscribe(PATTERN, lambda e: on_payload(e.payload))
            self.broker.start()

        def close(self) -> None:
            self.broker.stop()

    class GroupConsumer:
        def __init__(self, cfg: dict[str, Any], on_payload: Any) -> None:
            self.broker = _broker(backend, cfg, "async", "member")
            self.broker.subscribe(PATTERN, lambda e: on_payload(e.payload), group=cfg["group"])
            self.broker.start()

        def close(self) -> None:
            self.broker.stop(timeout=5)

    return types.SimpleNamespace(Publisher=Publisher, Subscriber=Subscriber,
                                 GroupConsumer=GroupConsumer)
