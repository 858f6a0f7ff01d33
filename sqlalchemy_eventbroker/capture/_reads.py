"""Read events: one per instance a query of a captured session loads from a row.

The ``load`` instance event fires on the first load into the session's identity map or on
``populate_existing``. Objects already in the identity map, refreshes of expired attributes
and ``session.refresh`` produce none. Read events are published at once, one at a time,
outside the transaction's life.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.attributes import instance_state

from ._context import who
from ._targets import MISSING, jsonable

if TYPE_CHECKING:
    from ._capture import Capture

__all__ = ["Reads"]


class Reads:
    """The ``load`` listener of one registration (``CRUDHookConfig.enable_read``)."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture

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
            if event is not None:
                broker.publish_captured([event], written=False)
        except Exception as exc:  # noqa: BLE001 - capture never fails the user's work
            capture.error(exc, "load")
