"""The event: one thing that happened, as it is stored, sent and handed to handlers."""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self, TypeVar

from . import _json
from ._types import JSON
from .errors import EventValidationError, PayloadError

__all__ = [
    "FIELD_LIMITS",
    "Event",
    "EventSource",
    "EventStatus",
    "event_type",
    "new_event",
    "uuid7",
]

T = TypeVar("T")
UTC = dt.UTC


class EventSource(StrEnum):
    """Where an event came from."""

    DATABASE = "database"
    WEBSOCKET = "websocket"
    FRONTEND = "frontend"
    SYSTEM = "system"
    INTERNAL = "internal"


class EventStatus(StrEnum):
    """Where an event is in its life: pending → processing → completed | failed."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


_SOURCES = {s.value: s for s in EventSource}
_STATUSES = {s.value: s for s in EventStatus}

#: The longest value, in characters, of each bounded text field. The same on every provider;
#: they are the column sizes of the database provider's events table, so an event that
#: passes :meth:`Event.validate` fits every backend.
FIELD_LIMITS: Mapping[str, int] = {
    "type": 255,
    "session_id": 255,
    "instance_id": 255,
    "schema": 128,
    "entity": 128,
    "operation": 64,
}


def uuid7() -> str:
    """A time-ordered UUID (version 7) in canonical text form.

    Time order keeps freshly inserted ids on the right edge of a primary-key index, which is
    what makes an events table cheap to insert into.
    """
    ms = time.time_ns() // 1_000_000
    # 74 random bits from the Mersenne Twister (seeded from os.urandom, reseeded after fork):
    # ids must be unique, not secret, and a getrandom() syscall per event is measurable.
    rand = _getrandbits(80)
    rand_a = (rand >> 62) & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    n = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_getrandbits = random.getrandbits


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


def event_type(schema: str, entity: str, operation: str) -> str:
    """Join the three parts of a database event type: ``public.users.create``."""
    return f"{schema}.{entity}.{operation}"


@dataclass(slots=True, eq=True)
class Event:
    """One event. Mutable: the broker records its status, timestamps, retries and error.

    Handlers each receive their own copy (:meth:`clone`), so one handler's changes never
    reach another. Build events with :func:`new_event`; ``validate`` checks what a provider
    needs before it stores one.
    """

    id: str = field(default_factory=uuid7)
    source: EventSource = EventSource.SYSTEM
    type: str = ""
    status: EventStatus = EventStatus.PENDING
    retry_count: int = 0
    error: str = ""
    payload: JSON = None
    user_id: int | None = None
    session_id: str = ""
    instance_id: str = ""
    schema: str = ""
    entity: str = ""
    operation: str = ""
    created_at: dt.datetime = field(default_factory=_now)
    processed_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    metadata: dict[str, JSON] = field(default_factory=dict)
    #: The ordering key; capture sets it to the row's identity (``public.users:42``).
    key: str = ""

    def __post_init__(self) -> None:
        # Accept the plain strings too ("database"), as StrEnum members compare equal anyway.
        if self.source.__class__ is not EventSource:
            src = _SOURCES.get(self.source)
            if src is not None:
                self.source = src
        if self.status.__class__ is not EventStatus:
            st = _STATUSES.get(self.status)
            if st is not None:
                self.status = st

    @classmethod
    def new(
        cls,
        source: EventSource | str,
        type: str,
        payload: object = None,
        **fields: Any,
    ) -> Event:
        """Same as :func:`new_event`."""
        return new_event(source, type, payload, **fields)

    # -- payload -------------------------------------------------------------------------

    def set_payload(self, value: object) -> None:
        """Store the JSON form of ``value``.

        Raises:
            PayloadError: ``value`` holds something JSON cannot represent.
        """
        self.payload = _json.to_jsonable(value)

    def get_payload(self, into: Callable[..., T] | None = None) -> T | JSON:
        """Return the payload, or ``into(**payload)`` when a class is given."""
        if into is None:
            return self.payload
        if not isinstance(self.payload, dict):
            raise TypeError(
                f"event {self.id}: payload is {type(self.payload).__name__}, "
                f"cannot build {getattr(into, '__name__', into)!s} from it"
            )
        return into(**self.payload)

    # -- lifecycle -----------------------------------------------------------------------

    def clone(self) -> Event:
        """A deep copy with the same id: a handler may change it freely."""
        # Field by field rather than through __init__: clone runs twice per dispatched event.
        new = _blank(Event)
        new.id = self.id
        new.source = self.source
        new.type = self.type
        new.status = self.status
        new.retry_count = self.retry_count
        new.error = self.error
        payload = self.payload
        new.payload = payload if payload.__class__ not in _MUTABLE else _json.copy_json(payload)
        new.user_id = self.user_id
        new.session_id = self.session_id
        new.instance_id = self.instance_id
        new.schema = self.schema
        new.entity = self.entity
        new.operation = self.operation
        new.created_at = self.created_at
        new.processed_at = self.processed_at
        new.completed_at = self.completed_at
        new.metadata = _json.copy_json(self.metadata) if self.metadata else {}  # type: ignore[assignment]
        new.key = self.key
        return new

    def mark_processing(self) -> None:
        """Status ``processing``; ``processed_at`` now."""
        self.status = EventStatus.PROCESSING
        self.processed_at = _now()

    def mark_completed(self) -> None:
        """Status ``completed``; ``completed_at`` now; the error cleared."""
        self.status = EventStatus.COMPLETED
        self.completed_at = _now()
        self.error = ""

    def mark_failed(self, error: str | BaseException) -> None:
        """Status ``failed``; ``completed_at`` now; ``error`` holds the text."""
        self.status = EventStatus.FAILED
        self.completed_at = _now()
        self.error = str(error)

    def increment_retry(self) -> None:
        """Count one more retry."""
        self.retry_count += 1

    def validate(self) -> None:
        """Check the event can be stored and routed.

        Raises:
            EventValidationError: naming the field: empty id, source not an
                ``EventSource``, empty type, unknown status, a text field that is not a
                ``str`` or is longer than its limit in :data:`FIELD_LIMITS` (``type``,
                ``session_id`` and ``instance_id`` 255 characters, ``schema`` and ``entity``
                128, ``operation`` 64).
                Also a wrong type in ``retry_count``, ``user_id``, ``error``, ``key``,
                the timestamps (aware ``datetime``) or ``metadata`` (``dict``).
            PayloadError: payload or metadata is not plain storable JSON (see
                ``_json.check_storable``: NaN, bytes, sets, objects, U+0000, lone surrogates,
                nesting deeper than 100); the message names the path, never the value.
        """
        if not isinstance(self.id, str) or not self.id:
            raise EventValidationError("event.id: must be a non-empty string", field="id")
        if not isinstance(self.source, EventSource):
            raise EventValidationError(
                f"event.source: {self.source!r} is not one of "
                f"{', '.join(s.value for s in EventSource)}",
                field="source",
            )
        if not isinstance(self.type, str) or not self.type:
            raise EventValidationError("event.type: must be a non-empty string", field="type")
        if not isinstance(self.status, EventStatus):
            raise EventValidationError(
                f"event.status: {self.status!r} is not one of "
                f"{', '.join(s.value for s in EventStatus)}",
                field="status",
            )
        if not isinstance(self.retry_count, int) or self.retry_count < 0:
            raise EventValidationError(
                f"event.retry_count: expected int >= 0, got {self.retry_count!r}",
                field="retry_count",
            )
        if self.user_id is not None and (
            not isinstance(self.user_id, int) or isinstance(self.user_id, bool)
        ):
            raise EventValidationError(
                f"event.user_id: expected int or None, got {self.user_id!r}", field="user_id"
            )
        # Inline, not a loop over FIELD_LIMITS: this runs on every publish. Lengths are OR-ed:
        # (a | b) > 255 exactly when a or b is (255 is all ones); for 128 the OR may also exceed
        # it when neither does. Such a case, and a non-str or str subclass, takes the slow
        # path, which names the field or finds nothing wrong.
        sid = self.session_id
        iid = self.instance_id
        sch = self.schema
        ent = self.entity
        op = self.operation
        if (not (str is sid.__class__ is iid.__class__ is sch.__class__ is ent.__class__
                 is op.__class__)
                or (len(self.type) | len(sid) | len(iid)) > 255
                or (len(sch) | len(ent)) > 128 or len(op) > 64):
            _raise_too_long(self)
        if not isinstance(self.created_at, dt.datetime) or self.created_at.tzinfo is None:
            raise EventValidationError(
                "event.created_at: expected a timezone-aware datetime", field="created_at"
            )
        if (self.processed_at is not None or self.completed_at is not None) \
                and not (_aware_or_none(self.processed_at)
                         and _aware_or_none(self.completed_at)):
            name = "processed_at" if not _aware_or_none(self.processed_at) else "completed_at"
            raise EventValidationError(
                f"event.{name}: expected a timezone-aware datetime or None", field=name)
        if self.error.__class__ is not str and not isinstance(self.error, str):
            raise EventValidationError(
                f"event.error: expected a str, got {type(self.error).__name__}", field="error")
        if self.key.__class__ is not str and not isinstance(self.key, str):
            raise EventValidationError(
                f"event.key: expected a str, got {type(self.key).__name__}", field="key")
        if not isinstance(self.metadata, dict):
            raise EventValidationError(
                f"event.metadata: expected a dict, got {type(self.metadata).__name__}",
                field="metadata",
            )
        _json.check_storable(self.payload, "payload")
        if self.metadata:
            _json.check_storable(self.metadata, "metadata")

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, JSON]:
        """A JSON-ready dict; timestamps as ISO-8601 text. ``from_dict`` inverts it exactly."""
        return {
            "id": self.id,
            "source": str(self.source),
            "type": self.type,
            "status": str(self.status),
            "retry_count": self.retry_count,
            "error": self.error,
            "payload": self.payload,
            "user_id": self.user_id,
            "session_id": self.session_id,
            "instance_id": self.instance_id,
            "schema": self.schema,
            "entity": self.entity,
            "operation": self.operation,
            "created_at": self.created_at.isoformat(),
            "processed_at": self.processed_at.isoformat() if self.processed_at else None,
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
            "metadata": self.metadata,
            "key": self.key,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Rebuild an event from :meth:`to_dict` output.

        Every field is checked for its type, and payload and metadata as :meth:`validate`
        checks them, so that a rebuilt event can be stored and encoded again.

        Raises:
            EventValidationError: a field is missing or malformed; names it (never its value
                when that is payload or metadata).
        """
        if not isinstance(d, Mapping):
            raise EventValidationError(
                f"event: expected a mapping, got {type(d).__name__}", field="")
        try:
            event = cls(
                _text(d, "id", required=True),
                _enum(d, "source", _SOURCES),
                _text(d, "type", required=True),
                _enum(d, "status", _STATUSES) if "status" in d else EventStatus.PENDING,
                _count(d, "retry_count"),
                _text(d, "error"),
                d.get("payload"),
                _optional_int(d, "user_id"),
                _text(d, "session_id"),
                _text(d, "instance_id"),
                _text(d, "schema"),
                _text(d, "entity"),
                _text(d, "operation"),
                _time(d, "created_at") or _now(),
                _time(d, "processed_at"),
                _time(d, "completed_at"),
                _metadata(d),
                _text(d, "key"),
            )
        except KeyError as exc:
            raise EventValidationError(f"event.{exc.args[0]}: missing", field=exc.args[0]) from None
        for name in ("payload", "metadata"):
            try:
                _json.check_storable(getattr(event, name), name)
            except PayloadError as exc:
                raise EventValidationError(f"event.{exc}", field=name) from None
        return event

    def to_json(self) -> str:
        """Compact JSON text of :meth:`to_dict`."""
        return _json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Rebuild an event from :meth:`to_json` output.

        Raises:
            EventValidationError: the text is not JSON, not an object, or a field is
                malformed (see :meth:`from_dict`).
        """
        try:
            data = _json.loads(text)
        except (ValueError, TypeError) as exc:
            raise EventValidationError(f"event: not valid JSON: {exc}") from None
        except RecursionError:
            raise EventValidationError("event: JSON text nested too deeply") from None
        if not isinstance(data, dict):
            raise EventValidationError("event: JSON text is not an object")
        return cls.from_dict(data)


_blank = object.__new__


def _aware_or_none(value: object) -> bool:
    return value is None or (isinstance(value, dt.datetime) and value.tzinfo is not None)


def _raise_too_long(event: Event) -> None:
    for name, limit in FIELD_LIMITS.items():
        value = getattr(event, name)
        if not isinstance(value, str):
            raise EventValidationError(
                f"event.{name}: expected a str, got {type(value).__name__}", field=name)
        if len(value) > limit:
            # The length, not the text: these fields may come from user input.
            raise EventValidationError(
                f"event.{name}: {len(value)} characters, longer than the limit of {limit}",
                field=name)
_MUTABLE = (dict, list)


def _enum(d: Mapping[str, Any], key: str, members: Mapping[str, Any]) -> Any:
    value = d[key]
    try:
        return members[value]
    except (KeyError, TypeError):
        shown = repr(value) if isinstance(value, str) and len(value) <= 64 \
            else f"a {type(value).__name__}"
        raise EventValidationError(
            f"event.{key}: {shown} is not one of {', '.join(members)}", field=key
        ) from None


def _text(d: Mapping[str, Any], key: str, *, required: bool = False) -> str:
    value = d[key] if required else d.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise EventValidationError(
            f"event.{key}: expected a str, got {type(value).__name__}", field=key)
    return value


def _count(d: Mapping[str, Any], key: str) -> int:
    value = d.get(key)
    if value is None:
        return 0
    if value.__class__ is bool or not isinstance(value, int) or value < 0:
        raise EventValidationError(
            f"event.{key}: expected an int >= 0, got {type(value).__name__}", field=key)
    return value


def _optional_int(d: Mapping[str, Any], key: str) -> int | None:
    value = d.get(key)
    if value is not None and (value.__class__ is bool or not isinstance(value, int)):
        raise EventValidationError(
            f"event.{key}: expected an int or null, got {type(value).__name__}", field=key)
    return value


def _metadata(d: Mapping[str, Any]) -> dict[str, JSON]:
    value = d.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise EventValidationError(
            f"event.metadata: expected an object, got {type(value).__name__}", field="metadata")
    return dict(value)


def _time(d: Mapping[str, Any], key: str) -> dt.datetime | None:
    value = d.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        try:
            parsed = dt.datetime.fromisoformat(value)
        except (TypeError, ValueError):
            shown = repr(value) if isinstance(value, str) and len(value) <= 64 \
                else f"a {type(value).__name__}"
            raise EventValidationError(
                f"event.{key}: {shown} is not an ISO-8601 timestamp", field=key
            ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def new_event(
    source: EventSource | str,
    type: str,
    payload: object = None,
    *,
    user_id: int | None = None,
    session_id: str = "",
    instance_id: str = "",
    metadata: Mapping[str, object] | None = None,
    key: str = "",
) -> Event:
    """A fresh pending event with a new id and ``created_at`` now.

    A three-segment type such as ``public.users.create`` also fills ``schema``, ``entity``
    and ``operation``. ``payload`` is stored in its JSON form (see ``Event.set_payload``).

    Raises:
        PayloadError: the payload or metadata hold something JSON cannot represent.
    """
    schema = entity = operation = ""
    if type.count(".") == 2:
        schema, entity, operation = type.split(".")
    return Event(
        uuid7(),
        _SOURCES.get(source, source),  # type: ignore[arg-type]
        type,
        EventStatus.PENDING,
        0,
        "",
        _json.to_jsonable(payload) if payload is not None else None,
        user_id,
        session_id,
        instance_id,
        schema,
        entity,
        operation,
        _now(),
        None,
        None,
        _json.to_jsonable(dict(metadata), "metadata") if metadata else {},  # type: ignore[arg-type]
        key,
    )
