"""NATS JetStream provider: one stream carries events, a key-value bucket stores them.

Backend
    nats-server ≥ 2.9 with JetStream enabled. URL form ``nats://[user:password@]host:port``
    (several servers separated by commas). nats-py is asyncio-only: each provider runs one
    :class:`~._loop.LoopThread` with one connection (plus one more of each for status writes,
    see Store), and the synchronous API waits on it.

Subjects and streams
    Events are published to ``<prefix>.<event type>`` in the JetStream stream ``stream_name``
    (subjects ``<prefix>.>``, file storage by default); ``prefix`` defaults to the stream name,
    so two providers with different stream names never see each other's events. A
    subscription pattern becomes a subject filter evaluated by the server: ``*`` →
    ``<prefix>.>``, a ``*`` segment → ``*``, a trailing ``**`` → ``>``. An event type that is not
    a valid subject (whitespace, ``*``, ``>``, empty segments) cannot be published here, nor
    one whose subject would exceed ``MAX_SUBJECT_BYTES`` (3,840 bytes), nor an event whose
    JSON exceeds the server's ``max_payload``: each is a ``ProviderError`` raised before
    anything is sent, so the connection stays usable (the server would drop it).

Store
    A key-value bucket (``<stream_name>_store``, history 1) maps event id → event JSON. A
    stream name with characters a bucket name cannot hold (anything but letters, digits,
    ``_`` and ``-``) gets them replaced by ``_`` plus a short hash of the name, so that two
    streams never share a bucket (see ``_names.bucket_name`` for the migration note).
    ``update_status`` is a compare-and-set on the key's revision (retried on conflict);
    ``update_status_many`` runs the updates of different events concurrently. Status writes
    (read, then compare-and-set) go through a second connection on a second loop thread,
    made on the first status write: a consumer writing back thousands of statuses never
    queues its fan-out messages behind the key-value replies on one connection and loop.
    ``store`` puts at once and waits for the ack. ``store_and_publish_many``, which the
    broker uses for every publish, writes the puts and then the stream publishes to the
    connection in one go and awaits all the acks together: one round trip for store +
    publish. Put and publish go to two JetStream streams: the server receives the put
    first, and a consumer's status write-back (after receiving and handling the event)
    finds it stored; the call returns only when both are acknowledged.
    ``list`` and ``stats`` read the latest value of every key (a KV watch), then filter and
    sort oldest ``created_at`` first in Python: their cost grows with the number of stored
    events. ``max_age`` bounds how long the stream and the bucket keep events.

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
    ``_provider`` the provider (store, publish, fan-out, stats), ``_connection`` connecting
    and creating the stream and the bucket, ``_group`` a group member, ``_names`` subjects and
    consumer names.
"""

from __future__ import annotations

from ._names import subject_filter as subject_filter
from ._provider import NatsProvider as NatsProvider

__all__ = ["NatsProvider", "subject_filter"]
