"""blinker signals that applications can connect to, in our own namespace.

All three are sent with the broker as sender and the event as ``event=``::

    from sqlalchemy_eventbroker import signals

    @signals.event_failed.connect
    def alert(broker, event):
        ...

* ``event_published``: an event was accepted by ``publish*`` (after it was stored).
* ``event_processed``: every handler of an event finished successfully.
* ``event_failed``: a handler exhausted its retries; the event went to the dead letters.

Receivers run synchronously in the thread that published or processed the event; one that
raises is logged and does not affect delivery. Connect with ``weak=False`` for lambdas and
closures (blinker holds receivers weakly by default).
"""

from __future__ import annotations

from blinker import Namespace

__all__ = ["event_failed", "event_processed", "event_published", "namespace"]

namespace = Namespace()

event_published = namespace.signal("event-published", doc="An event was published.")
event_processed = namespace.signal("event-processed", doc="All handlers of an event succeeded.")
event_failed = namespace.signal("event-failed", doc="A handler of an event exhausted its retries.")
