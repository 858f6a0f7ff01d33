"""Alembic environment for sqlalchemy-eventbroker's own tables.

Run through ``sqlalchemy_eventbroker.providers.database.upgrade(url)`` or
``python -m sqlalchemy_eventbroker.migrate upgrade --url URL``, which pass the target database
and the events table name in ``config.attributes``. With the plain ``alembic`` command, give
them as ``-x url=... -x table_name=...``.

The version table is ``eventbroker_alembic_version`` (``..._<table>`` for a non-default table
name), never the application's ``alembic_version``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from sqlalchemy_eventbroker.providers.database._schema import version_table_name

config = context.config
x_args = context.get_x_argument(as_dictionary=True)
table_name = config.attributes.get("table_name") or x_args.get("table_name") or "events"
version_table = version_table_name(table_name)


def _url() -> sa.URL:
    url = config.attributes.get("url") or x_args.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("sqlalchemy_eventbroker migrations: no database URL (pass -x url=...)")
    return sa.make_url(url)


def run_offline() -> None:
    """Emit the SQL instead of running it (``alembic upgrade head --sql``)."""
    context.configure(
        url=_url(), version_table=version_table, literal_binds=True, target_metadata=None
    )
    with context.begin_transaction():
        context.run_migrations(table_name=table_name)


def _run(connection: sa.Connection) -> None:
    context.configure(connection=connection, version_table=version_table, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations(table_name=table_name)


def run_online() -> None:
    connectable = config.attributes.get("connectable")
    if isinstance(connectable, sa.Connection):
        _run(connectable)
        return
    if isinstance(connectable, sa.Engine):
        with connectable.connect() as connection:
            _run(connection)
            connection.commit()
        return
    engine = sa.create_engine(_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
