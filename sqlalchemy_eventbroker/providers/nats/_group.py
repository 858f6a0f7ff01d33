"""A member of a NATS group: a pull subscription bound to the group's durable consumer."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from ...event import Event
from .._group_stream import BufferedDelivery, BufferedGroupStream
from .._loop import LoopClosed
from ._names import safe_name, subject_filter, unique_safe_name

if TYPE_CHECKING:
    from ._provider import NatsProvider

__all__ = ["NatsGroupStream"]

log = logging.getLogger("sqlalchemy_eventbroker.providers.nats")

_ACK, _NAK, _WPI, _TERM = b"+ACK", b"-NAK", b"+WPI", b"+TERM"


class NatsGroupStream(BufferedGroupStream[Msg]):
    """One member of ``(group, pattern)``: fetches ``batch_size`` messages at a time.

    Acks, renewals (``+WPI``) and naks are fire-and-forget replies, queued and sent in one
    task on the loop per batch; on ``close()`` the unread buffered messages are nak'ed so
    that another member gets them at once.
    """

    kind = "nats"
    _p: NatsProvider

    def __init__(self, provider: NatsProvider, pattern: str, group: str, lease: float) -> None:
        digest = hashlib.sha1(f"{group}\0{pattern}".encode()).hexdigest()[:12]
        super().__init__(
            provider, pattern, group, lease,
            name=f"{unique_safe_name(provider.consumer_group)}-{safe_name(group)[:64]}-{digest}",
            reconnect_max_delay=0.5)
        self.subject = subject_filter(provider.subject_prefix, pattern)
        self._fetching: concurrent.futures.Future[Any] | None = None
        self._replies: list[tuple[str, bytes]] = []
        self._replies_lock = threading.Lock()
        with provider._translate_errors():
            self._sub = provider._loop.run(self._bind(), provider.request_timeout * 2)

    async def _bind(self) -> Any:
        js = self._p._js
        stream = self._p.stream_name
        try:
            info = await js.consumer_info(stream, self.name)
            if info.config.ack_wait is not None and abs(info.config.ack_wait - self.lease) > 1e-3:
                # The first opener chose the lease; let the latest member's lease win.
                info.config.ack_wait = self.lease
                try:
                    await js.add_consumer(stream, config=info.config)
                except nats.js.errors.APIError as exc:
                    log.warning("nats group %s: keeping ack_wait %.1f s: %s", self.name,
                                info.config.ack_wait, exc)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(stream, config=api.ConsumerConfig(
                durable_name=self.name,
                description=f"eventbroker group {self.group!r} pattern {self.pattern!r}",
                filter_subject=self.subject,
                deliver_policy=api.DeliverPolicy.NEW,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.lease,
                max_deliver=-1,
                max_ack_pending=self._p.max_ack_pending,
            ))
        return await js.pull_subscribe_bind(durable=self.name, stream=stream)

    # -- replies -------------------------------------------------------------------------------

    def _reply(self, msg: Msg, payload: bytes) -> None:
        """Queue an ack (``+ACK``), renew (``+WPI``), nak or term for ``msg``; replies queued
        together go out in one task on the loop, in order (one cross-thread hop per batch
        instead of one per message)."""
        self._replies_for(((msg, payload),))

    def _replies_for(self, replies: Sequence[tuple[Msg, bytes]]) -> None:
        """Queue several replies at once (see :meth:`_reply`)."""
        todo = [(msg.reply, payload) for msg, payload in replies if msg.reply]
        if not todo:
            return
        with self._replies_lock:
            first = not self._replies
            self._replies.extend(todo)
        if first:
            with contextlib.suppress(LoopClosed):
                self._p._loop.call_soon(self._flush_replies)

    def _flush_replies(self) -> None:  # on the loop
        with self._replies_lock:
            replies, self._replies = self._replies, []
        if replies:
            task = self._p._loop.loop.create_task(self._send_replies(replies))
            task.add_done_callback(self._log_task_failure)

    async def _send_replies(self, replies: list[tuple[str, bytes]]) -> None:
        publish = self._p._nc.publish
        for subject, payload in replies:
            await publish(subject, payload)

    def _log_task_failure(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("nats group %s: %s", self.name, task.exception())

    def _ack(self, delivery: BufferedDelivery[Msg]) -> None:
        self._reply(delivery.token, _ACK)

    def _renew(self, deliveries: Sequence[BufferedDelivery[Msg]]
               ) -> Sequence[BufferedDelivery[Msg]]:
        self._replies_for([(d.token, _WPI) for d in deliveries])
        return deliveries  # +WPI cannot fail to be ours: an expired lease is just redelivered

    # -- fetching ------------------------------------------------------------------------------

    def _fill(self, wait: float) -> None:
        """Fetch up to ``batch_size`` messages, waiting up to ``wait`` seconds for the first.

        A disconnected fetch raises ``nats.errors.Error`` (nats-py reconnects by itself and
        the base class backs off); a closed provider ends the member.
        """
        wait = max(wait, 0.01)
        try:
            future = self._p._loop.submit(self._sub.fetch(self._p.batch_size, timeout=wait))
        except LoopClosed:
            raise StopIteration from None
        self._fetching = future
        try:
            msgs = future.result(wait + self._p.request_timeout)
        except (TimeoutError, nats.errors.TimeoutError, concurrent.futures.TimeoutError):
            return
        except concurrent.futures.CancelledError:
            raise StopIteration from None
        finally:
            self._fetching = None
        skip = len(self._p.subject_prefix) + 1
        for msg in msgs:
            if not self._match(msg.subject[skip:]):  # the server filters; this guards odd ones
                self._reply(msg, _ACK)
                continue
            try:
                event = Event.from_json(msg.data)
            except Exception:
                log.exception("nats group %s: unreadable message on %s", self.name, msg.subject)
                self._reply(msg, _TERM)
                continue
            self._buffer.append(BufferedDelivery(event, msg, self))

    # -- closing -------------------------------------------------------------------------------

    def _shut(self) -> None:
        fetching = self._fetching
        if fetching is not None:
            fetching.cancel()
        with self._recv_lock:
            buffered, self._buffer = list(self._buffer), collections.deque()
        for d in buffered:  # hand what we never read to another member at once
            if not d.done:
                d.done = True
                self._reply(d.token, _NAK)
        with contextlib.suppress(*self._p.driver_errors):
            self._p._loop.run(self._sub.unsubscribe(), self._p.request_timeout)
