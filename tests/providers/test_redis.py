"""The conformance suite on ``RedisProvider`` (real Redis at ``redis_url``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sqlalchemy_eventbroker.errors import ProviderError
from sqlalchemy_eventbroker.providers._urls import redact_url
from sqlalchemy_eventbroker.providers.redis import RedisProvider

from .conformance import ProviderConformance, ProviderFactory


class TestRedisProvider(ProviderConformance):
    #: Stored events and groups live in Redis, not in the provider object.
    durable_across_restart = True

    @pytest.fixture
    def provider_factory(self, redis_url: str, unique_name: str) -> Iterator[ProviderFactory]:
        made: list[RedisProvider] = []

        def make() -> RedisProvider:
            p = RedisProvider(redis_url, stream_name=f"test:{unique_name}", block=0.5)
            made.append(p)
            return p

        yield make
        cleaner = RedisProvider(redis_url, stream_name=f"test:{unique_name}")
        cleaner.drop()
        cleaner.close()
        for p in made:
            p.close()


def test_unreachable_redis__provider_error_names_the_address() -> None:
    """Construction against a closed port raises ``ProviderError`` with the URL."""
    with pytest.raises(ProviderError, match=r"redis at redis://127\.0\.0\.1:1/0"):
        RedisProvider("redis://127.0.0.1:1/0", connect_timeout=1)


def test_password_is_not_shown() -> None:
    """The password of the URL never appears in an error message."""
    with pytest.raises(ProviderError) as info:
        RedisProvider("redis://user:s3cret@127.0.0.1:1/0", connect_timeout=1)
    assert "s3cret" not in str(info.value) and "127.0.0.1:1" in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://:s3cret@h/0", "redis://:***@h/0"),
        ("rediss://u:p@ss@h/0", "rediss://u:***@h/0"),
        ("nats://s3cret@h:4222", "nats://***@h:4222"),
        ("u:s3cret@h:4222", "u:***@h:4222"),
        ("nats://a:s3cret@h1:4222,nats://b:s3cret@h2:4222",
         "nats://a:***@h1:4222,nats://b:***@h2:4222"),
        ("postgresql://h/db?password=s3cret&sslpassword=s3cret&x=1",
         "postgresql://h/db?password=***&sslpassword=***&x=1"),
        ("redis://h:6379/0?x=a@b", "redis://h:6379/0?x=a@b"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redact_url__masks_every_secret(url: str, shown: str) -> None:
    """Passwords, lone tokens and password query values never reach a message or ``repr``."""
    assert redact_url(url) == shown


def test_repr__hides_the_password(redis_url: str, unique_name: str) -> None:
    """``repr`` names the server and stream, with the password masked."""
    url = redis_url.replace("redis://", "redis://:s3cret@", 1)  # the test server ignores it
    with RedisProvider(url, stream_name=f"test:{unique_name}", connect_timeout=1) as p:
        assert "s3cret" not in repr(p) and ":***@" in repr(p) and unique_name in repr(p)


def test_max_events__evicts_the_oldest(redis_url: str, unique_name: str) -> None:
    """Past ``max_events`` the oldest stored events go, counters stay exact."""
    from sqlalchemy_eventbroker import EventFilter, new_event

    with RedisProvider(redis_url, stream_name=f"test:{unique_name}", max_events=10) as p:
        try:
            events = [new_event("database", "public.t.create") for _ in range(15)]
            p.store_and_publish_many(events)
            assert [e.id for e in p.list(EventFilter())] == [e.id for e in events[5:]]
            assert p.get(events[0].id) is None
            assert p.stats().total_events == p.stats().pending_events == 10
        finally:
            p.drop()


def test_maxlen__trims_the_stream_approximately(redis_url: str, unique_name: str) -> None:
    """``maxlen`` keeps the stream near its cap (Redis trims whole nodes: approximately)."""
    from sqlalchemy_eventbroker import new_event

    with RedisProvider(redis_url, stream_name=f"test:{unique_name}", maxlen=100) as p:
        try:
            p.store_and_publish_many([new_event("database", "public.t.create")
                                      for _ in range(1000)])
            length = p.stats().provider_specific["stream_length"]
            assert 100 <= length < 300  # type: ignore[operator]
        finally:
            p.drop()


def test_close__leaves_no_threads(redis_url: str, unique_name: str) -> None:
    """``store`` needs no background thread; ``close()`` stops the fan-out reader."""
    import threading

    from sqlalchemy_eventbroker import new_event

    name = f"test:{unique_name}"
    before = set(threading.enumerate())
    p = RedisProvider(redis_url, stream_name=name, block=0.5)
    try:
        e = new_event("database", "public.t.create")
        p.store(e)
        assert set(threading.enumerate()) - before == set()  # nothing deferred, no flusher
        s = p.stream("*")
        p.store_and_publish_many([new_event("database", "public.t.update")])
        assert s.receive(timeout=5) is not None
        p.drop()
    finally:
        p.close()
    assert [t.name for t in threading.enumerate() if name in t.name] == []


def test_corrupt_stored_entry__skipped_and_logged_by_list_and_get(
        redis_url: str, unique_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A stored hash that is not valid JSON, or holds a malformed field, is skipped by
    ``list()`` and read as absent by ``get()``, each logged with its id; the other events are
    listed as before (issue 11, row 13)."""
    import logging

    import redis

    from sqlalchemy_eventbroker import EventFilter, EventSource, new_event

    stream = f"test:{unique_name}"
    with RedisProvider(redis_url, stream_name=stream) as p:
        try:
            good, broken, wrong = (new_event(EventSource.SYSTEM, "a.b.c", {"i": i})
                                   for i in range(3))
            for e in (good, broken, wrong):
                p.store(e)
            raw = redis.Redis.from_url(redis_url, decode_responses=True)
            raw.hset(f"{stream}:ev:{broken.id}", "json", "{not json")
            raw.hset(f"{stream}:ev:{wrong.id}", "json",
                     wrong.to_json().replace('"type":"a.b.c"', '"type":5'))
            raw.close()
            with caplog.at_level(logging.ERROR, logger="sqlalchemy_eventbroker.providers.redis"):
                assert [e.id for e in p.list(EventFilter())] == [good.id]
                assert p.get(broken.id) is None and p.get(wrong.id) is None
                assert p.get(good.id) is not None
            logged = caplog.text
            assert broken.id in logged and wrong.id in logged and "unreadable" in logged
        finally:
            p.drop()


