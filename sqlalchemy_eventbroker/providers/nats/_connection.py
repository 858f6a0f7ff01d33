"""Connecting to NATS and making sure the JetStream stream and the status bucket exist.

All coroutines here run on a provider's :class:`~.._loop.LoopThread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.js.errors
from nats.js import api

__all__ = ["connect", "ensure_bucket", "ensure_stream"]

log = logging.getLogger("sqlalchemy_eventbroker.providers.nats")


async def _probe(url: str, timeout: float) -> None:
    """Fail fast when no server listens: nats-py would retry the first connect forever."""
    errors = []
    for server in url.split(","):
        parts = urlsplit(server.strip() if "://" in server else f"nats://{server.strip()}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222),
                timeout,
            )
        except (TimeoutError, OSError) as exc:
            errors.append(str(exc) or type(exc).__name__)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise OSError(f"cannot connect: {'; '.join(errors)}")


async def connect(url: str, address: str, name: str, *, connect_timeout: float,
                  reconnect_wait: float, is_closing: Callable[[], bool]) -> Any:
    """A new nats-py connection named ``name`` that reconnects forever, after a fail-fast
    probe; ``address`` (redacted) is what its log lines show."""
    async def on_error(exc: Exception) -> None:
        log.warning("nats at %s: %s", address, exc)

    async def on_disconnect() -> None:
        if not is_closing():
            log.warning("nats at %s: %s disconnected; reconnecting", address, name)

    async def on_reconnect() -> None:
        log.info("nats at %s: %s reconnected", address, name)

    await _probe(url, connect_timeout)
    return await nats.connect(
        servers=[u.strip() for u in url.split(",")],
        connect_timeout=connect_timeout,
        reconnect_time_wait=reconnect_wait,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        name=name,
    )


def _storage(storage: str) -> api.StorageType:
    return api.StorageType.FILE if storage == "file" else api.StorageType.MEMORY


async def ensure_stream(js: Any, name: str, subjects: list[str], *, storage: str,
                        max_age: float, max_msgs: int) -> None:
    """Create the stream ``name`` for ``subjects`` unless it exists; a stream made by an
    earlier version (without the subjects of stored-only events) gets them added."""
    config = api.StreamConfig(
        name=name,
        subjects=subjects,
        storage=_storage(storage),
        retention=api.RetentionPolicy.LIMITS,
        max_age=max_age or None,
        max_msgs=max_msgs or None,
        discard=api.DiscardPolicy.OLD,
    )
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
            return
        except nats.js.errors.BadRequestError:
            info = await js.stream_info(name)  # created concurrently: fine
    have = list(info.config.subjects or [])
    missing = [s for s in subjects if s not in have]
    if missing:
        info.config.subjects = have + missing
        await js.update_stream(info.config)


async def ensure_bucket(js: Any, bucket: str, stream_name: str, *, storage: str,
                        max_age: float, history: int) -> Any:
    """The key-value bucket ``bucket`` (keeping ``history`` values per key), created unless
    it exists."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            return await js.create_key_value(api.KeyValueConfig(
                bucket=bucket, history=history, ttl=max_age or None,
                storage=_storage(storage),
                description=f"eventbroker status entries of stream {stream_name}",
            ))
        except nats.js.errors.BadRequestError:
            return await js.key_value(bucket)
