"""Subjects and JetStream names: how event types and groups map onto NATS."""

from __future__ import annotations

import hashlib
import re

from ...pattern import validate_pattern

__all__ = [
    "BAD_SUBJECT",
    "bucket_name",
    "lead_bucket_name",
    "safe_name",
    "status_bucket_name",
    "stored_prefix",
    "subject_filter",
    "unique_safe_name",
]

#: What an event type or subject prefix must not contain: whitespace, wildcards, empty tokens.
BAD_SUBJECT = re.compile(r"[\s*>]|^\.|\.\.|\.$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")


def subject_filter(prefix: str, pattern: str) -> str:
    """The JetStream subject filter for a subscription ``pattern`` under ``prefix``."""
    validate_pattern(pattern)
    if pattern == "*":
        return f"{prefix}.>"
    return prefix + "." + ".".join(">" if s == "**" else s for s in pattern.split("."))


def safe_name(text: str) -> str:
    """``text`` usable in a stream, bucket or consumer name (other characters become ``_``)."""
    return _UNSAFE_NAME.sub("_", text)


def unique_safe_name(text: str) -> str:
    """``text`` as :func:`safe_name` gives it, with a short hash of ``text`` appended whenever
    characters had to be replaced, so that two different texts never share a name (``X$Y`` and
    ``X_Y`` would both become ``X_Y``). A text that needs no change keeps its name, so existing
    buckets and consumers of ordinary names are found again."""
    safe = safe_name(text)
    if safe == text:
        return text
    return f"{safe}_{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def stored_prefix(stream_name: str) -> str:
    """The subject prefix, in the stream ``stream_name``, of events stored without being
    published (``store()``): ``_eventbroker_stored.<stream_name>``, followed by the event type.

    Outside ``<subject_prefix>.>``, so that fan-out streams, groups and users subscribed to
    the event subjects never see them; named after the stream, whose name is unique on the
    server, so that two streams never claim the same subjects.
    """
    return f"_eventbroker_stored.{stream_name}"


def status_bucket_name(stream_name: str) -> str:
    """The key-value bucket holding the status entries of the events of ``stream_name``:
    ``<stream_name>_status`` (unsafe characters handled as in :func:`bucket_name`)."""
    return f"{unique_safe_name(stream_name)}_status"


def lead_bucket_name(stream_name: str) -> str:
    """The key-value bucket naming the leader of each ordered group of ``stream_name``:
    ``<stream_name>_lead`` (created when an ordered group is first opened)."""
    return f"{unique_safe_name(stream_name)}_lead"


def bucket_name(stream_name: str) -> str:
    """The key-value bucket that stored whole events of ``stream_name`` before the stream
    became the store of record (see the package docstring): ``<stream_name>_store``,
    or, for a stream name with characters a bucket name cannot hold, its
    :func:`unique_safe_name` followed by ``_store``.

    Migration: before this, such names lost their unsafe characters without a hash, so a
    stream named ``X$Y`` stored its events in ``X_Y_store`` (shared with a stream ``X_Y``). Its
    provider now uses ``X_Y_<hash>_store``; events stored before are still in the old bucket
    (copy them over with ``nats kv`` or replay them, then delete it).
    """
    return f"{unique_safe_name(stream_name)}_store"
