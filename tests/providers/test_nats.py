"""The conformance suite on ``NatsProvider`` (real nats-server with JetStream at ``nats_url``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sqlalchemy_eventbroker.errors import ProviderError
from sqlalchemy_eventbroker.providers.nats import NatsProvider, subject_filter

from .conformance import ProviderConformance, ProviderFactory


class TestNatsProvider(ProviderConformance):
    #: The stream, the KV bucket and the durable consumers live in the server.
    durable_across_restart = True

    @pytest.fixture
    def provider_factory(self, nats_url: str, unique_name: str) -> Iterator[ProviderFactory]:
        made: list[NatsProvider] = []
        name = f"T{unique_name}"

        def make() -> NatsProvider:
            p = NatsProvider(nats_url, stream_name=name, storage="memory", block=0.5)
            made.append(p)
            return p

        yield make
        cleaner = NatsProvider(nats_url, stream_name=name, storage="memory")
        cleaner.drop()
        cleaner.close()
        for p in made:
            p.close()


@pytest.mark.parametrize(
    ("pattern", "subject"),
    [
        ("*", "P.>"),
        ("public.users.*", "P.public.users.*"),
        ("*.*.create", "P.*.*.create"),
        ("public.**", "P.public.>"),
        ("public.users.create", "P.public.users.create"),
    ],
)
def test_subject_filter__maps_patterns(pattern: str, subject: str) -> None:
    """Patterns become JetStream subject filters, so the server does the filtering."""
    assert subject_filter("P", pattern) == subject


def test_driver_error__names_the_class_of_a_silent_error() -> None:
    """A driver error with an empty message (several nats-py ones) is named by its class."""
    from sqlalchemy_eventbroker.providers._remote import driver_error

    assert str(driver_error("nats", "nats://h:4222", TimeoutError())) == \
        "nats at nats://h:4222: TimeoutError"
    assert str(driver_error("nats", "nats://h:4222", OSError("refused"))) == \
        "nats at nats://h:4222: refused"


def test_unreachable_nats__provider_error_names_the_address() -> None:
    """Construction against a closed port raises ``ProviderError`` with the URL, quickly."""
    with pytest.raises(ProviderError, match=r"nats at nats://127\.0\.0\.1:1"):
        NatsProvider("nats://127.0.0.1:1", connect_timeout=1)


def test_invalid_subject_type__provider_error(nats_url: str, unique_name: str) -> None:
    """An event type that is not a valid subject is refused with a clear error."""
    from sqlalchemy_eventbroker import new_event

    with NatsProvider(nats_url, stream_name=f"T{unique_name}", storage="memory") as p:
        try:
            with pytest.raises(ProviderError, match="not a valid NATS subject"):
                p.publish(new_event("system", "user signed up"))
        finally:
            p.drop()


def test_two_stream_names__never_overlap(nats_url: str, unique_name: str) -> None:
    """Providers with different stream names on one server do not see each other's events."""
    from sqlalchemy_eventbroker import new_event

    with NatsProvider(nats_url, stream_name=f"A{unique_name}", storage="memory") as a, \
            NatsProvider(nats_url, stream_name=f"B{unique_name}", storage="memory") as b:
        try:
            sa, sb = a.stream("*"), b.stream("*")
            a.publish(new_event("system", "x.y.z"))
            assert sa.receive(timeout=5) is not None
            assert sb.receive(timeout=0.5) is None
        finally:
            a.drop()
            b.drop()


def test_close__leaves_no_threads_or_connections(nats_url: str, unique_name: str) -> None:
    """After status writes (which open the second connection) and a stream, ``close()``
    stops both loop threads and closes both connections."""
    import threading

    from sqlalchemy_eventbroker import EventStatus, new_event

    name = f"T{unique_name}"
    p = NatsProvider(nats_url, stream_name=name, storage="memory")
    try:
        s = p.stream("*")
        e = new_event("system", "x.y.z")
        p.store_and_publish_many([e])
        assert s.receive(timeout=5) is not None
        p.update_status(e.id, EventStatus.COMPLETED)
        assert p.get(e.id).status is EventStatus.COMPLETED  # type: ignore[union-attr]
        conns = [p._nc, p._status_nc]
        assert all(c is not None and c.is_connected for c in conns)
        p.drop()
    finally:
        p.close()
    assert all(c.is_closed for c in conns)
    assert [t.name for t in threading.enumerate() if name in t.name] == []
    with pytest.raises(ProviderError, match="closed"):
        p.update_status(e.id, EventStatus.FAILED)


