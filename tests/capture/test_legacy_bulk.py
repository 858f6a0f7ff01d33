"""The legacy bulk methods (``bulk_save_objects``, ``bulk_insert_mappings``,
``bulk_update_mappings``) give one event per row, and change nothing the caller sees."""

from __future__ import annotations

from sqlalchemy.orm import Session

from .conftest import Harness
from .models import User


def _ids(h: Harness) -> list[int]:
    return [e.payload["id"] for e in h.events]


def test_legacy__bulk_insert_mappings_one_create_per_row(h: Harness) -> None:
    """Each mapping gives a create with the generated key and the server defaults; the
    caller's dicts are left as SQLAlchemy leaves them."""
    h.capture()
    rows = [{"name": "a"}, {"name": "b", "score": 1}]
    h.tx(lambda s: s.bulk_insert_mappings(User, rows))
    assert rows == [{"name": "a"}, {"name": "b", "score": 1}]
    assert [(e.operation, e.payload["name"], e.payload["status"], e.payload["score"])
            for e in h.events] == [("create", "a", "new", 7), ("create", "b", "new", 1)]
    assert all(isinstance(i, int) for i in _ids(h))
    assert [e.key for e in h.events] == [f"{h.schema}.users:{i}" for i in _ids(h)]
    assert all(e.metadata["bulk"] is True for e in h.events)


def test_legacy__bulk_insert_mappings_return_defaults_still_fills_the_dicts(h: Harness) -> None:
    """With return_defaults=True the caller's dicts get their keys, as without capture."""
    h.capture()
    rows = [{"name": "a"}, {"name": "b"}]
    h.tx(lambda s: s.bulk_insert_mappings(User, rows, return_defaults=True))
    assert [r["id"] for r in rows] == _ids(h)


def test_legacy__bulk_update_mappings_old_and_new(h: Harness) -> None:
    """Each mapping gives an update with the whole row and old/new of what changed."""
    ids = h.tx(lambda s: (s.add_all(us := [User(name="a"), User(name="b")]), s.flush(),
                          [u.id for u in us])[2])
    h.capture()
    h.tx(lambda s: s.bulk_update_mappings(User, [{"id": ids[0], "name": "A"},
                                                 {"id": ids[1], "name": "b"}]))
    [e] = h.events  # the second row did not change
    assert (e.operation, e.payload["id"], e.payload["name"], e.payload["score"]) == (
        "update", ids[0], "A", 7)
    assert e.metadata["changes"] == {"name": {"old": "a", "new": "A"}}


def test_legacy__bulk_save_objects_inserts_and_updates(h: Harness) -> None:
    """New objects give creates (with generated keys, the objects themselves untouched),
    changed persistent objects give updates."""
    uid = h.tx(lambda s: (s.add(u := User(name="old")), s.flush(), u.id)[2])
    h.capture()

    def work(s: Session) -> list[object]:
        existing = s.get(User, uid)
        assert existing is not None
        existing.name = "renamed"
        s.expunge(existing)  # else the commit's flush updates it (again) as well
        new = [User(name="n1"), User(name="n2")]
        s.bulk_save_objects([*new, existing])
        return [u.id for u in new]

    assert h.tx(work) == [None, None]  # as SQLAlchemy leaves them without return_defaults
    ops = [(e.operation, e.payload["name"]) for e in h.events]
    assert ops == [("create", "n1"), ("create", "n2"), ("update", "renamed")]
    assert all(isinstance(e.payload["id"], int) for e in h.events)
    assert h.events[2].metadata["changes"] == {"name": {"old": "old", "new": "renamed"}}


def test_legacy__removed_handle_unwraps(h: Harness) -> None:
    """After ``remove()`` the bulk methods give no events and the class is as it was."""
    session_class = h.capture().session_class
    had = "_bulk_save_mappings" in session_class.__dict__
    h.handles[-1].remove()
    assert ("_bulk_save_mappings" in session_class.__dict__) is False or had
    h.tx(lambda s: s.bulk_insert_mappings(User, [{"name": "a"}]))
    assert h.events == []


def test_legacy__no_statement_per_row(h: Harness) -> None:
    """Capturing 50 inserted mappings adds at most one statement (a SELECT of the rows),
    never one per row."""
    def count() -> int:
        statements = h.count_statements()
        h.tx(lambda s: s.bulk_insert_mappings(User, [{"name": f"u{i}"} for i in range(50)]))
        return len(statements)

    plain = count()
    h.capture()
    assert count() - plain <= 1
    assert len(h.events) == 50 and all(isinstance(i, int) for i in _ids(h))
