"""The transactional outbox: capture writing event rows in the session's own transaction."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

from sqlalchemy_eventbroker import Broker, Event, EventFilter, ProviderError, RetryPolicy
from sqlalchemy_eventbroker.testing import EventRecorder

from .conftest import MARKER, Harness, assert_marker_never_logged
from .models import Document, User

database = pytest.importorskip("sqlalchemy_eventbroker.providers.database")


class _Outbox:
    """A DatabaseProvider on the harness's database, a sync broker on it, capture on."""

    def __init__(self, h: Harness, provider_class: type = database.DatabaseProvider) -> None:
        self.provider = provider_class(sa.make_url(h.url), table_name="events")
        self.provider.create_schema()
        self.registry = CollectorRegistry()
        self.broker = Broker(self.provider, mode="sync", instance_id="outbox-test",
                             retry_policy=RetryPolicy(max_retries=0),
                             registry=self.registry).start()
        self.recorder = EventRecorder()
        self.broker.subscribe("*", self.recorder)
        h.capture(broker=self.broker)

    def stored(self) -> list[Any]:
        return self.provider.list(EventFilter())

    def capture_errors(self) -> float:
        value = self.registry.get_sample_value("eventbroker_errors_total", {"kind": "capture"})
        return value or 0.0

    def close(self) -> None:
        self.broker.stop()
        self.provider.close()


@pytest.fixture
def outbox(h: Harness) -> Iterator[_Outbox]:
    box = _Outbox(h)
    try:
        yield box
    finally:
        box.close()


def _count_users(h: Harness) -> int:
    with Session(h.sync_engine) as s:
        return s.scalar(sa.select(sa.func.count()).select_from(User)) or 0


def test_outbox__event_rows_commit_with_the_data_and_are_stored_once(
        h: Harness, outbox: _Outbox) -> None:
    """Event rows are written in the transaction, committed with it, and not stored again."""
    statements = h.count_statements()

    def work(s: Session) -> None:
        s.add_all([User(name="a"), User(name="b")])
        s.flush()
        s.add(User(name="c"))

    h.tx(work)
    inserts = [st for st in statements if "events" in st and st.lstrip().upper().startswith(
        ("INSERT", "WITH"))]
    assert len(inserts) == 2  # one statement per flush, in the user's transaction
    stored = outbox.stored()
    assert sorted(e.payload["name"] for e in stored) == ["a", "b", "c"]
    assert len({e.id for e in stored}) == 3
    received = outbox.recorder.wait_for(3, timeout=10)
    assert sorted(e.id for e in received) == sorted(e.id for e in stored)
    assert outbox.capture_errors() == 0


def test_outbox__rollback_leaves_neither_data_nor_events(h: Harness, outbox: _Outbox) -> None:
    """A rolled-back transaction leaves no user rows and no event rows."""
    h.tx(lambda s: (s.add(User(name="a")), s.flush()), commit=False)
    assert _count_users(h) == 0
    assert outbox.stored() == []
    assert outbox.recorder.events == []


def test_outbox__savepoint_rollback_removes_its_event_rows(h: Harness, outbox: _Outbox) -> None:
    """Rows a rolled-back savepoint wrote vanish with it; the rest commit."""
    def work(s: Session) -> None:
        s.add(User(name="kept"))
        s.flush()
        sp = s.begin_nested()
        s.add(User(name="undone"))
        s.flush()
        sp.rollback()

    h.tx(work)
    assert [e.payload["name"] for e in outbox.stored()] == ["kept"]
    assert [e.payload["name"] for e in outbox.recorder.wait_for(1)] == ["kept"]


class _FailingProvider(database.DatabaseProvider):  # type: ignore[misc, name-defined]
    """Fails inside write_in_transaction the way the contract allows: a failing statement
    (which poisons a PostgreSQL transaction) inside the provider's own savepoint, then
    ProviderError with the caller's transaction intact."""

    def write_in_transaction(self, connection: Any, events: Sequence[Event], *,
                             origin: str = "") -> None:
        try:
            with connection.begin_nested():
                connection.exec_driver_sql("SELECT * FROM no_such_table_for_outbox")
        except sa.exc.DBAPIError as exc:
            raise ProviderError("outbox write failed") from exc


def test_outbox__failing_write_never_fails_the_transaction(h: Harness) -> None:
    """A failing outbox write leaves the transaction usable (capture adds no savepoint of its
    own: the provider isolates itself); data commits, the events are stored by the broker
    after commit instead, and the failure is counted once."""
    box = _Outbox(h, _FailingProvider)
    try:
        h.tx(lambda s: (s.add(User(name="a")), s.flush(), s.add(User(name="b"))))
        assert _count_users(h) == 2
        assert sorted(e.payload["name"] for e in box.stored()) == ["a", "b"]
        assert len(box.recorder.wait_for(2)) == 2
        assert box.capture_errors() == 1  # asked once per transaction, then fell back
    finally:
        box.close()


def test_outbox__one_bad_event_is_dropped_alone(
        h: Harness, outbox: _Outbox, caplog: pytest.LogCaptureFixture) -> None:
    """Three rows in one flush, one holding U+0000 in its JSON value: the other two events are
    written in the transaction and delivered; the bad one is logged without its data."""
    caplog.set_level(logging.DEBUG, logger="sqlalchemy_eventbroker")
    statements = h.count_statements()
    h.tx(lambda s: s.add_all([Document(title="a"),
                              Document(title="bad", body={"k": f"\u0000{MARKER}"}),
                              Document(title="c", body={"k": "fine"})]))
    inserts = [st for st in statements if "events" in st and st.lstrip().upper().startswith(
        ("INSERT", "WITH"))]
    assert len(inserts) == 1  # the good two, in the user's transaction
    assert sorted(e.payload["title"] for e in outbox.stored()) == ["a", "c"]
    assert sorted(e.payload["title"] for e in outbox.recorder.wait_for(2, timeout=10)) == [
        "a", "c"]
    assert outbox.capture_errors() == 1
    assert_marker_never_logged(caplog)
