"""Rows to events and events to rows: the one place that knows the column layout.

A write is ONE statement. On PostgreSQL its parameter is one JSON array document, expanded
by ``jsonb_to_recordset``; elsewhere it is a list of plain row dicts (an executemany). Each
event is encoded on its own before the statement is built, so that a payload the backend
cannot hold fails naming that event's id, and never its data.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from ... import _json
from ...errors import PayloadError
from ...event import Event
from ._schema import EVENT_COLUMNS

__all__ = ["EVENT_COLUMNS", "READ_COLUMNS", "core_rows", "json_document", "row_event", "utc"]

UTC = dt.UTC

#: What a page read selects, in this order: the event's columns, then ``origin``.
READ_COLUMNS = (*EVENT_COLUMNS, "origin")

#: Index of ``origin`` in a row selected in :data:`READ_COLUMNS` order.
ORIGIN = len(EVENT_COLUMNS)


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """``value`` as an aware UTC datetime (naive values are taken to be UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else utc(value).isoformat()  # type: ignore[union-attr]


def _storable(e: Event) -> None:
    # The JSON values travel inside one statement: refuse what the backend cannot hold here,
    # per event, rather than failing the whole batch in the database with no event named.
    _json.check_storable(e.payload, "payload")
    _json.check_storable(e.metadata, "metadata")


def _failed(e: Event, exc: PayloadError) -> PayloadError:
    return PayloadError(f"event {e.id}: {exc}")


def json_document(events: Sequence[Event], origin: str) -> str:
    """The events as one JSON array text (PostgreSQL's ``jsonb_to_recordset`` input).

    Raises:
        PayloadError: an event's payload or metadata cannot be stored; the message names the
            event id and the path, never the value.
    """
    tag = origin or None
    rows: list[dict[str, Any]] = []
    for e in events:
        try:
            _storable(e)
        except PayloadError as exc:
            raise _failed(e, exc) from None
        rows.append({
            "id": e.id, "source": str(e.source), "type": e.type, "status": str(e.status),
            "retry_count": e.retry_count, "error": e.error, "payload": e.payload,
            "user_id": e.user_id, "session_id": e.session_id, "instance_id": e.instance_id,
            "schema": e.schema, "entity": e.entity, "operation": e.operation,
            "created_at": _iso(e.created_at), "processed_at": _iso(e.processed_at),
            "completed_at": _iso(e.completed_at), "metadata": e.metadata, "origin": tag,
            "key": e.key,
        })  # fmt: skip
    try:
        return _json.dumps(rows)  # one encoder call for the batch: the common case
    except PayloadError:
        for e, row in zip(events, rows, strict=True):  # name the event that cannot be encoded
            try:
                _json.dumps(row)
            except PayloadError as exc:
                raise _failed(e, exc) from None
        raise


def core_rows(events: Sequence[Event], origin: str) -> list[dict[str, Any]]:
    """The events as row dicts for a Core ``insert()`` (databases other than PostgreSQL).

    ``to_jsonable`` copies payload and metadata, so later changes to an event are not seen.

    Raises:
        PayloadError: as :func:`json_document`.
    """
    tag = origin or None
    rows: list[dict[str, Any]] = []
    for e in events:
        try:
            _storable(e)
            rows.append({
                "id": e.id, "source": str(e.source), "type": e.type, "status": str(e.status),
                "retry_count": e.retry_count, "error": e.error,
                "payload": _json.to_jsonable(e.payload), "user_id": e.user_id,
                "session_id": e.session_id, "instance_id": e.instance_id, "schema": e.schema,
                "entity": e.entity, "operation": e.operation, "created_at": utc(e.created_at),
                "processed_at": utc(e.processed_at), "completed_at": utc(e.completed_at),
                "metadata": _json.to_jsonable(e.metadata, "metadata"), "origin": tag,
                "key": e.key,
            })  # fmt: skip
        except PayloadError as exc:
            raise _failed(e, exc) from None
    return rows


def row_event(row: Sequence[Any]) -> Event:
    """An ``Event`` from the first 18 columns of a row selected in ``EVENT_COLUMNS`` order.

    Only the event's own fields: ``origin`` is the provider's business and never reaches the
    event.
    """
    return Event(
        str(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9],
        row[10], row[11], row[12], utc(row[13]), utc(row[14]), utc(row[15]),  # type: ignore[arg-type]
        row[16] if row[16] is not None else {}, row[17] or "",
    )
