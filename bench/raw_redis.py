"""Raw Redis Streams baseline with redis-py: XADD (pipelined per batch), XREAD, XREADGROUP.

One stream; each entry holds the event's JSON in field ``e``. Fan-out readers block on
``XREAD`` from the last id at open; group members ``XREADGROUP COUNT 100`` and ``XACK`` each
batch with one call, as BASELINES.md measured.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import redis

from ._env import REDIS_URL, raw_items


def setup(tag: str, *, group: bool = False) -> dict[str, Any]:
    cfg = {"url": REDIS_URL, "stream": f"ebbench:raw:{tag}", "group": f"raw-{tag}"}
    client = redis.Redis.from_url(REDIS_URL)
    client.xadd(cfg["stream"], {"e": json.dumps({"init": True})})
    if group:
        client.xgroup_create(cfg["stream"], cfg["group"], id="$")
    client.close()
    return cfg


def cleanup(cfg: dict[str, Any]) -> None:
    client = redis.Redis.from_url(cfg["url"])
    client.delete(cfg["stream"])
    client.close()


class Publisher:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.client = redis.Redis.from_url(cfg["url"])
        self.stream = cfg["stream"]

    make = staticmethod(raw_items)

    @staticmethod
    def stamp(item: dict[str, Any], t: float) -> None:
        item["payload"]["t"] = t

    def send(self, items: list[dict[str, Any]]) -> None:
        if len(items) == 1:
            self.client.xadd(self.stream, {"e": json.dumps(items[0])})
            return
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.xadd(self.stream, {"e": json.dumps(item)})
        pipe.execute()

    def close(self) -> None:
        self.client.close()


class Subscriber:
    def __init__(self, cfg: dict[str, Any], on_payload: Any) -> None:
        self.client = redis.Redis.from_url(cfg["url"])
        self.stream = cfg["stream"]
        last = self.client.xrevrange(self.stream, count=1)
        self.last_id = last[0][0] if last else b"0-0"
        self.on_payload = on_payload
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        on_payload, loads = self.on_payload, json.loads
        while not self.stopped.is_set():
            reply = self.client.xread({self.stream: self.last_id}, count=1000, block=200)
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    on_payload(loads(fields[b"e"])["payload"])

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.client.close()


class GroupConsumer:
    def __init__(self, cfg: dict[str, Any], on_payload: Any) -> None:
        self.client = redis.Redis.from_url(cfg["url"])
        self.stream, self.group = cfg["stream"], cfg["group"]
        self.name = f"c-{uuid.uuid4().hex[:8]}"
        self.on_payload = on_payload
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        on_payload, loads, client = self.on_payload, json.loads, self.client
        while not self.stopped.is_set():
            reply = client.xreadgroup(self.group, self.name, {self.stream: ">"}, count=100,
                                      block=200)
            for _stream, entries in reply or ():
                ids = []
                for entry_id, fields in entries:
                    on_payload(loads(fields[b"e"])["payload"])
                    ids.append(entry_id)
                if ids:
                    client.xack(self.stream, self.group, *ids)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.client.close()
