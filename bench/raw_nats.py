"""Raw NATS JetStream baseline with nats-py, written as plain asyncio.

One stream (file storage, like the provider's default). The publisher awaits each
``js.publish`` for batches of 1, and ``publish_async`` ×N then gathers the acks for larger
batches. A fan-out reader is an ephemeral pull consumer (deliver new, no acks) fetching up to
100 at a time; group members share a durable pull consumer with explicit acks and ack every
message, as BASELINES.md measured.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import nats
import nats.errors
from nats.js import api

from ._env import NATS_URL, raw_items


async def _with_js(url: str, fn: Any) -> Any:
    nc = await nats.connect(url)
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


def setup(tag: str, *, group: bool = False) -> dict[str, Any]:
    cfg = {"url": NATS_URL, "stream": f"EBBENCH_RAW_{tag}", "subject": f"rawbench_{tag}",
           "durable": f"raw-{tag}"}

    async def create(js: Any) -> None:
        await js.add_stream(name=cfg["stream"], subjects=[f"{cfg['subject']}.>"],
                            storage=api.StorageType.FILE)
        if group:
            await js.add_consumer(cfg["stream"], durable_name=cfg["durable"],
                                  ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30,
                                  max_ack_pending=10_000,
                                  deliver_policy=api.DeliverPolicy.NEW)

    asyncio.run(_with_js(NATS_URL, create))
    return cfg


def cleanup(cfg: dict[str, Any]) -> None:
    async def delete(js: Any) -> None:
        try:
            await js.delete_stream(cfg["stream"])
        except Exception:  # noqa: BLE001, S110 - best effort cleanup
            pass

    asyncio.run(_with_js(cfg["url"], delete))


class Publisher:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(cfg["url"]))
        self.js = self.nc.jetstream()
        self.subject = f"{cfg['subject']}.bench.events.created"

    make = staticmethod(raw_items)

    @staticmethod
    def stamp(item: dict[str, Any], t: float) -> None:
        item["payload"]["t"] = t

    async def _send(self, items: list[dict[str, Any]]) -> None:
        js, subject, dumps = self.js, self.subject, json.dumps
        if len(items) == 1:
            await js.publish(subject, dumps(items[0]).encode())
            return
        futures = [await js.publish_async(subject, dumps(i).encode()) for i in items]
        await asyncio.gather(*futures)

    def send(self, items: list[dict[str, Any]]) -> None:
        self.loop.run_until_complete(self._send(items))

    def run_phase(self, items: list[Any], batch: int, interval: float) -> tuple[float, float]:
        async def go() -> tuple[float, float]:
            clock = time.perf_counter
            t0 = clock()
            if interval:
                for i, item in enumerate(items):
                    delay = t0 + i * interval - clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    item["payload"]["t"] = clock()
                    await self._send([item])
            else:
                for k in range(0, len(items), batch):
                    await self._send(items[k:k + batch])
            return t0, clock()

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.run_until_complete(self.nc.close())
        self.loop.close()


class _LoopReader:
    """A pull consumer read by an asyncio loop in a thread of its own."""

    def __init__(self, cfg: dict[str, Any], on_payload: Any, durable: str | None,
                 ack: bool) -> None:
        self.cfg, self.on_payload, self.durable, self.ack = cfg, on_payload, durable, ack
        self.stopped = False
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),),
                                       daemon=True)
        self.thread.start()
        if not self.ready.wait(30) or self.error is not None:
            raise RuntimeError(f"raw nats reader did not start: {self.error}")

    async def _run(self) -> None:
        try:
            nc = await nats.connect(self.cfg["url"])
            js = nc.jetstream()
            subject = f"{self.cfg['subject']}.>"
            if self.durable is not None:
                sub = await js.pull_subscribe_bind(durable=self.durable, stream=self.cfg["stream"])
            else:
                sub = await js.pull_subscribe(
                    subject, durable=None, stream=self.cfg["stream"],
                    config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE,
                                              deliver_policy=api.DeliverPolicy.NEW),
                )
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        on_payload, loads = self.on_payload, json.loads
        try:
            while not self.stopped:
                try:
                    msgs = await sub.fetch(100, timeout=0.2)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                for msg in msgs:
                    on_payload(loads(msg.data)["payload"])
                    if self.ack:
                        await msg.ack()
        finally:
            await nc.close()

    def close(self) -> None:
        self.stopped = True
        self.thread.join(timeout=5)


class Subscriber(_LoopReader):
    def __init__(self, cfg: dict[str, Any], on_payload: Any) -> None:
        super().__init__(cfg, on_payload, durable=None, ack=False)


class GroupConsumer(_LoopReader):
    def __init__(self, cfg: dict[str, Any], on_payload: Any) -> None:
        super().__init__(cfg, on_payload, durable=cfg["durable"], ack=True)
