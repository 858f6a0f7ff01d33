"""Redis Streams provider: one stream carries events between brokers, hashes store them.

Backend
    Redis ≥ 6.2 (``XAUTOCLAIM``), single node or a replicated primary; not Redis Cluster (the
    scripts touch several keys that need not share a slot, and name the event hashes
    themselves). URL form
    ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS).

Keys (``S`` = ``stream_name``)
    ``S``               the stream: one entry per published event (fields ``t`` type, ``e`` JSON,
                        ``o`` origin when given), trimmed approximately to ``maxlen`` entries
                        on every ``XADD``.
    ``S:ev:<id>``       one hash per stored event, so ``get``/``update_status``/``delete`` are
                        O(1) and never scan the stream. A new event's hash holds ``json`` and
                        ``status`` only (plus ``processed_at`` when set); ``update_status``
                        adds just the fields it changes (``status``, ``error``,
                        ``retry_count``, ``processed_at``, ``completed_at``) and never
                        re-encodes the JSON. A reader takes each status field from the hash
                        when present, from the JSON otherwise. (Hashes of the earlier layout,
                        which held every field, read the same way.)
    ``S:index``         a sorted set of stored ids scored by ``created_at`` (microseconds); it
                        orders ``list`` and evicts the oldest events past ``max_events``.
    ``S:counts``        counters of the ``processing``, ``completed`` and ``failed`` events,
                        kept exact by the same Lua scripts; ``pending`` is the size of the
                        index minus those three, so storing a new pending event touches no
                        counter.

Writes
    One Lua script (``_scripts.WRITE``) stores events (hash, index, eviction past
    ``max_events``) and appends them to the stream, stores first, so a reader never sees an
    entry whose event is not stored yet. ``store_and_publish_many``, which the broker uses
    for every publish, stores and ``XADD``s in the same script call: one round trip per
    publish of up to ``batch_size`` events, the JSON sent once (past ``batch_size``, one
    script call per ``batch_size`` events, pipelined, after redis-py's one ``SCRIPT
    EXISTS``). An event travels as three script arguments, its small fields packed into one
    with the id last (packing arguments is most of the client's cost).
    Server commands: ``ZADD`` + ``HSET`` + ``XADD`` per new event and one ``ZCARD`` per call
    (the old status is read only when ``ZADD`` says the id was stored before); issue 12
    measured 5 per event before (``HGET``, ``HSET``, ``HINCRBY``, ``ZADD``, ``XADD``).
    ``update_status_many`` applies a batch of status changes in one script call with no
    read by the client: per update one ``HMGET`` inside the script (the old status, which the
    exact counters need and which tells an unknown id, skipped) and one ``HSET``, plus one
    ``HINCRBY`` per status touched per call (7 per update before).

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
    * Durability is Redis's. Without persistence (no AOF/RDB) a restart loses everything:
      stored events, the stream, and the groups with their pending entries. With RDB
      snapshots only, or AOF with ``appendfsync everysec`` (Redis's default when AOF is on),
      a crash of the server (kill -9, power loss) loses the writes acknowledged since the
      last snapshot or fsync: a ``publish`` that returned can be gone. Readers then resume on
      what is left (groups lost with it are re-created from the stream's start, so events
      published after the restart are not lost). Only ``appendonly yes`` with
      ``appendfsync always`` loses nothing Redis acknowledged, at the price of an fsync per
      write; ``tests/providers/test_faults.py`` checks exactly that with kill -9 under load.
    * An entry trimmed by ``maxlen`` before a reader got to it is never delivered.
    * ``list`` reads the ``created_at`` range of the index (``start_time``/``end_time``), then
      filters the other fields in Python: cost grows with the events in that range.
    * The scripts build the event-hash keys from the stream name (one argument per id, not
      two): single node or replicated primary only, not Redis Cluster.

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