def test_url_secrets__query_password_masked(redis_url: str) -> None:
    """``?password=`` in a Redis URL is masked in the ``ProviderError`` (issue 11, row 4)."""
    with pytest.raises(ProviderError) as info:
        RedisProvider("redis://127.0.0.1:1/0?password=S3cr3tR", connect_timeout=1)
    assert "S3cr3tR" not in str(info.value) and "password=***" in str(info.value)


def test_hash_of_the_earlier_layout__reads_as_before(redis_url: str, unique_name: str) -> None:
    """A hash written by the earlier layout (every status field, ``""`` for unset) and a
    ``pending`` counter it left behind read as before: fields from the hash, stats exact."""
    import redis

    from sqlalchemy_eventbroker import EventFilter, EventStatus, new_event

    stream = f"test:{unique_name}"
    with RedisProvider(redis_url, stream_name=stream) as p:
        try:
            e = new_event("database", "public.t.create", {"i": 1})
            raw = redis.Redis.from_url(redis_url, decode_responses=True)
            raw.hset(f"{stream}:ev:{e.id}", mapping={
                "json": e.to_json(), "status": "failed", "retry_count": "2",
                "error": "boom", "processed_at": "2026-01-01T00:00:00+00:00",
                "completed_at": ""})
            raw.zadd(f"{stream}:index", {e.id: 1})
            raw.hset(f"{stream}:counts", mapping={"failed": 1, "pending": 7})
            raw.close()
            got = p.get(e.id)
            assert got is not None
            assert (got.status, got.retry_count, got.error) == (EventStatus.FAILED, 2, "boom")
            assert got.processed_at is not None and got.completed_at is None
            assert [x.id for x in p.list(EventFilter(status=EventStatus.FAILED))] == [e.id]
            st = p.stats()
            assert (st.total_events, st.failed_events, st.pending_events) == (1, 1, 0)
        finally:
            p.drop()


