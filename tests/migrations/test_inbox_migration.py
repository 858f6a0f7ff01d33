"""Migration 0004 creates the inbox table next to the events tables and ``downgrade`` removes
it, for the default events table and for one given with ``table_name``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from sqlalchemy_eventbroker.cli import main
from sqlalchemy_eventbroker.providers.database import DatabaseProvider, downgrade, upgrade


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of each kind."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    e = sa.create_engine(db_url)
    yield e
    e.dispose()


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade__creates_the_inbox_table(engine: sa.Engine, db_url: str) -> None:
    """``upgrade head`` creates ``eventbroker_inbox`` with its primary key and index."""
    upgrade(db_url)
    assert "eventbroker_inbox" in _tables(engine)
    insp = sa.inspect(engine)
    assert insp.get_pk_constraint("eventbroker_inbox")["constrained_columns"] == [
        "consumer", "event_id"]
    assert {c["name"] for c in insp.get_columns("eventbroker_inbox")} == {
        "consumer", "event_id", "processed_at"}
    assert [i["column_names"] for i in insp.get_indexes("eventbroker_inbox")] == [
        ["processed_at"]]


def test_downgrade__to_0003_and_to_base_removes_the_inbox(engine: sa.Engine, db_url: str) -> None:
    """``downgrade 0003_key`` drops only the inbox; ``downgrade base`` leaves no table."""
    upgrade(db_url)
    downgrade(db_url, "0003_key")
    assert "eventbroker_inbox" not in _tables(engine) and "events" in _tables(engine)
    upgrade(db_url)
    downgrade(db_url)
    assert not {"eventbroker_inbox", "events"} & _tables(engine)


def test_table_name__inbox_named_after_the_events_table(engine: sa.Engine, db_url: str) -> None:
    """An events table migrated with ``table_name="audit"`` gets ``audit_inbox``, so two events
    tables in one database never create one inbox twice."""
    upgrade(db_url)
    upgrade(db_url, table_name="audit")
    assert {"eventbroker_inbox", "audit_inbox"} <= _tables(engine)
    downgrade(db_url, table_name="audit")
    assert "audit_inbox" not in _tables(engine) and "eventbroker_inbox" in _tables(engine)


def test_create_schema_then_migrations__downgrade_still_works(engine: sa.Engine,
                                                              db_url: str) -> None:
    """``DatabaseProvider.create_schema()`` stamps the head without an inbox table; the
    downgrade to base still runs (and leaves nothing)."""
    with DatabaseProvider(db_url) as p:
        p.create_schema()
    downgrade(db_url)
    assert not {"eventbroker_inbox", "events"} & _tables(engine)


def test_cli__migrate_downgrade_removes_the_inbox(engine: sa.Engine, db_url: str) -> None:
    """``eventbroker migrate upgrade`` creates the inbox, ``migrate downgrade`` removes it."""
    for action in ("upgrade", "downgrade"):
        assert main(["migrate", action, "--url", db_url]) == 0
        assert ("eventbroker_inbox" in _tables(engine)) == (action == "upgrade")


def test_upgrade__inbox_table_equals_the_model(engine: sa.Engine, db_url: str) -> None:
    """The migrated inbox table equals ``Inbox``'s own definition (``create_schema``): Alembic's
    comparison finds nothing, for the default name and a ``table_name`` one."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from sqlalchemy_eventbroker.inbox import build_inbox_table

    upgrade(db_url)
    upgrade(db_url, table_name="audit")
    for name in ("eventbroker_inbox", "audit_inbox"):
        md = sa.MetaData()
        build_inbox_table(name, md)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "compare_type": True, "compare_server_default": True,
                "include_name": lambda n, kind, p, name=name: kind != "table" or n == name})
            assert list(compare_metadata(ctx, md)) == []
