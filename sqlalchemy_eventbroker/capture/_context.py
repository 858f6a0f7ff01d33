"""Who did it: ``event_context`` and the ``session.info`` fallback."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import _json
from .._types import JSON

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["EventContext", "Who", "event_context", "who"]

log = logging.getLogger("sqlalchemy_eventbroker.capture")

#: ``(user_id, session_id, metadata)`` of the events one flush or statement builds.
Who = tuple[int | None, str, Mapping[str, JSON]]


@dataclass(frozen=True, slots=True)
class EventContext:
    """Who and why, attached to every event built while it is current."""

    user_id: int | None = None
    session_id: str = ""
    metadata: Mapping[str, JSON] = field(default_factory=dict)


_current: contextvars.ContextVar[EventContext | None] = contextvars.ContextVar(
    "sqlalchemy_eventbroker_event_context", default=None
)


@contextlib.contextmanager
def event_context(
    user_id: int | None = None,
    session_id: str = "",
    metadata: Mapping[str, object] | None = None,
) -> Iterator[EventContext]:
    """Fill ``user_id``, ``session_id`` and ``metadata`` of the events captured inside.

    A ``contextvars`` variable carries it, so each thread and each asyncio task sees its own
    (a task started inside inherits a copy). Contexts nest: an inner one overrides the
    ``user_id``/``session_id`` it gives and adds its metadata keys to the outer ones.
    Values are read when a flush builds the events, so keep the commit inside the block.
    Without a context, ``session.info["user_id"]`` and ``session.info["session_id"]`` are used.

    Raises:
        PayloadError: ``metadata`` holds something JSON cannot represent, or a string with
            U+0000, which no backend stores (it would cost every event built inside).
    """
    outer = _current.get()
    meta: dict[str, JSON] = dict(outer.metadata) if outer is not None else {}
    if metadata:
        given = _json.to_jsonable(dict(metadata), "metadata")
        _json.check_storable(given, "metadata")
        meta.update(given)  # type: ignore[arg-type]
    ctx = EventContext(
        user_id if user_id is not None else (outer.user_id if outer is not None else None),
        session_id or (outer.session_id if outer is not None else ""),
        meta,
    )
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def who(session: Session) -> Who:
    """The current context's user, session id and metadata, else ``session.info``'s."""
    ctx = _current.get()
    user_id: Any = None
    session_id = ""
    meta: Mapping[str, JSON] = {}
    if ctx is not None:
        user_id, session_id, meta = ctx.user_id, ctx.session_id, ctx.metadata
    if user_id is None or not session_id:
        info = session.info
        if user_id is None:
            user_id = info.get("user_id")
        if not session_id:
            session_id = str(info.get("session_id") or "")
    if user_id is not None and (type(user_id) is not int):
        try:
            user_id = int(user_id)
        except (TypeError, ValueError):
            log.warning("eventbroker: user_id %r is not an int; events carry none", user_id)
            user_id = None
    return user_id, session_id, meta
