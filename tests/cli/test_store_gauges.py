"""The store gauges a running broker exports: the figures of ``eventbroker stats``, computed at
scrape time from the same code, bounded, and harmless when the store fails."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sqlalchemy_eventbroker import Broker, new_event
from sqlalchemy_eventbroker.metrics import STORE_TOP_TYPES
from tests.cli.conftest import Seeded, run


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "store")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith(("eventbroker_store_", "eventbroker_group_"))}


def test_gauges__equal_stats_while_running_and_gone_after_stop(seeded: Seeded) -> None:
    """The gauges of a running broker give what `eventbroker stats --json` gives; a scrape
    sees a change without the broker doing anything; after stop() the store is not reported."""
    registry = CollectorRegistry()
    broker = Broker(seeded.provider, mode="sync", registry=registry).start()
    try:
        got = _samples(registry)
        stats = json.loads(run("stats", "--url", seeded.url, "--json").stdout)
        assert got[("eventbroker_store_up", frozenset())] == 1.0
        for status, n in stats["by_status"].items():
            assert got[("eventbroker_store_events", frozenset({("status", status)}))] == n
        for type_, n in stats["by_type"].items():
            assert got[("eventbroker_store_events_by_type", frozenset({("type", type_)}))] == n
        assert abs(got[("eventbroker_store_oldest_pending_age_seconds", frozenset())]
                   - stats["oldest_pending_age_s"]) < 60
        labels = frozenset({("group", "mailer"), ("pattern", "shop.orders.*")})
        assert got[("eventbroker_group_pending", labels)] == 4
        assert got[("eventbroker_group_in_flight", labels)] == 1
        assert got[("eventbroker_group_members", labels)] == 1
        has_notify = ("eventbroker_store_notify_queue_usage_ratio", frozenset()) in got
        assert has_notify == (seeded.kind == "postgresql")

        _table, other = seeded.new_table()  # many types: bounded, the rest summed as "other"
        try:
            other.store_and_publish_many(
                [new_event("internal", f"many.t{i}.x") for i in range(STORE_TOP_TYPES + 5)])
            registry2 = CollectorRegistry()
            with Broker(other, mode="sync", registry=registry2):
                typed = {dict(k[1]).get("type"): v for k, v in _samples(registry2).items()
                         if k[0] == "eventbroker_store_events_by_type"}
            assert len(typed) == STORE_TOP_TYPES + 1 and typed["other"] == 5
        finally:
            other.drop_schema()
            other.close()
    finally:
        broker.stop()
    assert _samples(registry) == {}


def test_gauges__failing_store_reports_down_not_a_failed_scrape(seeded: Seeded) -> None:
    """A store that cannot answer (its tables dropped here) gives eventbroker_store_up 0; the
    rest of the scrape still works."""
    _table, p = seeded.new_table()
    registry = CollectorRegistry()
    broker = Broker(p, mode="sync", registry=registry).start()
    try:
        p.drop_schema()
        got = _samples(registry)
        assert got == {("eventbroker_store_up", frozenset()): 0.0}
        assert b"eventbroker_queue_size" in generate_latest(registry)
    finally:
        broker.stop()
        p.close()


def test_group_pending__rows_before_the_group_are_not_owed(postgres_url: str) -> None:
    """PostgreSQL: events committed before a group was created, while an older transaction was
    still open, lie past the group's cursor but are "before" it (never claimed): not pending."""
    import sqlalchemy as sa

    from sqlalchemy_eventbroker.providers.database import DatabaseProvider
    from sqlalchemy_eventbroker.providers.ops import group_stats

    p = DatabaseProvider(postgres_url)
    engine = sa.create_engine(postgres_url)
    try:
        p.create_schema()
        with engine.connect() as old:  # an open transaction holding an xid keeps xmin back
            old.execute(sa.text("SELECT pg_current_xact_id()"))
            p.store_and_publish_many([new_event("internal", "early.a.b") for _ in range(3)])
            stream = p.group_stream("early.*.*", "late")
            (g,) = group_stats(p) or []
            assert (g.group, g.pending, g.in_flight) == ("late", 0, 0)
            p.publish(new_event("internal", "early.a.c"))
            (g,) = group_stats(p) or []
            assert g.pending == 1
            old.rollback()
        stream.close()
    finally:
        engine.dispose()
        p.close()