def test_store_again__replaces_the_event_and_keeps_counts_exact(
        redis_url: str, unique_name: str) -> None:
    """Storing an id a second time replaces the stored event (status fields written by
    ``update_status`` included) and moves it between the counters."""
    from sqlalchemy_eventbroker import EventStatus, new_event

    with RedisProvider(redis_url, stream_name=f"test:{unique_name}") as p:
        try:
            e = new_event("database", "public.t.create")
            p.store(e)
            p.update_status(e.id, EventStatus.FAILED, "boom", retry_count=4)
            assert p.stats().failed_events == 1
            again = e.clone()
            again.status, again.error, again.retry_count = EventStatus.PENDING, "", 0
            p.store_and_publish_many([again, new_event("database", "public.t.create")])
            got = p.get(e.id)
            assert got is not None
            assert (got.status, got.error, got.retry_count) == (EventStatus.PENDING, "", 0)
            assert got.completed_at is None
            st = p.stats()
            assert (st.total_events, st.pending_events, st.failed_events) == (2, 2, 0)
            p.update_status(e.id, EventStatus.COMPLETED)
            p.delete(e.id)
            st = p.stats()
            assert (st.total_events, st.pending_events, st.completed_events) == (1, 1, 0)
        finally:
            p.drop()


def test_any_id__survives_the_packed_script_arguments(redis_url: str, unique_name: str) -> None:
    """The scripts pack score, status, timestamps and id into one argument, the id last: an
    id holding commas, a newline or non-ASCII text, and an error text with commas, are
    stored, updated, listed and deleted intact."""
    import datetime as dt

    from sqlalchemy_eventbroker import EventFilter, EventStatus, new_event

    with RedisProvider(redis_url, stream_name=f"test:{unique_name}") as p:
        try:
            e = new_event("database", "public.t.create", {"i": 1})
            e.id = "x,1,pending,,2026-01-01T00:00:00+00:00,ü\nz"
            e.status = EventStatus.PROCESSING
            e.processed_at = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
            s = p.stream("public.**")
            p.store_and_publish_many([e])
            assert (got := s.receive(timeout=5)) is not None and got.id == e.id
            stored = p.get(e.id)
            assert stored is not None and stored.processed_at == e.processed_at
            p.update_status(e.id, EventStatus.FAILED, "a, b, c", retry_count=12)
            stored = p.get(e.id)
            assert stored is not None
            assert (stored.status, stored.error, stored.retry_count) == (
                EventStatus.FAILED, "a, b, c", 12)
            assert stored.processed_at == e.processed_at and stored.completed_at is not None
            assert [x.id for x in p.list(EventFilter())] == [e.id]
            assert p.stats().failed_events == 1
            p.delete(e.id)
            assert p.get(e.id) is None and p.stats().total_events == 0
        finally:
            p.drop()


def test_unknown_status__refused_before_anything_is_written(
        redis_url: str, unique_name: str) -> None:
    """An event whose status is not an ``EventStatus`` fails the whole batch up front with
    ``EventValidationError`` naming it; nothing of the batch is stored or published."""
    from sqlalchemy_eventbroker import EventFilter, new_event
    from sqlalchemy_eventbroker.errors import EventValidationError

    with RedisProvider(redis_url, stream_name=f"test:{unique_name}") as p:
        try:
            good, bad = (new_event("database", "public.t.create") for _ in range(2))
            bad.status = "Done"  # type: ignore[assignment]
            with pytest.raises(EventValidationError, match=bad.id):
                p.store_and_publish_many([good, bad])
            assert p.list(EventFilter()) == []
            assert p.stats().provider_specific["stream_length"] == 0
        finally:
            p.drop()


def test_unreadable_stream_entry__skipped_and_logged_by_the_fanout_reader(
        redis_url: str, unique_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """An entry of the stream that is not an event (written by another program) is logged
    with its entry id and skipped; the entries around it, in the same read, are delivered."""
    import logging

    import redis

    from sqlalchemy_eventbroker import new_event

    stream = f"test:{unique_name}"
    with RedisProvider(redis_url, stream_name=stream, block=0.5) as p:
        try:
            s = p.stream("public.**")
            before, after = (new_event("database", "public.t.create") for _ in range(2))
            raw = redis.Redis.from_url(redis_url, decode_responses=True)
            pipe = raw.pipeline(transaction=True)  # one read sees all three
            pipe.xadd(stream, {"t": "public.t.create", "e": before.to_json()})
            pipe.xadd(stream, {"t": "public.t.create", "e": "{not json"})
            pipe.xadd(stream, {"t": "public.t.create", "e": after.to_json()})
            bad_id = pipe.execute()[1]
            raw.close()
            with caplog.at_level(logging.ERROR, logger="sqlalchemy_eventbroker.providers.redis"):
                got = [s.receive(timeout=5), s.receive(timeout=5)]
            assert [e.id if e else None for e in got] == [before.id, after.id]
            assert bad_id in caplog.text and "unreadable entry" in caplog.text
        finally:
            p.drop()
