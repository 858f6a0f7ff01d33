"""What the listeners of one ``register_crud_hooks`` call share: the broker, the per-table
facts, failure accounting, and the one place an event is built (and checked)."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Mapper, Session
from sqlalchemy.sql.schema import Table

from .._types import JSON
from ..event import Event, EventSource, EventStatus, uuid7
from ..tracing import mark_captured
from ._columns import REDACTED
from ._targets import Target

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

    from ..broker import Broker
    from ._config import CRUDHookConfig
    from ._context import Who

__all__ = ["Capture"]

log = logging.getLogger("sqlalchemy_eventbroker.capture")

UTC = dt.UTC
_DATABASE = EventSource.DATABASE
_PENDING = EventStatus.PENDING


class Capture:
    """The shared facts of one registration; the listeners hold one each.

    Thread-safe: sessions of any thread flush through the same ``Capture``; the only
    shared mutable state is the per-table cache, filled under a lock.
    """

    def __init__(self, session_class: type[Session], config: CRUDHookConfig,
                 broker: Broker | None,
                 mappers_by_table: Mapping[Table, Sequence[Mapper[Any]]] | None = None) -> None:
        self.session_class = session_class
        self.config = config
        self._broker = broker
        self._targets: dict[Any, Target] = {}
        self._targets_lock = threading.Lock()
        #: The classes mapped to each table when capture was registered (column control of a
        #: class also covers Core statements on its table).
        self._mappers_by_table = dict(mappers_by_table or {})

    # -- the broker ----------------------------------------------------------------------

    def broker(self) -> Broker:
        """The broker given to ``register_crud_hooks``, else the default one (looked up now).

        Raises:
            BrokerError: no broker was given and there is no default broker.
        """
        if self._broker is not None:
            return self._broker
        from ..default import get_default_broker

        return get_default_broker()

    def broker_or_none(self) -> Broker | None:
        """:meth:`broker`, or ``None`` (logged) when there is none."""
        try:
            return self.broker()
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            log.warning("eventbroker: no broker for captured events: %s", exc)
            return None

    def error(self, exc: BaseException, where: str, broker: Broker | None = None) -> None:
        """Log and count a capture failure; never raises."""
        try:
            broker = broker or self.broker_or_none()
            if broker is not None:
                broker.count_capture_error(exc)
            else:
                log.error("eventbroker: capture failed in %s: %s", where, exc, exc_info=exc)
        except Exception:
            log.exception("eventbroker: capture failed in %s", where)

    # -- tables --------------------------------------------------------------------------

    def target(self, mapper: Mapper[Any] | None, table: Table) -> Target:
        """The facts of ``mapper`` (or, for a plain table, of ``table``), computed once."""
        key = mapper if mapper is not None else table
        t = self._targets.get(key)
        if t is None:
            with self._targets_lock:
                t = self._targets.get(key)
                if t is None:
                    t = self._targets[key] = Target(
                        table, mapper, self.config,
                        () if mapper is not None else self._mappers_by_table.get(table, ()))
        return t

    def target_of(self, mapper: Mapper[Any]) -> Target:
        """The facts of ``mapper``, whose own (most specific) table names its events."""
        t = self._targets.get(mapper)
        if t is None:
            table = mapper.local_table
            assert isinstance(table, Table)
            t = self.target(mapper, table)
        return t

    # -- events --------------------------------------------------------------------------

    def make(self, target: Target, dialect: Dialect, operation: str, payload: dict[str, JSON],
             who: Who, broker: Broker | None, extra: dict[str, JSON] | None = None,
             created_at: dt.datetime | None = None) -> Event | None:
        """Build the event of one row and check it, once, before it goes anywhere.

        With tracing configured, its ``publish`` span starts and ends here, so its metadata
        carries the context current now (the request's), also into an outbox.

        Returns ``None`` for an event ``Event.validate`` refuses (a string holding U+0000,
        say): it is dropped alone, logged by type and id with the error's message (which
        names the path, never the data) and counted; the others of its flush go on.
        """
        schema, etype = target.type_for(dialect, operation)
        meta = dict(who[2]) if who[2] else {}
        if extra:
            meta.update(extra)
        key = target.key_of(schema, payload)
        if target.excluded or target.redacted:
            payload, meta = _hide(target, payload, meta)
            if operation == "update" and extra and extra.get("changes") and \
                    not meta.get("changes"):
                return None  # only excluded columns changed: nothing to tell
        event = Event(uuid7(), _DATABASE, etype, _PENDING, 0, "", payload, who[0], who[1],
                      broker.instance_id if broker is not None else "", schema, target.entity,
                      operation, created_at or dt.datetime.now(UTC), None, None, meta, key)
        try:
            event.validate()
        except Exception as exc:  # noqa: BLE001 - one bad event never takes the others
            self.refuse(event, exc, broker)
            return None
        if mark_captured is not None:  # its publish span, in the context current at flush
            mark_captured(event)
        return event

    def refuse(self, event: Event, exc: BaseException, broker: Broker | None) -> None:
        """Log (type, id and ``exc``'s message, never the payload) and count a dropped event."""
        log.error("eventbroker: captured event %s (id %s) dropped: %s: %s",
                  event.type, event.id, type(exc).__name__, exc)
        if broker is not None:
            try:
                broker.metrics.error("capture")  # counted; logged once, above
            except Exception:
                log.exception("eventbroker: counting a capture error failed")


def _hide(target: Target, payload: dict[str, JSON], meta: dict[str, JSON]
          ) -> tuple[dict[str, JSON], dict[str, JSON]]:
    """Column control: excluded columns removed, redacted ones replaced, in the payload and
    in ``metadata["changes"]`` (a redacted change stays visible, its values hidden)."""
    excluded, redacted = target.excluded, target.redacted
    payload = {k: (REDACTED if k in redacted else v) for k, v in payload.items()
               if k not in excluded}
    changes = meta.get("changes")
    if isinstance(changes, dict):
        hidden: dict[str, JSON] = {}
        for k, change in changes.items():
            if k in excluded:
                continue
            if k in redacted and isinstance(change, dict):
                change = {side: REDACTED for side in change}
            hidden[k] = change
        meta["changes"] = hidden
    return payload, meta
