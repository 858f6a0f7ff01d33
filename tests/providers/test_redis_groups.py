"""Redis consumer groups: dead members' consumers are pruned, never one holding entries."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis

from sqlalchemy_eventbroker import new_event
from sqlalchemy_eventbroker.providers.redis import RedisProvider
from sqlalchemy_eventbroker.providers.redis._group import RedisGroupStream

LEASE = 0.3


@pytest.fixture
def provider(redis_url: str, unique_name: str) -> Iterator[RedisProvider]:
    p = RedisProvider(redis_url, stream_name=f"test:{unique_name}", block=0.2)
    try:
        yield p
    finally:
        p.drop()
        p.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield r
    finally:
        r.close()


def _consumers(raw: redis.Redis, stream: RedisGroupStream) -> dict[str, int]:
    """Consumer name -> pending entries, as Redis reports them."""
    info = raw.xinfo_consumers(stream._p.stream_name, stream.name)
    return {c["name"]: int(c["pending"]) for c in info}


def _poll(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def _dead_member_reads(raw: redis.Redis, stream: RedisGroupStream, n: int) -> str:
    """A member that reads ``n`` entries and is then killed (never acks, never closes)."""
    dead = "deadhost:1:deadbeef"
    got = raw.xreadgroup(stream.name, dead, {stream._p.stream_name: ">"}, count=n)
    assert sum(len(entries) for _, entries in got) == n
    return dead


def test_prune__dead_consumer_deleted_after_its_entries_were_reclaimed(
    provider: RedisProvider, raw: redis.Redis
) -> None:
    """A killed member's entries go to a live member after the lease; its consumer is then
    deleted from the group, and the live member's entries are untouched."""
    member = provider.group_stream("job.*", "workers", lease=LEASE)
    assert isinstance(member, RedisGroupStream)
    member.prune_idle = 1.0  # short for the test (default: 10 leases, >= 10 reads)
    try:
        events = [new_event("internal", "job.run", {"n": i}) for i in range(3)]
        provider.store_and_publish_many(events)
        dead = _dead_member_reads(raw, member, 3)
        assert _consumers(raw, member) == {dead: 3}

        handed: list[str] = []
        deadline = time.monotonic() + 10
        while len(handed) < 3 and time.monotonic() < deadline:
            for d in member.receive_many(10, timeout=0.2):
                handed.append(d.event.id)
                d.ack()
        assert sorted(handed) == sorted(e.id for e in events)  # reclaimed after the lease
        # The member prunes the dead consumer by itself while it keeps receiving.

        def pruned() -> bool:
            assert member.receive_many(10, timeout=0.05) == []
            return dead not in _consumers(raw, member)

        assert _poll(pruned), _consumers(raw, member)
        assert _consumers(raw, member) == {member.consumer: 0}
    finally:
        member.close()


def test_prune__idle_consumer_with_pending_entries_is_kept(
    provider: RedisProvider, raw: redis.Redis
) -> None:
    """A consumer still holding entries is never deleted, however long it was idle (that
    would drop its entries for good); it is pruned once they were reclaimed."""
    member = provider.group_stream("job.*", "workers", lease=60.0)  # nothing reclaimed
    assert isinstance(member, RedisGroupStream)
    member.prune_idle = 0.2
    try:
        provider.store_and_publish_many([new_event("internal", "job.run", {"n": 1})])
        dead = _dead_member_reads(raw, member, 1)
        # Let the dead consumer's idle time pass prune_idle (a time threshold under test,
        # not synchronisation).
        time.sleep(0.3)
        assert member.prune() == []
        assert _consumers(raw, member) == {dead: 1}
        member.lease = 0.1  # now its entry may be reclaimed
        member._claim_every = 0.05
        got: list[str] = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            got = [d.event.id for d in member.receive_many(10, timeout=0.2)]
        assert len(got) == 1
        member.prune_idle = 0.0
        assert member.prune() == [dead]
        assert _consumers(raw, member) == {member.consumer: 1}
    finally:
        member.close()


def test_prune__live_members_are_not_pruned_by_default(
    provider: RedisProvider, raw: redis.Redis
) -> None:
    """With the default threshold, two live members that read and ack keep their consumers."""
    a = provider.group_stream("job.*", "workers", lease=LEASE)
    b = provider.group_stream("job.*", "workers", lease=LEASE)
    assert isinstance(a, RedisGroupStream) and isinstance(b, RedisGroupStream)
    try:
        assert a.prune_idle >= 10 * LEASE and a.prune_idle >= 10 * provider.block
        provider.store_and_publish_many([new_event("internal", "job.run", {"n": i})
                                         for i in range(4)])
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 4 and time.monotonic() < deadline:
            for s in (a, b):
                for d in s.receive_many(2, timeout=0.1):
                    got.append(d)
                    d.ack()
        assert len(got) == 4
        assert a.prune() == [] and b.prune() == []
    finally:
        a.close()
        b.close()
