"""Redis Streams provider: one stream carries events between brokers, hashes store them.

Backend
    Redis ≥ 6.2 (``XAUTOCLAIM``), single node or a replicated primary; not Redis Cluster (the
    scripts touch several keys that need not share a slot). URL form
    ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS).

Keys (``S`` = ``stream_name``)
    ``S``               the stream: one entry per published event (fields ``t`` type, ``e`` JSON),
                        trimmed approximately to ``maxlen`` entries on every ``XADD``.
    ``S:ev:<id>``       one hash per stored event: its JSON plus the mutable status fields, so
                        ``get``/``update_status``/``delete`` are O(1) and never scan the stream.
    ``S:index``         a sorted set of stored ids scored by ``created_at`` (microseconds); it
                        orders ``list`` and evicts the oldest events past ``max_events``.
    ``S:counts``        per-status counters kept exact by the same Lua scripts.

Writes
    One Lua script (``_scripts.WRITE``) stores events (hash, index, counts, eviction past
    ``max_events``) and appends them to the stream, stores first, so a reader never sees an
    entry whose event is not stored yet. ``store`` writes at once (one script call);
    ``store_and_publish_many``, which the broker uses for every publish, stores and
    ``XADD``s in the same script call: one round trip per publish, the JSON sent once (one
    script call per ``batch_size`` events, pipelined). ``update_status_many`` applies a
    batch of status changes in one script call.

Fan-out (``stream``)
    One reader thread per provider blocks on ``XREAD`` (``block`` seconds, up to
    ``max(batch_size, 1000)`` entries at a time) and hands each entry to every open stream whose
    pattern matches. A stream starts at the stream's last id when it is opened (``$`` resolved
    at open), so it sees exactly the events published after it opened, in stream order (=
    publish order per publisher). Patterns are filtered in the client: Redis cannot filter a
    stream.

Groups (``group_stream``)
    A Redis consumer group named ``<consumer_group>:<group>:<pattern>`` per ``(group, pattern)``,
    created with id ``$`` on first open, so it is durable from then on. Members read with
    ``XREADGROUP`` and acknowledge with ``XACK``; entries whose type does not match the pattern
    are acknowledged unseen. Every member reclaims entries idle longer than the lease with
    ``XAUTOCLAIM`` (at most every ``lease / 4`` seconds), which is how the event of a member that
    died is handled by another one: at least once, never lost while Redis keeps the entry.
    ``Delivery.renew`` re-claims the entry for its own consumer only if it still owns it.

Guarantees and limits
    * Delivery is at least once for groups, at most once for fan-out readers that are not
      connected (a fan-out stream sees what is published while it is open and Redis is up).
    * Redis without persistence (no AOF/RDB) loses everything on restart: stored events, the
      stream, and the groups with their pending entries. Readers then resume on the new, empty
      stream (groups are re-created from its start, so events published after the restart are
      not lost). With ``appendonly yes`` (``appendfsync always`` for no loss at all) a restart
      loses nothing that was acknowledged by Redis.
    * An entry trimmed by ``maxlen`` before a reader got to it is never delivered.
    * ``list`` reads the ``created_at`` range of the index (``start_time``/``end_time``), then
      filters the other fields in Python: cost grows with the events in that range.

Connection handling
    Commands retry once on a broken pooled connection; readers and group members reconnect
    with capped exponential backoff (``reconnect_max_delay``) and resume at their position.
    Every driver error surfaces as ``ProviderError("redis at <url>: ...")`` from one place,
    ``RedisProvider._translate_errors``. ``close()`` stops the reader thread and closes every
    connection.

Origins
    ``store_and_publish_many(origin=...)`` tags the stream entries (field ``o``), and a
    stream opened with the same ``exclude_origin`` skips them unparsed: a broker never pays
    for reading back its own events.

Modules
    ``_provider`` the provider (store, fan-out reader, stats), ``_group`` a consumer-group
    member, ``_scripts`` the Lua scripts.
"""

from __future__ import annotations

from ._provider import RedisProvider as RedisProvider

__all__ = ["RedisProvider"]