def test_corrupt_stored_entry__skipped_and_logged_by_list_and_get(
        nats_url: str, unique_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A stream message that is not a readable event is skipped by ``list()`` and read as
    absent by ``get()``, logged with its id; an unreadable status entry is skipped, logged,
    and the event read without it (issue 11, row 13)."""
    import asyncio
    import logging

    import nats as nats_client

    from sqlalchemy_eventbroker import EventFilter, EventSource, EventStatus, new_event
    from sqlalchemy_eventbroker.providers.nats._store import ID_HEADER

    with NatsProvider(nats_url, stream_name=f"T{unique_name}", storage="memory") as p:
        try:
            good, broken = (new_event(EventSource.SYSTEM, "a.b.c", {"i": i}) for i in range(2))
            p.store(good)
            p.store(broken)
            p.update_status(good.id, EventStatus.COMPLETED)

            async def corrupt() -> None:
                nc = await nats_client.connect(nats_url)
                js = nc.jetstream()
                await js.publish(f"{p.stored_prefix}.a.b.c", b'{"id": [], "type": 1}',
                                 headers={ID_HEADER: broken.id})
                kv = await js.key_value(p.bucket)
                await kv.put(good.id, b"not json")
                await nc.close()

            asyncio.run(corrupt())
            with caplog.at_level(logging.ERROR, logger="sqlalchemy_eventbroker.providers.nats"):
                listed = p.list(EventFilter())
                assert [e.id for e in listed] == [good.id]
                assert listed[0].status is EventStatus.COMPLETED
                assert p.get(broken.id) is None
                assert p.get(good.id).status is EventStatus.COMPLETED  # type: ignore[union-attr]
            assert broken.id in caplog.text and "unreadable" in caplog.text
            assert f"unreadable status entry for event {good.id}" in caplog.text
        finally:
            p.drop()


@pytest.mark.parametrize("form", ["nats://{s}@{hp}", "u:{s}@{hp}", "nats://app:p@ss{s}@{hp}"])
def test_url_secrets__masked_in_errors_and_reprs(nats_url: str, unique_name: str,
                                                 form: str) -> None:
    """A NATS token, a scheme-less ``u:pw@host`` and a password holding '@' never appear in a
    ``ProviderError``, ``repr(provider)`` or ``repr(Broker)`` (issue 11, row 3)."""
    from urllib.parse import urlsplit

    from sqlalchemy_eventbroker import Broker

    secret = "S3cr3tN"
    with pytest.raises(ProviderError) as info:
        NatsProvider(form.format(s=secret, hp="127.0.0.1:1"), connect_timeout=1)
    assert secret not in str(info.value) and "127.0.0.1:1" in str(info.value)
    if "p@ss" in form:
        return  # the server has no such user; the error path above is what matters
    hp = urlsplit(nats_url).netloc.rpartition("@")[2]
    p = NatsProvider(form.format(s=secret, hp=hp), stream_name=f"T{unique_name}",
                     storage="memory")
    try:
        for shown in (repr(p), repr(Broker(p, close_provider=False))):
            assert secret not in shown and "***@" in shown, shown
    finally:
        p.drop()
        p.close()


def test_bucket_names__injective(nats_url: str, unique_name: str) -> None:
    """Streams ``X$Y`` and ``X_Y`` get different key-value buckets, so one's get, list, stats
    and delete never see the other's events (issue 11, row 6); an ordinary name keeps
    ``<name>_store``."""
    from sqlalchemy_eventbroker import EventFilter, EventSource, new_event
    from sqlalchemy_eventbroker.providers.nats._names import bucket_name

    assert bucket_name("EVENTBROKER_EVENTS") == "EVENTBROKER_EVENTS_store"
    assert len({bucket_name(n) for n in ("X$Y", "X_Y", "X#Y", "X%Y")}) == 4
    dollar = NatsProvider(nats_url, stream_name=f"T{unique_name}$Y", storage="memory")
    under = NatsProvider(nats_url, stream_name=f"T{unique_name}_Y", storage="memory")
    try:
        assert dollar.bucket != under.bucket
        e = new_event(EventSource.SYSTEM, "a.b.c", {"n": 1})
        dollar.store(e)
        assert under.get(e.id) is None and under.list(EventFilter()) == []
        assert under.stats().total_events == 0
        under.delete(e.id)
        assert dollar.get(e.id) is not None
    finally:
        for p in (dollar, under):
            p.drop()
            p.close()


@pytest.mark.parametrize("what", ["long-type", "non-ascii-type", "big-payload"])
def test_limits__refused_before_sending_connection_stays_usable(
        nats_url: str, unique_name: str, what: str) -> None:
    """A type too long for a subject, or an event over the server's max_payload, is a
    ProviderError before anything is sent; the connection stays usable for later calls,
    drop() included (issue 11, row 1)."""
    from sqlalchemy_eventbroker import EventFilter, EventSource, new_event

    p = NatsProvider(nats_url, stream_name=f"T{unique_name}", storage="memory",
                     request_timeout=2)
    try:
        stream = p.stream("*")
        if what == "long-type":
            bad = new_event(EventSource.SYSTEM, "a." + "t" * 5000)
            match = "subject"
        elif what == "non-ascii-type":
            bad = new_event(EventSource.SYSTEM, "a." + "é" * 2000)
            match = "subject"
        else:
            bad = new_event(EventSource.SYSTEM, "a.b.c", {"x": "y" * 2_000_000})
            match = "max_payload"
        with pytest.raises(ProviderError, match=match) as info:
            p.publish(bad)
        assert bad.id in str(info.value)
        if what == "big-payload":
            with pytest.raises(ProviderError, match=match):
                p.store(bad)
        good = new_event(EventSource.SYSTEM, "a.b.c", {"n": 1})
        p.publish(good)
        assert p.get(good.id) is not None and p.get(bad.id) is None
        assert stream.receive(timeout=5) is not None
        assert [e.id for e in p.list(EventFilter())] == [good.id]
        stream.close()
    finally:
        p.drop()
        p.close()


def _counts(p: NatsProvider) -> tuple[int, int]:
    """(stream messages, status entries) on the server now."""
    specific = p.stats().provider_specific
    return int(specific["stream_messages"]), int(specific["status_messages"])  # type: ignore[arg-type]


def test_one_message_per_event__publish_and_status(nats_url: str, unique_name: str) -> None:
    """Publishing N events sends N stream messages and nothing else (the message is the stored
    copy); each status change adds one status entry, without rewriting the event."""
    from sqlalchemy_eventbroker import EventFilter, EventSource, EventStatus, new_event
    from sqlalchemy_eventbroker.providers.base import StatusUpdate

    with NatsProvider(nats_url, stream_name=f"T{unique_name}", storage="memory") as p:
        try:
            events = [new_event(EventSource.SYSTEM, "a.b.c", {"i": i}) for i in range(250)]
            p.store_and_publish_many(events)
            assert _counts(p) == (250, 0)
            p.update_status_many([StatusUpdate(e.id, EventStatus.COMPLETED, "", 0)
                                  for e in events])
            assert _counts(p) == (250, 250)
            p.update_status(events[0].id, EventStatus.FAILED, "boom", retry_count=2)
            assert _counts(p) == (250, 251)
            listed = p.list(EventFilter())
            assert [e.id for e in listed] == [e.id for e in events]
            assert (listed[0].status, listed[0].error, listed[0].retry_count) == (
                EventStatus.FAILED, "boom", 2)
            assert all(e.status is EventStatus.COMPLETED for e in listed[1:])
        finally:
            p.drop()


def test_store__stored_only_never_reaches_subscribers(nats_url: str, unique_name: str) -> None:
    """``store()`` stores without publishing: a fan-out stream, a group and a raw subscriber
    of ``<prefix>.>`` never see the event, while ``get`` and ``list`` do."""
    import asyncio

    import nats as nats_client

    from sqlalchemy_eventbroker import EventFilter, EventSource, new_event

    name = f"T{unique_name}"
    with NatsProvider(nats_url, stream_name=name, storage="memory") as p:
        try:
            stream = p.stream("*")
            group = p.group_stream("*", "g", lease=5)
            stored, published = (new_event(EventSource.SYSTEM, "a.b.c", {"i": i})
                                 for i in range(2))
            p.store(stored)
            p.publish(published)

            async def raw_subjects() -> list[str]:
                nc = await nats_client.connect(nats_url)
                sub = await nc.jetstream().subscribe(f"{name}.>", stream=name,
                                                     ordered_consumer=True,
                                                     deliver_policy=None)
                subjects = []
                try:
                    while True:
                        msg = await sub.next_msg(timeout=1)
                        subjects.append(msg.subject)
                except nats_client.errors.TimeoutError:
                    return subjects
                finally:
                    await nc.close()

            got = stream.receive(timeout=5)
            assert got is not None and got.id == published.id
            delivery = group.receive(timeout=5)
            assert delivery is not None and delivery.event.id == published.id
            delivery.ack()
            assert stream.receive(timeout=0.5) is None
            assert group.receive(timeout=0.5) is None
            assert asyncio.run(raw_subjects()) == [f"{name}.a.b.c"]
            assert p.get(stored.id) == stored
            assert {e.id for e in p.list(EventFilter())} == {stored.id, published.id}
            stream.close()
            group.close()
        finally:
            p.drop()


def test_store_again__replaces_event_and_status(nats_url: str, unique_name: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Storing an id again replaces the event and resets its status (status entries older
    than the latest copy are not applied); ``delete`` removes every copy and the statuses."""
    import datetime as dt

    from sqlalchemy_eventbroker import EventFilter, EventSource, EventStatus, new_event
    from sqlalchemy_eventbroker.providers.nats import _store

    # One server stamps both streams here: no allowance for clock differences needed (the
    # default second would make the test wait a second between the status and the new copy).
    monkeypatch.setattr(_store, "_EARLIER_COPY", dt.timedelta(0))

    with NatsProvider(nats_url, stream_name=f"T{unique_name}", storage="memory") as p:
        try:
            e = new_event(EventSource.SYSTEM, "a.b.c", {"v": 1})
            p.publish(e)
            p.update_status(e.id, EventStatus.FAILED, "boom", retry_count=3)
            assert p.get(e.id).status is EventStatus.FAILED  # type: ignore[union-attr]
            e.payload = {"v": 2}
            p.publish(e)
            got = p.get(e.id)
            assert got is not None and got.payload == {"v": 2}
            assert (got.status, got.error, got.retry_count) == (EventStatus.PENDING, "", 0)
            assert [x.payload for x in p.list(EventFilter())] == [{"v": 2}]
            p.update_status(e.id, EventStatus.COMPLETED)
            assert p.get(e.id).status is EventStatus.COMPLETED  # type: ignore[union-attr]
            p.delete(e.id)
            assert p.get(e.id) is None and p.list(EventFilter()) == []
            assert _counts(p)[0] == 0
        finally:
            p.drop()


def test_stream_of_an_earlier_version__gets_the_stored_subjects(
        nats_url: str, unique_name: str) -> None:
    """A stream created by an earlier version (only ``<prefix>.>``) is given the stored-only
    subjects on connect, and works."""
    import asyncio

    import nats as nats_client
    from nats.js import api

    from sqlalchemy_eventbroker import EventSource, new_event

    name = f"T{unique_name}"

    async def old_stream() -> None:
        nc = await nats_client.connect(nats_url)
        await nc.jetstream().add_stream(api.StreamConfig(
            name=name, subjects=[f"{name}.>"], storage=api.StorageType.MEMORY))
        await nc.close()

    asyncio.run(old_stream())
    with NatsProvider(nats_url, stream_name=name, storage="memory") as p:
        try:
            e = new_event(EventSource.SYSTEM, "a.b.c")
            p.store(e)
            assert p.get(e.id) == e
        finally:
            p.drop()


def test_id_time__uuid7_only() -> None:
    """The read start of ``get`` comes from a UUIDv7 id's time; other ids have none."""
    import datetime as dt

    from sqlalchemy_eventbroker import EventSource, new_event
    from sqlalchemy_eventbroker.providers.nats._store import id_time

    e = new_event(EventSource.SYSTEM, "a.b.c")
    made = id_time(e.id)
    assert made is not None and abs(made - e.created_at) < dt.timedelta(seconds=1)
    assert id_time("00000000-0000-7000-8000-000000000000") is None
    assert id_time("6f1c4a3e-8a2b-4c1d-9e0f-123456789abc") is None  # UUIDv4
    assert id_time("not-an-id") is None
