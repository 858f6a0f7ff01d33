"""The provider conformance suite: one set of tests every provider passes.

Subclass :class:`ProviderConformance` once per backend (``test_<backend>.py``), give it a
``provider_factory`` fixture and set the capability flags to what the backend guarantees::

    class TestRedisProvider(ProviderConformance):
        durable_across_restart = True

        @pytest.fixture
        def provider_factory(self, redis_url, unique_name):
            made = []
            def make():
                made.append(RedisProvider(redis_url, stream_name=f"test:{unique_name}"))
                return made[-1]
            yield make
            ...  # drop the backend namespace, close every provider made

``provider_factory()`` returns a provider on **the same backend namespace** each time it is
called: a second connection, as another process would have. Where the backend lives inside one
object (``MemoryProvider``), the factory returns that same object again and sets
``separate_instances = False``. The suite closes nothing the factory made; the fixture does.

Every provider is tested as the broker uses it, a ``BusProvider``: the batch write with an
origin (``store_and_publish_many``), ``update_status_many`` and ``stream(exclude_origin=)``
are required of every backend. A third-party provider with only API.md section 4's methods
gets them from ``bus_provider``; ``test_memory.py`` runs this suite through that adapter.

Capability flags (like SQLAlchemy's dialect requirements) say what a backend guarantees. A
test of a guarantee a backend does not give is reported as an expected failure with the reason
(``XFAIL``), never skipped silently: the README's provider table states the same limits.

Timing: group tests use ``lease`` (seconds, short) and wait with deadlines, never bare sleeps,
except where a test must show that something does *not* happen within a bounded time.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from sqlalchemy_eventbroker import Broker, Event, EventSource, EventStatus, new_event
from sqlalchemy_eventbroker.providers.base import (
    BusProvider,
    Delivery,
    EventFilter,
    EventStream,
    GroupStream,
    Provider,
    ProviderStats,
    StatusUpdate,
)
from sqlalchemy_eventbroker.testing import EventRecorder

__all__ = ["ProviderConformance"]

UTC = dt.UTC
ProviderFactory = Callable[[], BusProvider]


def _event(type_: str = "public.users.create", payload: Any = None, **fields: Any) -> Event:
    e = new_event(fields.pop("source", EventSource.DATABASE), type_, payload,
                  user_id=fields.pop("user_id", None),
                  session_id=fields.pop("session_id", ""),
                  instance_id=fields.pop("instance_id", ""),
                  metadata=fields.pop("metadata", None))
    for key, value in fields.items():
        setattr(e, key, value)
    return e


def _drain(stream: EventStream | GroupStream, count: int, timeout: float) -> list[Any]:
    """Receive until ``count`` items arrived or ``timeout`` passed; returns what arrived."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        item = stream.receive(timeout=min(remaining, 0.5))
        if item is not None:
            got.append(item)
    return got


