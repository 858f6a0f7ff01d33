"""NATS JetStream provider: one stream message per event is both its transport and its store.

Backend
    nats-server ≥ 2.9 with JetStream enabled. URL form ``nats://[user:password@]host:port``
    (several servers separated by commas). nats-py is asyncio-only: each provider runs one
    :class:`~._loop.LoopThread` with one connection (plus one more of each for status writes,
    see Status), and the synchronous API waits on it.

Subjects and streams
    Events are published to ``<prefix>.<event type>`` in the JetStream stream ``stream_name``
    (file storage by default); ``prefix`` defaults to the stream name, so two providers with
    different stream names never see each other's events. A subscription pattern becomes a
    subject filter evaluated by the server: ``*`` → ``<prefix>.>``, a ``*`` segment → ``*``, a
    trailing ``**`` → ``>``. An event type that is not a valid subject (whitespace, ``*``,
    ``>``, empty segments) cannot be published here, nor one whose subject would exceed
    ``MAX_SUBJECT_BYTES`` (3,840 bytes), nor an event whose JSON exceeds the server's
    ``max_payload``: each is a ``ProviderError`` raised before anything is sent, so the
    connection stays usable (the server would drop it).

Store
    The stream message is the store of record: ``store_and_publish_many`` (every broker
    publish) sends one message per event, its body the event JSON, headers
    ``Eventbroker-Id: <id>`` (and the origin, below); the acks of a batch are awaited together,
    one round trip. ``store()`` stores without publishing: the message goes to
    ``_eventbroker_stored.<stream_name>.<type>``, a second subject space of the same stream
    that no fan-out stream, group or subscriber of ``<prefix>.>`` reads (a stream made by an
    earlier version gets it added). Storing an id again adds a message; reads take the latest.

    Reads scan, because JetStream 2.9 has no index by header and the id cannot be part of the
    subject (fixed as ``<prefix>.<type>``):

    * ``get(id)`` reads the *headers* (not the bodies) of the messages stored since the time
      in the id (UUIDv7), from 2 s before it (a hit there is the whole answer: later copies
      are stored later) and only on a miss from ``CLOCK_MARGIN`` (10 minutes, for clock
      differences) before it, then fetches the one message by sequence. Cost grows with the
      events stored since the event was made (~2–4 ms for a fresh event, ~13 ms with 1,000
      stored after it, on the 2-core test machine); an id without a time (not UUIDv7) reads
      the headers of the whole stream. ``delete(id)`` finds every copy from ``CLOCK_MARGIN``
      before and deletes them.
    * ``list(filter)`` reads the messages on the subjects its ``type_pattern`` selects (the
      server filters), from its ``start_time`` less ``CLOCK_MARGIN`` on (server time; an
      event is stored after it was made), and filters the other fields, sorts by
      ``created_at`` and pages in Python. ``end_time`` and ``limit`` cannot end the read
      early: stream order is publish order, not ``created_at`` order.
    * ``iter_events`` (replay) is one such read, not one per page.
    * ``stats()`` reads every event and its status.

    ``max_age`` bounds how long the stream and the status bucket keep events.

Status
    ``update_status`` appends one small entry (status, error, retry count if given, time) to
    the key-value bucket ``<stream_name>_status`` (key = event id, 16 entries kept per key)
    without reading anything first; ``update_status_many`` sends them all at once and awaits
    the acks together. Reads fold an event's entries onto it, oldest first, as
    ``update_status`` would have applied them: an event read by ``get`` costs two more lookups
    (its first and last entry, in flight together; more only for an event updated more than
    once); ``list`` looks them up per event for up to 64 events, else reads the whole bucket.
    Entries stored more than a second before the event's own message belong to an earlier copy
    of that id and are ignored, so storing an id again resets its status (``Broker.redrive``
    deletes first, which purges the entries at once). An update of an
    unknown id leaves an entry no read shows (it expires with ``max_age``). Status writes go
    through a second connection on a second loop thread, made on the first status write, so a
    consumer's write-back never queues its fan-out messages behind the acks.

    Migration: versions before this stored each event a second time in a key-value bucket
    ``<stream_name>_store``; those events are not read any more (replay them from the old
    bucket, then delete it; ``drop()`` deletes it too). A stream name with characters a
    bucket name cannot hold gets them replaced by ``_`` plus a short hash of the name
    (``_names.bucket_name``).

Fan-out (``stream``)
    One ordered push consumer per stream, filtered by the pattern's subject, starting at new
    messages (``DeliverPolicy.NEW``, resolved by the server when the consumer is created, before
    ``stream()`` returns). Ordered consumers detect gaps (reconnects, server restarts) and
    re-create themselves from the last stream sequence they saw: no loss, no duplicates.

Groups (``group_stream``)
    One durable pull consumer per ``(group, pattern)`` (named from ``consumer_group``, the
    group and a hash of the pattern), explicit ack, ``ack_wait`` = the lease, unlimited
    redeliveries. Created at new messages on first open, it keeps its position while no
    member is open. ``Delivery.renew`` sends ``+WPI`` (in progress), resetting ``ack_wait``.
    Members fetch ``batch_size`` messages at a time; buffered messages nearing their lease
    are renewed, expired ones skipped (the server redelivers them), and on ``close()`` the
    unread ones are nak'ed so another member gets them at once.

Guarantees and limits
    * Everything the server acknowledged (``publish`` returned) survives a server restart with
      file storage and is delivered to groups and to open fan-out streams afterwards.
    * Group delivery is at least once; fan-out delivery is exactly once per open stream.
    * Order is the stream's order (per publisher: publish order).
    * Ack, renew and nak are fire-and-forget messages, queued and sent in batches (one task
      on the loop per batch): one lost during a disconnect means a redelivery after the
      lease, never a loss.

Origins
    ``store_and_publish_many(origin=...)`` puts the origin in a message header, and a stream
    opened with the same ``exclude_origin`` skips those messages unparsed.

Errors from nats-py surface as ``ProviderError("nats at <url>: ...")`` from one place,
``NatsProvider._translate_errors``. ``close()`` drains the connections and stops the loop
threads.

Modules
    ``_provider`` the provider (store, publish, fan-out, stats), ``_store`` reading the store
    (scans, status entries and their fold), ``_connection`` connecting and creating the stream
    and the bucket, ``_group`` a group member, ``_names`` subjects and JetStream names.
"""

from __future__ import annotations

from ._names import subject_filter as subject_filter
from ._provider import NatsProvider as NatsProvider

__all__ = ["NatsProvider", "subject_filter"]
