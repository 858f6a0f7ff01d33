"""A member of a NATS group: a pull subscription bound to the group's durable consumer."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from ...event import Event
from .._group_stream import BufferedDelivery, BufferedGroupStream
from .._loop import LoopClosed
from ._connection import ensure_bucket
from ._names import lead_bucket_name, safe_name, subject_filter, unique_safe_name

if TYPE_CHECKING:
    from ._provider import NatsProvider

__all__ = ["NatsGroupStream"]

log = logging.getLogger("sqlalchemy_eventbroker.providers.nats")

_ACK, _NAK, _WPI, _TERM = b"+ACK", b"-NAK", b"+WPI", b"+TERM"
#: JetStream's pull request subject (the default API prefix: the provider sets no domain).
_NEXT = "$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"


class NatsGroupStream(BufferedGroupStream[Msg]):
    """One member of ``(group, pattern)``: fetches ``batch_size`` messages at a time.

    A fetch is one pull request to the group's durable consumer, answered on this member's
    own inbox subscription: its callback only appends each message (with its arrival time)
    to a list and, once the request is answered (``batch`` messages, or a 404/408 status),
    wakes the member's thread. nats-py's ``fetch`` instead awaited each message through a
    timed ``next_msg`` (a task and a timer per message on the shared loop), which was most
    of a member's loop time. A fill first asks with ``no_wait`` (what is there now); only
    when nothing is, it waits up to ``wait`` seconds for one message.

    Acks, renewals (``+WPI``) and naks are fire-and-forget replies, queued and sent in one
    task on the loop per batch; on ``close()`` the unread buffered messages are nak'ed so
    that another member gets them at once.
    """

    kind = "nats"
    _p: NatsProvider

    def __init__(self, provider: NatsProvider, pattern: str, group: str, lease: float,
                 *, ordered: bool = False) -> None:
        digest = hashlib.sha1(f"{group}\0{pattern}".encode()).hexdigest()[:12]
        super().__init__(
            provider, pattern, group, lease,
            name=f"{unique_safe_name(provider.consumer_group)}-{safe_name(group)[:64]}-{digest}",
            reconnect_max_delay=0.5, ordered=ordered)
        #: Ordered groups: the bucket naming each group's leader, and whether this member
        #: took the leadership from one whose lease lapsed (it died: see _take_over).
        self._lead_kv: Any = None
        self._lapsed = False
        self.subject = subject_filter(provider.subject_prefix, pattern)
        self._fetching: concurrent.futures.Future[None] | None = None
        self._next = _NEXT.format(stream=provider.stream_name, consumer=self.name)
        self._inbox = ""
        self._arrived: list[tuple[Msg, float]] = []  # appended on the loop, taken here
        self._pull_lock = threading.Lock()
        self._pull_seq = 0
        #: The pull request waited for: (reply token, messages wanted, got, answered).
        self._pull: tuple[str, int, list[int], concurrent.futures.Future[None]] | None = None
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
        self._inbox = self._p._nc.new_inbox()
        return await self._p._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:  # on the loop
        """A message or status answering one of this member's pull requests.

        Statuses come on ``<inbox>.<request>``, naming their request; messages keep their own
        subject, so each counts toward the request being waited for (one of an earlier,
        timed-out request only ends the current one a message early).
        """
        status = msg.headers.get("Status") if msg.headers else None
        if status == "100":  # idle heartbeat
            return
        with self._pull_lock:
            pull = self._pull
            if status is None:
                self._arrived.append((msg, time.monotonic()))
                if pull is None:
                    return
                pull[2][0] += 1
                if pull[2][0] < pull[1]:
                    return
            elif pull is None or msg.subject.rpartition(".")[2] != pull[0]:
                return  # an earlier request's status
            answered = pull[3]
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled: closing
            answered.set_result(None)

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

        A disconnected request raises ``nats.errors.Error`` (nats-py reconnects by itself and
        the base class backs off); a closed provider ends the member.
        """
        if self._take_arrived():
            return
        self._request({"batch": self._p.batch_size, "no_wait": True}, self._p.batch_size,
                      self._p.request_timeout)
        if self._take_arrived():
            return
        wait = max(wait, 0.01)
        self._request({"batch": 1, "expires": int(wait * 1e9)}, 1,
                      wait + self._p.request_timeout)
        self._take_arrived()

    def _request(self, request: dict[str, Any], want: int, timeout: float) -> None:
        """Send one pull request and wait until it was answered or ``timeout`` passed."""
        answered: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._pull_lock:
            self._pull_seq += 1
            token = str(self._pull_seq)
            self._pull = (token, want, [0], answered)
        body = json.dumps(request).encode()
        try:
            sent = self._p._loop.submit(
                self._p._nc.publish(self._next, body, reply=f"{self._inbox}.{token}"))
        except LoopClosed:
            raise StopIteration from None
        sent.add_done_callback(lambda f: _fail(answered, f))
        self._fetching = answered
        try:
            answered.result(timeout)
        except concurrent.futures.TimeoutError:
            pass  # answered later (if at all): what arrives is taken by the next fill
        except concurrent.futures.CancelledError:
            raise StopIteration from None
        finally:
            self._fetching = None
            with self._pull_lock:
                if self._pull is not None and self._pull[0] == token:
                    self._pull = None

    def _take_arrived(self) -> int:
        """Move the messages that arrived into the buffer; how many there were."""
        with self._pull_lock:
            arrived, self._arrived = self._arrived, []
        skip = len(self._p.subject_prefix) + 1
        for msg, at in arrived:
            if not self._match(msg.subject[skip:]):  # the server filters; this guards odd ones
                self._reply(msg, _ACK)
                continue
            try:
                event = Event.from_json(msg.data)
            except Exception:
                log.exception("nats group %s: unreadable message on %s", self.name, msg.subject)
                self._reply(msg, _TERM)
                continue
            delivery = BufferedDelivery(event, msg, self)
            delivery.received_at = at
            self._buffer.append(delivery)
        return len(arrived)

    # -- ordered groups: leadership ------------------------------------------------------------
    #
    # One key per group in the bucket ``<stream>_lead``, holding "<token> <until>" (wall-clock
    # seconds): nats-server 2.9 has no per-key expiry, so a lapsed leader is one whose "until"
    # passed, and every change is a compare-and-set on the key's revision.

    def _lead(self, token: str) -> bool:
        with self._p._translate_errors():
            held: bool = self._p._loop.run(self._lead_async(token), self._p.request_timeout * 2)
            return held

    async def _lead_async(self, token: str) -> bool:
        if self._lead_kv is None:
            self._lead_kv = await ensure_bucket(
                self._p._js, lead_bucket_name(self._p.stream_name), self._p.stream_name,
                storage=self._p.storage, max_age=0, history=1)
        kv = self._lead_kv
        now = time.time()
        mine = f"{token} {now + self.lease:.3f}".encode()
        try:
            entry = await kv.get(self.name)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            entry = None
        try:
            if entry is None or not entry.value:
                await kv.create(self.name, mine)
                self._lapsed = False
                return True
            holder, _, until = entry.value.decode().partition(" ")
            if holder != token and float(until or 0) > now:
                return False
            if holder != token:
                self._lapsed = True
            await kv.update(self.name, mine, last=entry.revision)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # another member changed it first

    def _resign(self, token: str) -> None:
        async def resign() -> None:
            kv = self._lead_kv
            if kv is None:
                return
            try:
                entry = await kv.get(self.name)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return
            if entry.value and entry.value.decode().partition(" ")[0] == token:
                with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                    await kv.delete(self.name, last=entry.revision)

        with self._p._translate_errors():
            self._p._loop.run(resign(), self._p.request_timeout * 2)

    def _take_over(self) -> None:
        """After a leader whose lease lapsed (it died): wait until JetStream treats its
        unacknowledged messages as expired (``ack_wait`` is the lease, and it renewed them
        no later than its leadership), so that they come back first, oldest first, before
        anything new (the server hands out redeliveries before new messages). The
        leadership is kept meanwhile. A leader that resigned nak'ed what it had: nothing to
        wait for."""
        if not self._lapsed:
            return
        self._lapsed = False
        until = time.monotonic() + self.lease * 1.25
        while not self._closed.is_set() and time.monotonic() < until:
            self._closed.wait(min(self.lease / 3, max(0.0, until - time.monotonic())))
            if not self._lead(self._lead_token):
                return  # lost it meanwhile; _keep_lead notices on the next look

    # -- closing -------------------------------------------------------------------------------

    def _shut(self) -> None:
        fetching = self._fetching
        if fetching is not None:
            fetching.cancel()
        with self._recv_lock:
            buffered, self._buffer = list(self._buffer), collections.deque()
            with self._pull_lock:
                arrived, self._arrived = self._arrived, []
        for d in buffered:  # hand what we never read to another member at once
            if not d.done:
                d.done = True
                self._reply(d.token, _NAK)
        self._replies_for([(msg, _NAK) for msg, _ in arrived])
        with contextlib.suppress(*self._p.driver_errors):
            self._p._loop.run(self._sub.unsubscribe(), self._p.request_timeout)


def _fail(answered: concurrent.futures.Future[None], sent: concurrent.futures.Future[Any]) -> None:
    """A pull request that could not be sent fails the wait for its answer."""
    exc = None if sent.cancelled() else sent.exception()
    if exc is not None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # answered already
            answered.set_exception(exc)
