"""ORM capture: every create, read, update and delete made through a session becomes an event.

``register_crud_hooks(session_factory, config, broker=...)`` attaches SQLAlchemy session and
mapper listeners; ``handle.remove()`` detaches exactly those. The modules, one step each:

* ``_registration``: which session class to hook, the listeners, :class:`CaptureHandle`.
* ``_unit_of_work``: ``after_flush`` builds the events of a flush; they wait per transaction
  and savepoint, go to the transactional outbox before commit and to
  ``broker.publish_captured`` after it, in flush order; rollbacks drop what they undid.
* ``_bulk``: statements through the session (ORM bulk and Core DML), one event per row.
* ``_legacy``: ``bulk_save_objects`` / ``bulk_insert_mappings`` / ``bulk_update_mappings``.
* ``_reads``: read events (``enable_read``), published at once.
* ``_capture``: what those share, including the one place an event is built and checked:
  an event ``Event.validate`` refuses (a string holding U+0000, say) is dropped alone,
  logged by type and id without its data, and counted; its transaction's other events go on.
* ``_targets``: per-table facts and value encoding; ``_context``: :func:`event_context`;
  ``_config``: :class:`CRUDHookConfig`.

Payloads. ``payload`` maps column keys to values, JSON-encoded like ``Event.set_payload``
(bytes become base64 text; a value JSON cannot hold becomes its ``str``). Server-generated
keys and defaults are present when SQLAlchemy fetched them during the flush, which is the
default on PostgreSQL and SQLite ≥ 3.35 (``eager_defaults="auto"`` fetches INSERT defaults
with RETURNING); a server value SQLAlchemy left expired (``eager_defaults=False``, a
``server_onupdate`` column on UPDATE) is left out of the payload instead of being fetched with
a SELECT per row. Columns that were never loaded (deferred) are left out too.

Semantics worth knowing:

* One event per flushed instance. Joined-table inheritance gives one event per instance whose
  ``entity`` is the instance's own (most specific) table and whose payload holds the columns of
  every table in its hierarchy; single-table inheritance uses the shared table.
* An object inserted and then changed in the same transaction gives ``create`` then
  ``update`` when a flush happened in between, one ``create`` with the final values otherwise.
* ``merge`` produces what it flushes: ``create`` for a new row, ``update`` for changed columns.
* ORM cascaded deletes produce a ``delete`` per child; rows removed by the database's own
  ``ON DELETE CASCADE`` (``passive_deletes=True``) are invisible to the ORM and produce none.
* Within one flush, inserts and updates come in table dependency order (parents first), then
  deletes in reverse order (children first); flushes follow each other.
"""

from __future__ import annotations

from ._config import CRUDHookConfig
from ._context import EventContext, event_context
from ._registration import CaptureHandle, register_crud_hooks

__all__ = ["CRUDHookConfig", "CaptureHandle", "EventContext", "event_context",
           "register_crud_hooks"]
