"""The cross-instance bus: what a broker reads from its provider, and the leases it holds.

Every broker with fan-out subscriptions reads ONE ``provider.stream("*")`` opened with
``exclude_origin=<its origin>`` (so it never sees its own events, the same way on every
backend) and hands what other brokers published to the pipeline. Every group subscription
reads its own ``provider.group_stream`` and acknowledges each delivery once its handler
finished; while a handler runs, its lease is renewed every ``lease / 3`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from ._pipeline import RECEIVED, Job, Pipeline, Subscription
from ._threads import QuietThread
from .providers.base import BusProvider, Delivery, EventStream

__all__ = ["Bus"]

log = logging.getLogger("sqlalchemy_eventbroker.broker")

#: Seconds a consumer thread blocks in receive() before checking whether it should stop.
POLL = 0.2
#: Group deliveries a member has in flight (queued for or running on the pool) per worker.
#: A few per worker keep the workers fed from the queue while the group loop fetches the
#: next batch; 1 per worker made them hand over to that thread every few events.
IN_FLIGHT_PER_WORKER = 4


class Bus:
    """One broker's readers of the provider: the fan-out receiver and the group consumers."""

    def __init__(self, provider: BusProvider, pipeline: Pipeline, name: str) -> None:
        self.provider = provider
        self.pipeline = pipeline
        self.name = name
        self.running = False
        self._lock = threading.Lock()
        self._receiver: EventStream | None = None
        self._receiver_thread: threading.Thread | None = None
        self._inflight: dict[int, tuple[Delivery, float]] = {}
        self._renewer: threading.Thread | None = None
        self._renew_wake = threading.Event()
        pipeline.on_acknowledge = self._acknowledge

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self._renewer = QuietThread(target=self._renew_loop, name=f"{self.name}-lease-renewer",
                                    daemon=True)
        self._renewer.start()

    def stop_reading(self, subs: list[Subscription], deadline: float) -> None:
        """Stop taking work from the provider; wait (until ``deadline``) for the readers."""
        self.running = False
        with self._lock:
            receiver, thread = self._receiver, self._receiver_thread
        if receiver is not None:
            _close_quietly(receiver)
        threads = [s.thread for s in subs if s.thread is not None]
        if thread is not None:
            threads.append(thread)
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def close(self, subs: list[Subscription]) -> None:
        """After the pipeline finished: close group streams and stop renewing leases."""
        for sub in subs:
            if sub.stream is not None:
                _close_quietly(sub.stream)
        self._renew_wake.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=2)

    # -- fan-out ---------------------------------------------------------------------------

    def ensure_receiver(self) -> None:
        with self._lock:
            if self._receiver is not None or not self.running:
                return
            stream = self.provider.stream("*", exclude_origin=self.pipeline.origin)
            self._receiver = stream
            self._receiver_thread = QuietThread(
                target=self._receive_loop, args=(stream,), name=f"{self.name}-receiver",
                daemon=True,
            )
            self._receiver_thread.start()

    def _receive_loop(self, stream: EventStream) -> None:
        pipeline = self.pipeline
        while self.running:
            try:
                event = stream.receive(timeout=POLL)
            except StopIteration:
                return
            except Exception as exc:
                log.warning("eventbroker: fan-out stream failed: %s", exc)
                pipeline.metrics.error("stream")
                time.sleep(POLL)
                continue
            if event is None:
                continue
            try:
                pipeline.run((event,), RECEIVED, inline=pipeline.sync)
            except Exception as exc:  # handlers' failures are recorded; this is the rest
                log.warning("eventbroker: could not dispatch received event %s: %s", event.id,
                            exc, extra={"event_id": event.id})

    # -- groups ----------------------------------------------------------------------------

    def start_group_consumer(self, sub: Subscription) -> None:
        with self._lock:
            if sub.stream is not None or not self.running or not sub.active:
                return
            assert sub.group is not None
            if sub.ordered:  # only then: a third-party provider may not know the option
                sub.stream = self.provider.group_stream(sub.pattern, sub.group, lease=sub.lease,
                                                        ordered=True)
            else:
                sub.stream = self.provider.group_stream(sub.pattern, sub.group, lease=sub.lease)
            sub.thread = QuietThread(target=self._group_loop, args=(sub,),
                                     name=f"{self.name}-group-{sub.group}", daemon=True)
            sub.thread.start()

    def stop_group_consumer(self, sub: Subscription) -> None:
        stream = sub.stream
        if stream is None:
            return
        if sub.thread is not None and sub.thread is not threading.current_thread():
            sub.thread.join(timeout=2 * POLL + 1)
        _close_quietly(stream)

    def _group_loop(self, sub: Subscription) -> None:
        stream = sub.stream
        assert stream is not None
        pipeline = self.pipeline
        # At most `limit` deliveries in flight per group subscription (IN_FLIGHT_PER_WORKER
        # per worker; 1 in sync mode), so one member does not lease events that it cannot
        # start on soon (those in flight have their leases renewed meanwhile). The loop takes
        # as many as are free in one call and dispatches them together: its bookkeeping
        # (locks, lease tracking, the pool's wake-up) is paid per batch, not per event.
        limit = 1 if pipeline.sync else max(1, pipeline.worker_count) * IN_FLIGHT_PER_WORKER
        slots = threading.BoundedSemaphore(limit)
        take = stream.receive_many
        while sub.active and self.running:
            if not slots.acquire(timeout=POLL):
                continue
            free = 1
            while free < limit and slots.acquire(blocking=False):
                free += 1
            try:
                deliveries = take(free, POLL)
            except StopIteration:
                slots.release(free)
                return
            except Exception as exc:
                slots.release(free)
                log.warning("eventbroker: group %r stream failed: %s", sub.group, exc)
                pipeline.metrics.error("stream")
                time.sleep(POLL)
                continue
            if len(deliveries) < free:
                slots.release(free - len(deliveries))
            jobs, leased = [], []
            for delivery in deliveries:
                if sub.match(delivery.event.type):
                    jobs.append(Job(delivery.event, (sub,), delivery=delivery, slot=slots))
                    leased.append(delivery)
                else:  # defensive: a provider filtering loosely
                    delivery.ack()
                    slots.release()
            if not jobs:
                continue
            self._track(leased, sub.lease)
            try:
                pipeline.run([j.event for j in jobs], RECEIVED, inline=pipeline.sync, jobs=jobs)
            except Exception as exc:  # not acked: the lease runs out and it is redelivered
                self._untrack(leased)
                slots.release(len(jobs))
                log.warning("eventbroker: could not dispatch %d group deliveries (%s): %s",
                            len(jobs), jobs[0].event.id, exc,
                            extra={"event_id": jobs[0].event.id})

    def _acknowledge(self, job: Job) -> None:
        delivery = job.delivery
        assert delivery is not None
        self._untrack((delivery,))
        try:
            delivery.ack()
        except Exception as exc:
            log.warning("eventbroker: ack of event %s failed (it will be redelivered): %s",
                        job.event.id, exc, extra={"event_id": job.event.id})
            self.pipeline.metrics.error("provider")
        if job.slot is not None:
            job.slot.release()

    # -- lease renewal ---------------------------------------------------------------------

    def _track(self, deliveries: Sequence[Delivery], lease: float) -> None:
        with self._lock:
            idle = not self._inflight
            for delivery in deliveries:
                self._inflight[id(delivery)] = (delivery, lease)
        if idle:  # else the renewer is awake and sees them on its next round
            self._renew_wake.set()

    def _untrack(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            for delivery in deliveries:
                self._inflight.pop(id(delivery), None)

    def _renew_loop(self) -> None:
        last: dict[int, float] = {}
        while self.running or self._inflight:
            with self._lock:
                items = list(self._inflight.items())
            if not items:
                self._renew_wake.wait(1.0)
                self._renew_wake.clear()
                if not self.running and not self._inflight:
                    return
                continue
            now = time.monotonic()
            shortest = min(lease for _, (_, lease) in items)
            for key, (delivery, lease) in items:
                if now - last.setdefault(key, now) >= lease / 3:
                    try:
                        delivery.renew()
                    except Exception as exc:
                        log.warning("eventbroker: lease renewal failed: %s", exc)
                    last[key] = now
            for key in list(last):
                if key not in self._inflight:
                    del last[key]
            self._renew_wake.wait(max(0.05, shortest / 6))
            self._renew_wake.clear()


def _close_quietly(obj: object) -> None:
    try:
        obj.close()  # type: ignore[attr-defined]
    except Exception as exc:
        log.debug("eventbroker: close failed: %s", exc)