def _quiet(stream: EventStream | GroupStream, period: float) -> list[Any]:
    """Everything that arrives within ``period`` seconds (expected: nothing)."""
    got: list[Any] = []
    deadline = time.monotonic() + period
    while (remaining := deadline - time.monotonic()) > 0:
        item = stream.receive(timeout=min(remaining, 0.25))
        if item is not None:
            got.append(item)
    return got


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class ProviderConformance:
    """The whole ``Provider`` protocol plus the cross-instance semantics of API.md section 3."""

    # -- capability flags: override in a subclass to state what the backend guarantees -------

    #: ``group_stream`` is implemented (competing consumers with leases).
    supports_groups: ClassVar[bool] = True
    #: Events published by one publisher reach every stream and group in publish order.
    ordered_per_publisher: ClassVar[bool] = True
    #: A new provider object on the same backend (after ``close()``) still has the stored
    #: events and the groups' positions: state lives outside the process.
    durable_across_restart: ClassVar[bool] = True
    #: ``provider_factory()`` returns distinct connections to one backend (False: one object).
    separate_instances: ClassVar[bool] = True
    #: Lease, in seconds, used by the group tests; short so the suite stays fast.
    lease: ClassVar[float] = 1.0
    #: How long a delivery may take to arrive before a test fails.
    delivery_timeout: ClassVar[float] = 5.0
    #: How long a test watches to be confident something does *not* arrive.
    quiet_period: ClassVar[float] = 0.5

    # -- fixtures ------------------------------------------------------------------------------

    @pytest.fixture
    def provider_factory(self) -> Iterator[ProviderFactory]:
        """Abstract: yield a callable making providers on one backend namespace (see above)."""
        raise NotImplementedError(f"{type(self).__name__} must define a provider_factory fixture")
        yield  # pragma: no cover

    @pytest.fixture
    def provider(self, provider_factory: ProviderFactory) -> BusProvider:
        return provider_factory()

    @pytest.fixture
    def peer(self, provider_factory: ProviderFactory) -> BusProvider:
        """A second provider on the same backend: what another process would hold."""
        return provider_factory()

    def lacks(self, capability: str, why: str) -> None:
        """Mark this test as testing a guarantee the provider does not give (XFAIL)."""
        if not getattr(self, capability):
            pytest.xfail(f"{type(self).__name__}: {capability} is False: {why}")

    # -- the protocol itself -------------------------------------------------------------------

    def test_protocol__provider_implements_it(self, provider: BusProvider) -> None:
        """The provider satisfies the runtime-checkable ``Provider`` protocol."""
        assert isinstance(provider, Provider)

    def test_protocol__bus_provider_declares_in_process(self, provider: BusProvider) -> None:
        """The provider is a ``BusProvider`` (what the broker talks to) and declares
        ``in_process`` on its class, as a bool."""
        assert isinstance(provider, BusProvider)
        assert isinstance(type(provider).in_process, bool)

    # -- store, get ------------------------------------------------------------------------------

    def test_store__get_roundtrips_every_field(self, provider: BusProvider) -> None:
        """``get`` returns an event equal to the stored one, field by field."""
        e = _event("public.users.update", {"name": "ada", "tags": [], "n": 1.5, "nested": {}},
                   user_id=7, session_id="sess-1", instance_id="api-1",
                   metadata={"changes": {"name": {"old": "a", "new": "ada"}}, "empty": []})
        e.retry_count = 2
        e.error = "boom"
        e.processed_at = e.created_at + dt.timedelta(milliseconds=5)
        provider.store(e)
        got = provider.get(e.id)
        assert got == e
        assert got is not e
        assert got.created_at.tzinfo is not None

    def test_key__round_trips_through_store_get_list_stream_and_group(
            self, provider: BusProvider) -> None:
        """An event's ``key`` comes back from ``get``, ``list``, a stream and a group stream;
        an event without one comes back with ``""``."""
        stream = provider.stream("public.keyed.*")
        gs = (provider.group_stream("public.keyed.*", "keyed", lease=self.lease * 5)
              if self.supports_groups else None)
        try:
            keyed = _event("public.keyed.update", {"id": 42, "n": "a"}, key="public.keyed:42,a")
            plain = _event("public.keyed.create", {"id": 1})
            provider.store_and_publish_many([keyed, plain], origin="")
            assert provider.get(keyed.id).key == "public.keyed:42,a"  # type: ignore[union-attr]
            assert provider.get(plain.id).key == ""  # type: ignore[union-attr]
            listed = provider.list(EventFilter(entity="keyed"))
            assert {e.id: e.key for e in listed} == {keyed.id: keyed.key, plain.id: ""}
            got = _drain(stream, 2, self.delivery_timeout)
            assert {e.id: e.key for e in got} == {keyed.id: keyed.key, plain.id: ""}
            if gs is not None:
                delivered = _drain(gs, 2, self.delivery_timeout)
                for d in delivered:
                    d.ack()
                assert {d.event.id: d.event.key for d in delivered} == {
                    keyed.id: keyed.key, plain.id: ""}
        finally:
            stream.close()
            if gs is not None:
                gs.close()

    def test_store__keeps_a_copy(self, provider: BusProvider) -> None:
        """Changing the event object after ``store`` does not change what is stored."""
        e = _event(payload={"a": 1})
        provider.store(e)
        e.payload = {"a": 2}
        e.status = EventStatus.FAILED
        got = provider.get(e.id)
        assert got is not None and got.payload == {"a": 1} and got.status is EventStatus.PENDING

    def test_store__same_id_replaces(self, provider: BusProvider) -> None:
        """Storing an event again under the same id replaces it; ``list`` shows it once."""
        e = _event(payload={"v": 1})
        provider.store(e)
        e.payload = {"v": 2}
        provider.store(e)
        assert provider.get(e.id).payload == {"v": 2}  # type: ignore[union-attr]
        assert [x.id for x in provider.list(EventFilter())] == [e.id]

    def test_get__unknown_id_is_none(self, provider: BusProvider) -> None:
        """An id never stored gives ``None``, not an error."""
        assert provider.get("00000000-0000-7000-8000-000000000000") is None

    def test_store__payload_of_100_kb(self, provider: BusProvider) -> None:
        """A 100 KB payload is stored, read back and carried by a stream intact."""
        big = {"blob": "x" * 100_000, "n": list(range(100))}
        stream = provider.stream("*")
        try:
            e = _event("public.files.create", big)
            provider.store(e)
            provider.publish(e)
            assert provider.get(e.id).payload == big  # type: ignore[union-attr]
            got = _drain(stream, 1, self.delivery_timeout)
            assert [x.payload for x in got] == [big]
        finally:
            stream.close()

    def test_limits__longest_fields_fit_and_longer_are_refused(self, provider: BusProvider) -> None:
        """Fields at their documented limit are stored intact; one character more is refused by
        ``validate()`` with an ``EventValidationError`` naming the field, before the provider."""
        from sqlalchemy_eventbroker import EventValidationError
        from sqlalchemy_eventbroker.event import FIELD_LIMITS

        broker = Broker(provider=provider, mode="sync", instance_id="limits", close_provider=False)
        broker.start()
        try:
            longest = _event("t" * FIELD_LIMITS["type"])
            for name, limit in FIELD_LIMITS.items():
                if name != "type":
                    setattr(longest, name, "é" * limit)
            broker.publish(longest)
            got = provider.get(longest.id)
            assert got is not None
            assert {n: getattr(got, n) for n in FIELD_LIMITS} == {
                n: getattr(longest, n) for n in FIELD_LIMITS}
            for name, limit in FIELD_LIMITS.items():
                e = _event()
                setattr(e, name, "x" * (limit + 1))
                with pytest.raises(EventValidationError) as info:
                    broker.publish(e)
                assert info.value.field == name
                assert str(limit) in str(info.value)
                assert provider.get(e.id) is None
        finally:
            broker.stop(timeout=5)

    @pytest.mark.parametrize(
        ("payload", "path"),
        [
            pytest.param({"x": float("nan")}, "payload.x", id="nan"),
            pytest.param({"x": [1, float("inf")]}, "payload.x[1]", id="inf"),
            pytest.param({"x": b"raw"}, "payload.x", id="bytes"),
            pytest.param({"x": {1, 2}}, "payload.x", id="set"),
            pytest.param({"x": object()}, "payload.x", id="object"),
            pytest.param({"x": "a\ud800b"}, "payload.x", id="lone-surrogate"),
            pytest.param({"\udfff": 1}, "payload", id="surrogate-key"),
            pytest.param({1: "a"}, "payload", id="int-key"),
            pytest.param(functools.reduce(lambda v, _: [v], range(900), 0), "payload[0]",
                         id="900-deep"),
        ],
    )
    def test_payload__one_check_on_every_provider(self, provider: BusProvider, payload: Any,
                                                  path: str) -> None:
        """What is not plain storable JSON is refused with a ``PayloadError`` naming its path,
        the same on every provider: by ``publish`` (through ``validate()``) and by a direct
        ``store``; nothing is stored and the provider stays usable."""
        from sqlalchemy_eventbroker import PayloadError

        broker = Broker(provider=provider, mode="sync", instance_id="p", close_provider=False)
        broker.start()
        try:
            e = _event("public.docs.create")
            e.payload = payload
            with pytest.raises(PayloadError) as info:
                broker.publish(e)
            assert str(info.value).startswith(path)
            with pytest.raises(PayloadError):
                provider.store(e)
            assert provider.get(e.id) is None
            fine = _event("public.docs.create", {"ok": [1.5, "é", None, True]})
            broker.publish(fine)
            assert provider.get(fine.id).payload == fine.payload  # type: ignore[union-attr]
        finally:
            broker.stop(timeout=5)

    # -- list ----------------------------------------------------------------------------------

    @pytest.fixture
    def stored(self, provider: BusProvider) -> list[Event]:
        """Eight events with distinct field values, created 1 s apart, stored in order."""
        base = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
        specs = [
            ("public.users.create", EventSource.DATABASE, 1, "api-1"),
            ("public.users.update", EventSource.DATABASE, 2, "api-1"),
            ("public.orders.create", EventSource.DATABASE, 1, "api-2"),
            ("auth.sessions.create", EventSource.SYSTEM, None, "api-2"),
            ("public.users.delete", EventSource.DATABASE, 1, "api-1"),
            ("ui.clicked", EventSource.FRONTEND, 3, "web"),
            ("public.orders.update", EventSource.DATABASE, 2, "api-2"),
            ("auth.sessions.delete", EventSource.SYSTEM, None, "api-1"),
        ]
        events = []
        for i, (type_, source, user, inst) in enumerate(specs):
            e = _event(type_, {"i": i}, source=source, user_id=user, instance_id=inst)
            e.created_at = base + dt.timedelta(seconds=i)
            events.append(e)
            provider.store(e)
        provider.update_status(events[1].id, EventStatus.COMPLETED)
        provider.update_status(events[4].id, EventStatus.FAILED, "boom")
        provider.update_status(events[6].id, EventStatus.PROCESSING)
        return events

    def test_list__all_oldest_first(self, provider: BusProvider, stored: list[Event]) -> None:
        """An empty filter lists everything, oldest ``created_at`` first."""
        assert [e.id for e in provider.list(EventFilter())] == [e.id for e in stored]

    def test_iter_events__what_list_returns_across_pages(self, provider: BusProvider) -> None:
        """``iter_events`` (what ``Broker.replay`` reads) yields exactly what ``list`` returns,
        in its order, across more than one page, also when events share one ``created_at``
        (a captured flush) and with ``limit``/``offset``."""
        same = dt.datetime(2024, 1, 1, tzinfo=UTC)
        events = [_event("a.b.c", {"i": i}) for i in range(1_205)]
        for e in events:
            e.created_at = same
        provider.store_and_publish_many(events)
        listed = [e.id for e in provider.list(EventFilter())]
        assert len(listed) == 1_205
        assert [e.id for e in provider.iter_events(EventFilter())] == listed
        window = EventFilter(offset=3, limit=1_100)
        assert [e.id for e in provider.iter_events(window)] == listed[3:1_103]

    def test_list__oldest_first_even_when_stored_out_of_order(self, provider: BusProvider) -> None:
        """Order is by ``created_at``, not by the order of ``store`` calls."""
        base = dt.datetime(2024, 1, 1, tzinfo=UTC)
        late, early = _event("a.b.c"), _event("a.b.c")
        late.created_at, early.created_at = base + dt.timedelta(seconds=5), base
        provider.store(late)
        provider.store(early)
        assert [e.id for e in provider.list(EventFilter())] == [early.id, late.id]

    @pytest.mark.parametrize(
        ("flt", "expected"),
        [
            pytest.param(EventFilter(source=EventSource.SYSTEM), [3, 7], id="source"),
            pytest.param(EventFilter(status=EventStatus.PENDING), [0, 2, 3, 5, 7], id="status"),
            pytest.param(EventFilter(status=EventStatus.FAILED), [4], id="status-failed"),
            pytest.param(EventFilter(user_id=1), [0, 2, 4], id="user_id"),
            pytest.param(EventFilter(schema="auth"), [3, 7], id="schema"),
            pytest.param(EventFilter(entity="orders"), [2, 6], id="entity"),
            pytest.param(EventFilter(operation="create"), [0, 2, 3], id="operation"),
            pytest.param(EventFilter(instance_id="api-2"), [2, 3, 6], id="instance_id"),
            pytest.param(EventFilter(type_pattern="public.users.*"), [0, 1, 4], id="pattern"),
            pytest.param(EventFilter(type_pattern="*.*.delete"), [4, 7], id="pattern-star"),
            pytest.param(EventFilter(type_pattern="public.**"), [0, 1, 2, 4, 6], id="pattern-**"),
            pytest.param(EventFilter(type_pattern="*"), list(range(8)), id="pattern-all"),
            pytest.param(EventFilter(schema="public", operation="update", user_id=2), [1, 6],
                         id="combined"),
            pytest.param(EventFilter(limit=3), [0, 1, 2], id="limit"),
            pytest.param(EventFilter(limit=3, offset=2), [2, 3, 4], id="limit-offset"),
            pytest.param(EventFilter(offset=6), [6, 7], id="offset"),
            pytest.param(EventFilter(offset=20), [], id="offset-past-end"),
            pytest.param(EventFilter(schema="public", limit=2, offset=1), [1, 2],
                         id="filter-then-page"),
        ],
    )
    def test_list__filters(self, provider: BusProvider, stored: list[Event], flt: EventFilter,
                           expected: list[int]) -> None:
        """Each ``EventFilter`` field selects exactly its events; paging applies afterwards."""
        assert [e.id for e in provider.list(flt)] == [stored[i].id for i in expected]

    def test_list__time_range_start_inclusive_end_exclusive(
        self, provider: BusProvider, stored: list[Event]
    ) -> None:
        """``start_time`` is inclusive and ``end_time`` exclusive, on ``created_at``."""
        flt = EventFilter(start_time=stored[2].created_at, end_time=stored[5].created_at)
        assert [e.id for e in provider.list(flt)] == [e.id for e in stored[2:5]]
        flt = EventFilter(start_time=stored[6].created_at)
        assert [e.id for e in provider.list(flt)] == [e.id for e in stored[6:]]
        flt = EventFilter(end_time=stored[1].created_at, type_pattern="public.**")
        assert [e.id for e in provider.list(flt)] == [stored[0].id]

    def test_list__naive_times_are_utc(self, provider: BusProvider, stored: list[Event]) -> None:
        """A naive ``start_time``/``end_time`` is taken as UTC, the same on every provider."""
        naive = [e.created_at.astimezone(UTC).replace(tzinfo=None) for e in stored]
        flt = EventFilter(start_time=naive[2], end_time=naive[5])
        assert flt.start_time == stored[2].created_at
        assert [e.id for e in provider.list(flt)] == [e.id for e in stored[2:5]]
        flt = EventFilter(start_time=naive[6])
        assert [e.id for e in provider.list(flt)] == [e.id for e in stored[6:]]

    def test_list__returns_current_status(self, provider: BusProvider, stored: list[Event]) -> None:
        """Listed events carry the status fields written by ``update_status``."""
        by_id = {e.id: e for e in provider.list(EventFilter())}
        assert by_id[stored[1].id].status is EventStatus.COMPLETED
        assert by_id[stored[4].id].error == "boom"
        assert by_id[stored[6].id].processed_at is not None

    # -- update_status, delete ---------------------------------------------------------------

    def test_update_status__processing_sets_processed_at(self, provider: BusProvider) -> None:
        """``processing`` sets ``processed_at`` (now) and leaves ``completed_at`` unset."""
        e = _event()
        provider.store(e)
        before = dt.datetime.now(UTC)
        provider.update_status(e.id, EventStatus.PROCESSING)
        got = provider.get(e.id)
        assert got is not None and got.status is EventStatus.PROCESSING
        assert got.processed_at is not None and got.processed_at >= before - dt.timedelta(seconds=1)
        assert got.completed_at is None

    def test_update_status__completed_sets_both_timestamps(self, provider: BusProvider) -> None:
        """``completed`` sets ``completed_at`` and, when never set, ``processed_at``."""
        e = _event()
        provider.store(e)
        provider.update_status(e.id, EventStatus.COMPLETED)
        got = provider.get(e.id)
        assert got is not None and got.status is EventStatus.COMPLETED
        assert got.completed_at is not None and got.processed_at is not None
        assert got.error == ""

    def test_update_status__keeps_earlier_processed_at(self, provider: BusProvider) -> None:
        """``completed`` after ``processing`` keeps the earlier ``processed_at``."""
        e = _event()
        provider.store(e)
        provider.update_status(e.id, EventStatus.PROCESSING)
        first = provider.get(e.id).processed_at  # type: ignore[union-attr]
        provider.update_status(e.id, EventStatus.COMPLETED)
        got = provider.get(e.id)
        assert got is not None and got.processed_at == first
        assert got.completed_at is not None and got.completed_at >= first  # type: ignore[operator]

    def test_update_status__failed_records_error_and_retry_count(self, provider: BusProvider) -> None:
        """``failed`` records the error text and, when given, the retry count."""
        e = _event()
        provider.store(e)
        provider.update_status(e.id, EventStatus.FAILED, "handler x: boom", retry_count=3)
        got = provider.get(e.id)
        assert got is not None
        assert (got.status, got.error, got.retry_count) == (EventStatus.FAILED,
                                                            "handler x: boom", 3)
        assert got.completed_at is not None
        provider.update_status(e.id, EventStatus.PENDING)
        got = provider.get(e.id)
        assert got is not None and got.retry_count == 3 and got.error == ""

    def test_update_status__unknown_id_is_ignored(self, provider: BusProvider) -> None:
        """Updating an id that is not stored neither raises nor creates anything."""
        provider.update_status("00000000-0000-7000-8000-000000000001", EventStatus.COMPLETED)
        assert provider.get("00000000-0000-7000-8000-000000000001") is None
        assert provider.list(EventFilter()) == []

    def test_update_status__leaves_other_fields(self, provider: BusProvider) -> None:
        """Only status, error, retry count and timestamps change."""
        e = _event(payload={"k": [1, 2]}, user_id=5, metadata={"m": 1})
        provider.store(e)
        provider.update_status(e.id, EventStatus.COMPLETED, retry_count=1)
        got = provider.get(e.id)
        assert got is not None
        assert (got.payload, got.user_id, got.metadata, got.type, got.created_at) == (
            e.payload, e.user_id, e.metadata, e.type, e.created_at)

    def test_delete__removes_the_event(self, provider: BusProvider) -> None:
        """A deleted event is gone from ``get`` and ``list``; deleting again is harmless."""
        keep, gone = _event(), _event()
        provider.store(keep)
        provider.store(gone)
        provider.delete(gone.id)
        assert provider.get(gone.id) is None
        assert [e.id for e in provider.list(EventFilter())] == [keep.id]
        provider.delete(gone.id)
        provider.delete("00000000-0000-7000-8000-000000000002")

    def test_update_status_many__same_as_one_by_one(self, provider: BusProvider) -> None:
        """A batch applies each update like ``update_status``, in order, ignoring unknown
        ids; the status counts follow."""
        done, failed, working, twice = _event(), _event(), _event(), _event()
        for e in (done, failed, working, twice):
            provider.store(e)
        provider.update_status(twice.id, EventStatus.PROCESSING)
        first = provider.get(twice.id).processed_at  # type: ignore[union-attr]
        before = dt.datetime.now(UTC) - dt.timedelta(seconds=1)
        provider.update_status_many([
            StatusUpdate(done.id, EventStatus.COMPLETED),
            StatusUpdate(failed.id, EventStatus.FAILED, "handler x: boom", 3),
            StatusUpdate("00000000-0000-7000-8000-000000000003", EventStatus.COMPLETED),
            StatusUpdate(working.id, EventStatus.PROCESSING),
            StatusUpdate(twice.id, EventStatus.FAILED, "first", 1),
            StatusUpdate(twice.id, EventStatus.COMPLETED, "", 2),
        ])
        provider.update_status_many([])
        got = {e.id: e for e in provider.list(EventFilter())}
        assert set(got) == {done.id, failed.id, working.id, twice.id}
        d, f, w, t = got[done.id], got[failed.id], got[working.id], got[twice.id]
        assert d.status is EventStatus.COMPLETED and d.error == "" and d.retry_count == 0
        assert d.completed_at is not None and d.completed_at >= before
        assert d.processed_at is not None
        assert (f.status, f.error, f.retry_count) == (EventStatus.FAILED, "handler x: boom", 3)
        assert f.completed_at is not None
        assert w.status is EventStatus.PROCESSING and w.processed_at is not None
        assert w.completed_at is None
        assert (t.status, t.error, t.retry_count) == (EventStatus.COMPLETED, "", 2)
        assert t.processed_at == first and t.completed_at is not None
        assert d.payload == done.payload and t.type == twice.type
        stats = provider.stats()
        assert (stats.completed_events, stats.failed_events, stats.processing_events,
                stats.pending_events) == (2, 1, 1, 0)

    def test_update_status_many__a_large_batch(self, provider: BusProvider) -> None:
        """A status batch larger than any internal chunk works."""
        events = [_event("public.big.create", {"i": i}) for i in range(1200)]
        provider.store_and_publish_many(events)
        provider.update_status_many([StatusUpdate(e.id, EventStatus.COMPLETED, "", i % 3)
                                     for i, e in enumerate(events)])
        assert provider.stats().completed_events == 1200
        for i in (0, 499, 500, 1199):
            got = provider.get(events[i].id)
            assert got is not None and got.status is EventStatus.COMPLETED
            assert got.retry_count == i % 3

    def test_store__visible_to_another_instance(self, provider: BusProvider,
                                                peer: BusProvider) -> None:
        """A stored event reaches the backend even when no publish follows (another
        instance sees it soon, without any further call on the storing instance)."""
        e = _event(payload={"lone": True})
        provider.store(e)
        _wait(lambda: peer.get(e.id) is not None, self.delivery_timeout, "the lone store")
        assert peer.get(e.id) == e

    def test_store__visible_to_another_instance_when_it_returns(self, provider: BusProvider,
                                                                 peer: BusProvider) -> None:
        """A lone ``store`` is on the backend when it returns: another instance's ``get``
        right after finds it (no write held back waiting for a publish)."""
        e = _event(payload={"lone": "now"})
        provider.store(e)
        assert peer.get(e.id) == e
        batch = [_event(payload={"i": i}) for i in range(3)]
        provider.store_and_publish_many(batch)
        assert [peer.get(x.id) for x in batch] == batch

    def test_store_and_publish_many__stores_and_delivers(self, provider: BusProvider,
                                                         peer: BusProvider) -> None:
        """The broker's one write: ``get`` right after returns each event (a copy), another
        instance receives each once, finds it stored when it does, in publish order."""
        stream = peer.stream("public.snp.*")
        try:
            one = _event("public.snp.create", {"i": -1})
            provider.store_and_publish_many([one])
            assert provider.get(one.id) == one
            events = [_event("public.snp.update", {"i": i}) for i in range(250)]
            provider.store_and_publish_many(events)
            provider.store_and_publish_many([])
            for e in (events[0], events[99], events[100], events[-1]):
                assert provider.get(e.id) == e
            events[0].payload = {"changed": True}
            assert provider.get(events[0].id).payload == {"i": 0}  # type: ignore[union-attr]
            got = _drain(stream, 251, self.delivery_timeout)
            got += _quiet(stream, self.quiet_period)
            for x in got[::25] + got[-1:]:
                stored = peer.get(x.id)
                assert stored is not None and stored.payload == x.payload
            want = [one.id] + [e.id for e in events]
            if self.ordered_per_publisher:
                assert [x.id for x in got] == want
            else:
                assert Counter(x.id for x in got) == Counter(want)
            assert provider.stats().total_events == 251
        finally:
            stream.close()

    def test_store_and_publish_many__origin_skipped_by_its_streams(self, provider: BusProvider,
                                                                   peer: BusProvider) -> None:
        """Events tagged with an origin are skipped by streams excluding that origin, seen
        by all others, and stored either way."""
        own = peer.stream("*", exclude_origin="broker-a")
        other = peer.stream("*", exclude_origin="broker-b")
        try:
            tagged = [_event("public.origin.create", {"i": i}) for i in range(3)]
            untagged = _event("public.origin.update")
            provider.store_and_publish_many(tagged, origin="broker-a")
            provider.store_and_publish_many([untagged])
            got_other = _drain(other, 4, self.delivery_timeout)
            got_own = _drain(own, 1, self.delivery_timeout) + _quiet(own, self.quiet_period)
            assert sorted(x.id for x in got_other) == sorted(e.id for e in [*tagged, untagged])
            assert [x.id for x in got_own] == [untagged.id]
            assert all(peer.get(e.id) == e for e in tagged)
        finally:
            own.close()
            other.close()

    def test_publish__stored_before_delivered(self, provider: BusProvider, peer: BusProvider) -> None:
        """Store then publish: when another instance receives the event, ``get`` there
        already finds it stored (so its status write-back can never miss the event)."""
        stream = peer.stream("public.order.*")
        try:
            events = [_event("public.order.create", {"i": i}) for i in range(30)]
            for e in events[:10]:
                provider.store(e)
                provider.publish(e)
            provider.store_and_publish_many(events[10:])
            got = _drain(stream, 30, self.delivery_timeout)
            for x in got:
                stored = peer.get(x.id)
                assert stored is not None and stored.id == x.id
            assert sorted(x.id for x in got) == sorted(e.id for e in events)
        finally:
            stream.close()

    # -- fan-out streams ---------------------------------------------------------------------

    def test_stream__sees_only_events_published_after_it_opened(self, provider: BusProvider) -> None:
        """A stream gets what is published after ``stream()`` returned, nothing before."""
        early = _event("public.users.create")
        provider.store(early)
        provider.publish(early)
        stream = provider.stream("*")
        try:
            late = _event("public.users.create")
            provider.store(late)
            provider.publish(late)
            got = _drain(stream, 1, self.delivery_timeout)
            assert [e.id for e in got] == [late.id]
            assert _quiet(stream, self.quiet_period) == []
        finally:
            stream.close()

    def test_stream__each_event_exactly_once(self, provider: BusProvider) -> None:
        """Every published event arrives once: no loss, no duplicates."""
        stream = provider.stream("public.**")
        try:
            events = [_event("public.items.create", {"i": i}) for i in range(50)]
            for e in events:
                provider.store(e)
                provider.publish(e)
            got = _drain(stream, len(events), self.delivery_timeout)
            got += _quiet(stream, self.quiet_period)
            assert Counter(e.id for e in got) == Counter(e.id for e in events)
        finally:
            stream.close()

    def test_stream__in_publish_order(self, provider: BusProvider) -> None:
        """Events from one publisher arrive in the order they were published."""
        self.lacks("ordered_per_publisher", "the backend may reorder events")
        stream = provider.stream("*")
        try:
            events = [_event("public.seq.create", {"i": i}) for i in range(100)]
            for e in events:
                provider.publish(e)
            got = _drain(stream, len(events), self.delivery_timeout)
            assert [e.payload for e in got] == [e.payload for e in events]
        finally:
            stream.close()

    @pytest.mark.parametrize(
        ("pattern", "expected"),
        [
            ("*", ["public.users.create", "public.users.delete", "public.orders.create",
                   "auth.sessions.create", "public.users.create.extra", "ui"]),
            ("public.users.*", ["public.users.create", "public.users.delete"]),
            ("*.*.create", ["public.users.create", "public.orders.create",
                            "auth.sessions.create"]),
            ("public.**", ["public.users.create", "public.users.delete", "public.orders.create",
                           "public.users.create.extra"]),
            ("public.users.create", ["public.users.create"]),
            ("ui", ["ui"]),
            ("nothing.*", []),
        ],
    )
    def test_stream__pattern_selects_types(self, provider: BusProvider, pattern: str,
                                           expected: list[str]) -> None:
        """A stream's pattern selects event types with the rules of ``matches``."""
        types = ["public.users.create", "public.users.delete", "public.orders.create",
                 "auth.sessions.create", "public.users.create.extra", "ui"]
        stream = provider.stream(pattern)
        try:
            for t in types:
                provider.publish(_event(t))
            got = _drain(stream, len(expected), self.delivery_timeout)
            got += _quiet(stream, self.quiet_period)
            assert sorted(e.type for e in got) == sorted(expected)
        finally:
            stream.close()

    def test_stream__two_streams_each_get_every_event(self, provider: BusProvider) -> None:
        """Two open streams on one provider each receive every matching event once."""
        a, b = provider.stream("*"), provider.stream("public.*.create")
        try:
            events = [_event("public.users.create", {"i": i}) for i in range(10)]
            other = _event("auth.sessions.create")
            for e in [*events[:5], other, *events[5:]]:
                provider.publish(e)
            got_a = _drain(a, 11, self.delivery_timeout) + _quiet(a, self.quiet_period)
            got_b = _drain(b, 10, self.delivery_timeout) + _quiet(b, self.quiet_period)
            assert sorted(e.id for e in got_a) == sorted([*(e.id for e in events), other.id])
            assert sorted(e.id for e in got_b) == sorted(e.id for e in events)
        finally:
            a.close()
            b.close()

    def test_stream__receives_from_another_instance(self, provider: BusProvider,
                                                    peer: BusProvider) -> None:
        """A stream on one provider instance gets what another instance publishes."""
        stream = peer.stream("*")
        try:
            e = _event()
            provider.store(e)
            provider.publish(e)
            got = _drain(stream, 1, self.delivery_timeout)
            assert [x.id for x in got] == [e.id]
            assert got[0] == e
        finally:
            stream.close()

    def test_stream__exclude_origin_skips_own_events(self, provider: BusProvider,
                                                     peer: BusProvider) -> None:
        """A stream skips events published with its origin, whichever instance wrote them."""
        own = peer.stream("*", exclude_origin="broker-b")
        try:
            mine, theirs = _event("public.a.create"), _event("public.b.create")
            peer.store_and_publish_many([mine], origin="broker-b")
            provider.store_and_publish_many([theirs], origin="broker-a")
            got = _drain(own, 1, self.delivery_timeout) + _quiet(own, self.quiet_period)
            assert [e.id for e in got] == [theirs.id]
        finally:
            own.close()

    def test_stream__exclude_origin_waits_past_own_events(self, provider: BusProvider) -> None:
        """Skipped events do not end a ``receive`` early: one call waits past them for the
        next event of another origin (``None`` only when the timeout passes)."""
        own = provider.stream("*", exclude_origin="broker-b")
        try:
            mine = [_event("public.a.create") for _ in range(3)]
            theirs = _event("public.b.create")
            provider.store_and_publish_many(mine, origin="broker-b")
            provider.store_and_publish_many([theirs], origin="broker-a")
            got = own.receive(timeout=self.delivery_timeout)
            assert got is not None and got.id == theirs.id
        finally:
            own.close()

    def test_stream__receive_times_out_with_none(self, provider: BusProvider) -> None:
        """``receive(timeout)`` returns ``None`` when nothing arrives in time."""
        stream = provider.stream("*")
        try:
            t0 = time.monotonic()
            assert stream.receive(timeout=0.2) is None
            assert time.monotonic() - t0 < 5
        finally:
            stream.close()

    def test_stream__iterates(self, provider: BusProvider) -> None:
        """A stream is an iterator of events; closing it ends the iteration."""
        stream = provider.stream("*")
        events = [_event() for _ in range(3)]
        for e in events:
            provider.publish(e)
        got = []
        for item in stream:
            got.append(item)
            if len(got) == 3:
                stream.close()
        assert sorted(e.id for e in got) == sorted(e.id for e in events)

    def test_stream__close_wakes_a_blocked_receive(self, provider: BusProvider) -> None:
        """``close()`` from another thread ends a ``receive(None)`` with ``StopIteration``."""
        stream = provider.stream("*")
        outcome: list[str] = []

        def reader() -> None:
            try:
                stream.receive(timeout=None)
                outcome.append("event")
            except StopIteration:
                outcome.append("stopped")

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.2)  # let it block
        t0 = time.monotonic()
        stream.close()
        t.join(5)
        assert not t.is_alive() and outcome == ["stopped"]
        assert time.monotonic() - t0 < 3
        with pytest.raises(StopIteration):
            stream.receive(timeout=0.1)
        stream.close()  # idempotent

    def test_stream__ends_when_provider_closes(self, provider_factory: ProviderFactory) -> None:
        """Closing the provider ends its open streams (``StopIteration``)."""
        p = provider_factory()
        stream = p.stream("*")
        p.close()
        with pytest.raises(StopIteration):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                stream.receive(timeout=0.2)

    # -- groups -----------------------------------------------------------------------------

    def test_group__competing_members_share_the_events(self, provider: BusProvider,
                                                       peer: BusProvider) -> None:
        """Members of one group (on two instances) get each event once between them."""
        self.lacks("supports_groups", "no competing consumers")
        a = provider.group_stream("public.**", "workers", lease=self.lease * 5)
        b = peer.group_stream("public.**", "workers", lease=self.lease * 5)
        try:
            events = [_event("public.jobs.create", {"i": i}) for i in range(40)]
            for e in events:
                provider.store(e)
                provider.publish(e)
            seen: list[tuple[str, str]] = []
            lock = threading.Lock()
            stop = threading.Event()

            def member(name: str, gs: GroupStream) -> None:
                while not stop.is_set():
                    try:
                        d = gs.receive(timeout=0.2)
                    except StopIteration:
                        return
                    if d is not None:
                        with lock:
                            seen.append((name, d.event.id))
                        time.sleep(0.005)  # a little work, so both members take some
                        d.ack()

            threads = [threading.Thread(target=member, args=("a", a)),
                       threading.Thread(target=member, args=("b", b))]
            for t in threads:
                t.start()
            _wait(lambda: len(seen) >= len(events), self.delivery_timeout * 2, "all events")
            time.sleep(self.quiet_period)
            stop.set()
            for t in threads:
                t.join(5)
            assert Counter(eid for _, eid in seen) == Counter(e.id for e in events)
        finally:
            a.close()
            b.close()

    def test_group__distinct_groups_each_get_every_event(self, provider: BusProvider) -> None:
        """Two groups (or one group with two patterns) are independent consumers."""
        self.lacks("supports_groups", "no competing consumers")
        g1 = provider.group_stream("public.**", "emails", lease=self.lease * 5)
        g2 = provider.group_stream("public.**", "audit", lease=self.lease * 5)
        g3 = provider.group_stream("public.users.*", "emails", lease=self.lease * 5)
        try:
            events = [_event("public.users.create", {"i": i}) for i in range(5)]
            for e in events:
                provider.publish(e)
            for gs in (g1, g2, g3):
                got = _drain(gs, 5, self.delivery_timeout)
                for d in got:
                    d.ack()
                assert sorted(d.event.id for d in got) == sorted(e.id for e in events)
        finally:
            for gs in (g1, g2, g3):
                gs.close()

    def test_group__pattern_filters(self, provider: BusProvider) -> None:
        """A group member only gets events matching its pattern."""
        self.lacks("supports_groups", "no competing consumers")
        gs = provider.group_stream("*.*.delete", "cleanup", lease=self.lease * 5)
        try:
            for t in ("public.users.create", "public.users.delete", "auth.sessions.delete",
                      "public.users.delete.extra"):
                provider.publish(_event(t))
            got = _drain(gs, 2, self.delivery_timeout)
            for d in got:
                d.ack()
            got += _quiet(gs, self.quiet_period)
            assert sorted(d.event.type for d in got) == ["auth.sessions.delete",
                                                         "public.users.delete"]
        finally:
            gs.close()

    def test_group__in_publish_order(self, provider: BusProvider) -> None:
        """A single member receives one publisher's events in publish order."""
        self.lacks("supports_groups", "no competing consumers")
        self.lacks("ordered_per_publisher", "the backend may reorder events")
        gs = provider.group_stream("*", "ordered", lease=self.lease * 5)
        try:
            events = [_event("public.seq.create", {"i": i}) for i in range(50)]
            for e in events:
                provider.publish(e)
            got = _drain(gs, len(events), self.delivery_timeout)
            for d in got:
                d.ack()
            assert [d.event.payload for d in got] == [e.payload for e in events]
        finally:
            gs.close()

    def test_group__redelivers_after_lease_expiry(self, provider: BusProvider,
                                                  peer: BusProvider) -> None:
        """An event not acknowledged within its lease is delivered again, to any member."""
        self.lacks("supports_groups", "no competing consumers")
        a = provider.group_stream("public.**", "retry", lease=self.lease)
        b = peer.group_stream("public.**", "retry", lease=self.lease)
        try:
            e = _event()
            provider.publish(e)
            first = _drain(a, 1, self.delivery_timeout) or _drain(b, 1, self.delivery_timeout)
            assert [d.event.id for d in first] == [e.id]
            # Nobody acks: after the lease one of the members gets it again.
            deadline = time.monotonic() + self.lease * 4 + self.delivery_timeout
            again: list[Delivery] = []
            while not again and time.monotonic() < deadline:
                for gs in (b, a):
                    d = gs.receive(timeout=0.1)
                    if d is not None:
                        again.append(d)
                        break
            assert [d.event.id for d in again] == [e.id]
            again[0].ack()
            assert _quiet(a, self.lease * 1.5) + _quiet(b, 0.1) == []
        finally:
            a.close()
            b.close()

    def test_group__renew_keeps_the_lease(self, provider: BusProvider, peer: BusProvider) -> None:
        """A member that renews keeps its delivery past the lease; nobody else gets it."""
        self.lacks("supports_groups", "no competing consumers")
        a = provider.group_stream("public.**", "slow", lease=self.lease)
        b = peer.group_stream("public.**", "slow", lease=self.lease)
        try:
            e = _event()
            provider.publish(e)
            d = None
            deadline = time.monotonic() + self.delivery_timeout
            while d is None and time.monotonic() < deadline:
                d = a.receive(timeout=0.1)
            assert d is not None and d.event.id == e.id
            end = time.monotonic() + self.lease * 3
            stolen = []
            while time.monotonic() < end:
                d.renew()
                got = b.receive(timeout=self.lease / 4)
                if got is not None:
                    stolen.append(got)
            assert stolen == []
            d.ack()
            assert _quiet(b, self.lease * 1.5) == []
        finally:
            a.close()
            b.close()

    def test_group__ack_prevents_redelivery(self, provider: BusProvider) -> None:
        """An acknowledged event is never delivered to the group again."""
        self.lacks("supports_groups", "no competing consumers")
        gs = provider.group_stream("public.**", "acked", lease=self.lease)
        try:
            e = _event()
            provider.publish(e)
            got = _drain(gs, 1, self.delivery_timeout)
            assert [d.event.id for d in got] == [e.id]
            got[0].ack()
            assert _quiet(gs, self.lease * 2) == []
        finally:
            gs.close()

    def test_group__catches_up_on_events_published_while_no_member_was_open(
        self, provider: BusProvider, peer: BusProvider
    ) -> None:
        """A group is durable from its first opening: a later member gets the backlog."""
        self.lacks("supports_groups", "no competing consumers")
        first = provider.group_stream("public.**", "durable", lease=self.lease * 5)
        first.close()
        events = [_event("public.users.create", {"i": i}) for i in range(5)]
        for e in events:
            provider.publish(e)
        later = peer.group_stream("public.**", "durable", lease=self.lease * 5)
        try:
            got = _drain(later, 5, self.delivery_timeout)
            for d in got:
                d.ack()
            assert sorted(d.event.id for d in got) == sorted(e.id for e in events)
        finally:
            later.close()

    def test_group__unacked_delivery_of_a_closed_member_goes_to_another(
        self, provider: BusProvider, peer: BusProvider
    ) -> None:
        """A member that closes without acking: its delivery reaches another member."""
        self.lacks("supports_groups", "no competing consumers")
        a = provider.group_stream("public.**", "handover", lease=self.lease)
        b = peer.group_stream("public.**", "handover", lease=self.lease)
        try:
            e = _event()
            provider.publish(e)
            got = _drain(a, 1, self.delivery_timeout)
            assert [d.event.id for d in got] == [e.id]
            a.close()
            again = _drain(b, 1, self.lease * 4 + self.delivery_timeout)
            assert [d.event.id for d in again] == [e.id]
            again[0].ack()
        finally:
            a.close()
            b.close()

    def test_group__close_wakes_a_blocked_receive(self, provider: BusProvider) -> None:
        """``close()`` from another thread ends a blocked group ``receive``."""
        self.lacks("supports_groups", "no competing consumers")
        gs = provider.group_stream("*", "wake", lease=self.lease)
        outcome: list[str] = []

        def reader() -> None:
            try:
                while True:
                    if gs.receive(timeout=None) is not None:
                        outcome.append("delivery")
                        return
            except StopIteration:
                outcome.append("stopped")

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.2)
        gs.close()
        t.join(5)
        assert not t.is_alive() and outcome == ["stopped"]
        gs.close()

    # -- stats and lifecycle ---------------------------------------------------------------

    def test_stats__counts_by_status(self, provider: BusProvider, stored: list[Event]) -> None:
        """``stats`` counts the stored events by status and names the provider type."""
        stats = provider.stats()
        assert isinstance(stats, ProviderStats)
        assert stats.provider_type
        assert (stats.total_events, stats.pending_events, stats.processing_events,
                stats.completed_events, stats.failed_events) == (8, 5, 1, 1, 1)
        assert isinstance(stats.provider_specific, dict)

    def test_stats__counts_publishing_and_consuming(self, provider: BusProvider) -> None:
        """``events_published``, ``events_consumed`` and ``active_subscribers`` move."""
        before = provider.stats()
        stream = provider.stream("*")
        try:
            assert provider.stats().active_subscribers == before.active_subscribers + 1
            provider.publish(_event())
            assert len(_drain(stream, 1, self.delivery_timeout)) == 1
            after = provider.stats()
            assert after.events_published == before.events_published + 1
            assert after.events_consumed >= before.events_consumed + 1
        finally:
            stream.close()
        assert provider.stats().active_subscribers == before.active_subscribers

    def test_close__is_idempotent(self, provider_factory: ProviderFactory) -> None:
        """``close()`` twice is fine."""
        p = provider_factory()
        p.close()
        p.close()

    def test_close__leaves_no_threads(self, provider_factory: ProviderFactory) -> None:
        """After ``close()``, no thread the provider started is still running."""
        before = set(threading.enumerate())
        p = provider_factory()
        stream = p.stream("*")
        group = p.group_stream("*", "threads", lease=self.lease) if self.supports_groups else None
        p.publish(_event())
        _drain(stream, 1, self.delivery_timeout)
        if group is not None:
            group.close()
        p.close()
        _wait(lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()],
              5, "the provider's threads to end")

    def test_restart__stored_events_survive(self, provider_factory: ProviderFactory) -> None:
        """A new provider object on the same backend still has what was stored."""
        self.lacks("durable_across_restart", "state lives in the provider object")
        p = provider_factory()
        e = _event(payload={"keep": True})
        p.store(e)
        p.update_status(e.id, EventStatus.COMPLETED)
        p.close()
        q = provider_factory()
        got = q.get(e.id)
        assert got is not None and got.payload == {"keep": True}
        assert got.status is EventStatus.COMPLETED

    def test_restart__group_resumes_where_it_was(self, provider_factory: ProviderFactory) -> None:
        """After every provider closed, a new one's group member gets the unconsumed events."""
        self.lacks("durable_across_restart", "state lives in the provider object")
        self.lacks("supports_groups", "no competing consumers")
        p = provider_factory()
        gs = p.group_stream("public.**", "restart", lease=self.lease * 5)
        done = _event("public.a.create")
        p.publish(done)
        got = _drain(gs, 1, self.delivery_timeout)
        assert [d.event.id for d in got] == [done.id]
        got[0].ack()
        gs.close()
        p.close()
        q = provider_factory()
        waiting = _event("public.b.create")
        q.publish(waiting)
        q.close()
        r = provider_factory()
        gs = r.group_stream("public.**", "restart", lease=self.lease * 5)
        try:
            got = _drain(gs, 1, self.delivery_timeout) + _quiet(gs, self.quiet_period)
            assert [d.event.id for d in got] == [waiting.id]
            got[0].ack()
        finally:
            gs.close()

    # -- several brokers on one backend (API.md 3, "Across instances") ----------------------

    @pytest.fixture
    def brokers(self, provider_factory: ProviderFactory) -> Iterator[Callable[[str], Broker]]:
        """Make started brokers, each on its own provider instance of the shared backend."""
        made: list[Broker] = []

        def make(instance_id: str) -> Broker:
            b = Broker(provider=provider_factory(), instance_id=instance_id, worker_count=2)
            b.start()
            made.append(b)
            return b

        yield make
        for b in made:
            b.stop(timeout=5)

    def test_bus__fanout_reaches_every_broker_exactly_once(
        self, brokers: Callable[[str], Broker]
    ) -> None:
        """Every subscribing broker handles every event once, the publisher's own included."""
        a, b, c = brokers("a"), brokers("b"), brokers("c")
        rec = {name: EventRecorder() for name in "abc"}
        for name, broker in zip("abc", (a, b, c), strict=True):
            broker.subscribe("public.**", rec[name])
        events = [_event("public.users.create", {"i": i}) for i in range(20)]
        for e in events[:10]:
            a.publish(e)
        for e in events[10:]:
            b.publish(e)
        ids = Counter(e.id for e in events)
        for name in "abc":
            rec[name].wait_for(20, timeout=self.delivery_timeout * 2)
        time.sleep(self.quiet_period)
        for name in "abc":
            assert Counter(e.id for e in rec[name].events) == ids, name

    def test_bus__no_echo_of_own_events(self, brokers: Callable[[str], Broker]) -> None:
        """A broker handles its own event once (locally), never again from the backend."""
        a, b = brokers("a"), brokers("b")
        rec_a, rec_b = EventRecorder(), EventRecorder()
        a.subscribe("*", rec_a)
        b.subscribe("*", rec_b)
        e = _event("public.users.delete")
        a.publish(e)
        rec_b.wait_for(1, timeout=self.delivery_timeout)
        rec_a.wait_for(1, timeout=self.delivery_timeout)
        time.sleep(self.quiet_period * 2)
        assert [x.id for x in rec_a.events] == [e.id]
        assert [x.id for x in rec_b.events] == [e.id]
        assert rec_b.events[0].instance_id == "a"

    def test_bus__group_handled_once_per_group(self, brokers: Callable[[str], Broker]) -> None:
        """Subscriptions sharing a group across brokers handle each event once in total."""
        self.lacks("supports_groups", "no competing consumers")
        a, b, c = brokers("a"), brokers("b"), brokers("c")
        emails_a, emails_b, audit_c = EventRecorder(), EventRecorder(), EventRecorder()
        a.subscribe("public.**", emails_a, group="emails", lease=self.lease * 5)
        b.subscribe("public.**", emails_b, group="emails", lease=self.lease * 5)
        c.subscribe("public.**", audit_c, group="audit", lease=self.lease * 5)
        events = [_event("public.orders.create", {"i": i}) for i in range(20)]
        for e in events[:10]:
            a.publish(e)
        for e in events[10:]:
            c.publish(e)
        ids = Counter(e.id for e in events)
        _wait(lambda: len(emails_a) + len(emails_b) >= 20, self.delivery_timeout * 2,
              "the emails group")
        audit_c.wait_for(20, timeout=self.delivery_timeout * 2)
        time.sleep(self.quiet_period)
        assert Counter(e.id for e in emails_a.events + emails_b.events) == ids
        assert Counter(e.id for e in audit_c.events) == ids

    def test_bus__handled_status_is_written_back(self, brokers: Callable[[str], Broker],
                                                 provider: BusProvider) -> None:
        """After a remote broker handled an event, the stored event is ``completed``."""
        a, b = brokers("a"), brokers("b")
        rec = EventRecorder()
        b.subscribe("public.**", rec)
        e = _event("public.users.create")
        a.publish(e)
        rec.wait_for(1, timeout=self.delivery_timeout)
        _wait(lambda: (provider.get(e.id) or e).status is EventStatus.COMPLETED,
              self.delivery_timeout, "status completed")
