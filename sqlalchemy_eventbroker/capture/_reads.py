"""Read events: one per instance a query of a captured session loads from a row.

The ``load`` instance event fires on the first load into the session's identity map or on
``populate_existing``. Objects already in the identity map, refreshes of expired attributes
and ``session.refresh`` produce none. Read events live outside the transaction: a rollback
does not take them back. They are published at once, one at a time, except when the broker's
provider writes to the session's own database (a ``DatabaseProvider`` there): then they wait
for the end of the session's transaction (commit or rollback) and go out together, because
the provider writes them on its own connection, and on SQLite the session's transaction may
hold a lock that write would wait for (SQLAlchemy's savepoint recipe for pysqlite begins the
transaction, and takes a read lock, at the first SELECT).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.attributes import instance_state

from ..providers.base import TransactionalProvider
from ._context import who
from ._targets import MISSING, jsonable

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, SessionTransaction

    from ..broker import Broker
    from ..event import Event
    from ._capture import Capture

__all__ = ["Reads"]


class Reads:
    """The ``load`` listener of one registration (``CRUDHookConfig.enable_read``)."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self._key = ("sqlalchemy_eventbroker.reads", id(self))

    def on_load(self, target: object, context: Any) -> None:
        """``load`` (instance event): a row became an object in a captured session."""
        capture = self.capture
        session = getattr(context, "session", None)
        if not isinstance(session, capture.session_class):
            return
        try:
            state = instance_state(target)
            t = capture.target_of(state.mapper)
            if not t.captured:
                return
            d = state.dict
            payload = {pk: jsonable(v) for ak, pk in t.cols
                       if (v := d.get(ak, MISSING)) is not MISSING}
            broker = capture.broker()
            dialect = session.get_bind(mapper=state.mapper).dialect
            event = capture.make(t, dialect, "read", payload, who(session), broker)
            if event is None:
                return
            if self._shares_database(session, broker):
                session.info.setdefault(self._key, []).append(event)
            else:
                broker.publish_captured([event], written=False)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            capture.error(exc, "load")

    def _shares_database(self, session: Session, broker: Broker) -> bool:
        provider = broker.provider
        if not isinstance(provider, TransactionalProvider):
            return False
        try:
            return bool(provider.shares_transaction(session.connection()))
        except Exception:  # noqa: BLE001 - when in doubt, publish at once as before
            return False

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        """``after_transaction_end``: the root transaction ended (its locks are gone):
        publish the read events that waited for it, in load order."""
        if transaction.parent is not None:
            return
        waiting: list[Event] | None = session.info.pop(self._key, None)
        if not waiting:
            return
        try:
            self.capture.broker().publish_captured(waiting, written=False)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            self.capture.error(exc, "after_transaction_end")
