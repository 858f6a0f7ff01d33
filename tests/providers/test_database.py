"""DatabaseProvider on real PostgreSQL and SQLite: the conformance suite, then what only a
database provider promises (gap-free commit order, outbox, audit queries, errors)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sqlalchemy_eventbroker.providers.database import DatabaseProvider

from .conformance import ProviderConformance, ProviderFactory


def _factory(url: str, **kw: object) -> Iterator[ProviderFactory]:
    made: list[DatabaseProvider] = []

    def make() -> DatabaseProvider:
        p = DatabaseProvider(url, poll_interval=0.05, **kw)  # type: ignore[arg-type]
        if not made:
            p.create_schema()
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


class TestDatabaseProviderSQLite(ProviderConformance):
    #: Events and group cursors live in the database file.
    durable_across_restart = True

    @pytest.fixture
    def provider_factory(self, sqlite_url: str) -> Iterator[ProviderFactory]:
        yield from _factory(sqlite_url)


class TestDatabaseProviderPostgres(ProviderConformance):
    #: Events and group cursors live in the database.
    durable_across_restart = True

    @pytest.fixture
    def provider_factory(self, postgres_url: str) -> Iterator[ProviderFactory]:
        yield from _factory(postgres_url)
