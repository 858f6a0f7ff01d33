"""DatabaseProvider: events in a table of any SQLAlchemy database; LISTEN/NOTIFY on PostgreSQL.

Backend
    One events table (``events`` by default; schema in ``_schema.py``) holding every
    ``Event`` field plus ``seq``, a monotonically increasing ``bigint`` identity, and
    ``origin``, the writing broker's tag. Create it with the Alembic migrations
    (``python -m sqlalchemy_eventbroker.migrate upgrade --url URL`` or :func:`upgrade`) or
    with :meth:`DatabaseProvider.create_schema`. URL: any SQLAlchemy URL, e.g.
    ``postgresql+psycopg://user:pw@127.0.0.1:5432/app`` or ``sqlite:///events.db``.

Delivery guarantee and ordering (fan-out, :meth:`~DatabaseProvider.stream`)
    Every committed row is delivered once to every stream open when it became visible, never
    skipped and never repeated, also across a lost listener connection or a database restart.
    Rows are read by position, not pushed: a wake-up only says "look again". A stream opened
    with ``exclude_origin=o`` skips the rows written with ``origin=o`` (how a broker skips its
    own events); the origin stays in the table and never appears on an event.

    *Commit order without gaps.* ``seq`` is handed out at insert time but transactions commit
    in any order, so "give me ``seq > last``" would skip the row of a slow transaction that
    commits after a faster one with a higher ``seq``. On PostgreSQL each row therefore also
    records the inserting transaction's id (``tx_id``, from ``pg_current_xact_id()``). Readers
    move a cursor ``(tx_id, seq)`` and only pass rows whose ``tx_id`` is below the current
    snapshot's ``xmin``: every transaction below ``xmin`` has ended, so no row can ever appear
    behind the cursor. Writers are never serialised. A row of a later transaction waits
    ("held back") until every transaction that started writing before it has ended; delivery
    order is thus transaction order, which for any one writer is its commit order. The cost:
    a long-running writing transaction anywhere in the cluster delays (never loses) delivery
    until it ends; keep transactions short, and set ``idle_in_transaction_session_timeout``.
    On SQLite writers are serialised by the database, so ``seq`` order is commit order and
    the cursor is ``seq`` alone (``AUTOINCREMENT`` never reuses a value).

Wake-ups (``_listener.py``)
    No write statement notifies, and nothing notifies inside an application's transaction: a
    PostgreSQL transaction that ran NOTIFY takes a database-wide lock at commit, so every
    notifying commit would wait for the one before it. Instead, after the provider's own
    autocommit writes and when the broker calls :meth:`~DatabaseProvider.announce_committed`
    after an outbox transaction committed, the provider wakes its own readers directly and
    asks its *announcer* for a wake-up: one thread with its own autocommit connection that
    sends one ``pg_notify(channel, <table name>)`` for all requests since its last send
    (coalesced, never blocking a caller, reconnecting with backoff). Each provider's
    *listener* holds one dedicated autocommit psycopg 3 connection that LISTENs; at connect
    it notifies itself and, if that self-test does not come back (a pooler in transaction
    mode), logs a warning and falls back to polling every ``poll_interval`` seconds. Other
    databases poll every ``poll_interval`` (writes through the same provider wake its readers
    at once).

    *Backstop.* Listeners and idle group members read again every ``backstop_interval``
    seconds (default 1.0) even if no wake-up arrives, so a lost wake-up (a crash between a
    commit and its announcement, an announcer reconnecting) delays delivery by at most that
    long and never loses it. The cost is one cheap indexed read per interval per provider.

Groups (:meth:`~DatabaseProvider.group_stream`, ``_groups.py``)
    Durable per ``(group, pattern)`` in ``<table>_groups`` (a cursor, starting at the tail
    when the group is first opened) and ``<table>_claims`` (events the group still owes).
    A member that finds no free claim advances the group's cursor with the same gap-free read
    and inserts one claim per matching event; members take claims with
    ``FOR UPDATE SKIP LOCKED`` (PostgreSQL) or a compare-and-set update (elsewhere), leasing
    each for ``lease`` seconds. ``ack`` deletes the claim, ``renew`` extends the lease, and an
    expired lease makes the claim free again: at-least-once, each event to one member at a
    time.

Transactional outbox
    :meth:`~DatabaseProvider.write_in_transaction` inserts a flush's events with ONE statement
    on the caller's connection (on PostgreSQL one JSON document parameter expanded by
    ``jsonb_to_recordset``), in a savepoint of its own, so they commit or vanish with the
    caller's data and a failed write never breaks the caller's transaction.

Modules: ``_provider`` (the facade class), ``_schema`` (tables, migrations), ``_codec`` (rows
and events), ``_dialect`` (PostgreSQL vs others, chosen once), ``_group_sql`` (group
statements), ``_engine`` (engine, connections, errors), ``_reader`` (cursor, pages, fan-out),
``_listener`` (listener and announcer), ``_wake`` (local wake-ups), ``_groups``, ``_audit``.
"""

from __future__ import annotations

from ._provider import DatabaseProvider
from ._schema import downgrade, upgrade

__all__ = ["DatabaseProvider", "downgrade", "upgrade"]
