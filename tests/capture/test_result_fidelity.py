"""Capture is invisible to the application: every ``Result`` of an INSERT, UPDATE or DELETE
run through a captured session behaves exactly as it does without capture (API.md section 5).

Each case runs the same statement twice on the same starting rows, capture off and capture
on, and compares everything the application can ask of the result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from .conftest import Harness
from .models import User

users = User.__table__

#: ``(id, kind)`` → a function of the session that executes the statement.
Run = Callable[[Session], Any]

CASES: dict[str, Run] = {
    # ORM statements on the mapped class
    "orm-insert-values": lambda s: s.execute(sa.insert(User).values(name="x")),
    "orm-insert-one-params": lambda s: s.execute(sa.insert(User), {"name": "x"}),
    "orm-insert-many": lambda s: s.execute(sa.insert(User), [{"name": "x"}, {"name": "y"}]),
    "orm-insert-returning": lambda s: s.execute(
        sa.insert(User).values(name="x").returning(User.id, User.status)),
    "orm-insert-many-returning": lambda s: s.execute(
        sa.insert(User).returning(User.id, User.name), [{"name": "x"}, {"name": "y"}]),
    "orm-insert-returning-entity": lambda s: s.execute(
        sa.insert(User).returning(User), [{"name": "x"}, {"name": "y"}]),
    "orm-update": lambda s: s.execute(
        sa.update(User).where(User.name != "c").values(score=User.score + 1)),
    "orm-update-returning": lambda s: s.execute(
        sa.update(User).where(User.name == "a").values(name="z").returning(User.id)),
    "orm-update-by-pk-many": lambda s: s.execute(
        sa.update(User), [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}]),
    "orm-delete": lambda s: s.execute(sa.delete(User).where(User.name == "a")),
    "orm-delete-returning": lambda s: s.execute(
        sa.delete(User).where(User.name != "a").returning(User.id, User.name)),
    # Core statements on the plain Table, through the session
    "core-insert-values": lambda s: s.execute(sa.insert(users).values(name="x")),
    "core-insert-many": lambda s: s.execute(sa.insert(users), [{"name": "x"}, {"name": "y"}]),
    "core-insert-multi-values": lambda s: s.execute(sa.insert(users).values(
        [{"name": "x", "email": None}, {"name": "y", "email": None}])),
    "core-insert-returning": lambda s: s.execute(
        sa.insert(users).values(name="x").returning(users.c.id, users.c.score)),
    "core-insert-return-defaults": lambda s: s.execute(
        sa.insert(users).values(name="x").return_defaults()),
    "core-update": lambda s: s.execute(
        sa.update(users).where(users.c.name == "b").values(email="e")),
    "core-update-many": lambda s: s.execute(
        sa.update(users).where(users.c.id == sa.bindparam("uid")).values(
            name=sa.bindparam("n")), [{"uid": 1, "n": "A"}, {"uid": 3, "n": "C"}]),
    "core-update-returning": lambda s: s.execute(
        sa.update(users).where(users.c.id > 1).values(status="s").returning(
            users.c.id, users.c.status)),
    "core-delete": lambda s: s.execute(sa.delete(users).where(users.c.id == 2)),
    "core-delete-returning": lambda s: s.execute(
        sa.delete(users).where(users.c.id < 3).returning(users.c.name)),
}

#: What the application may ask of a result; each is asked of a fresh execution.
ASKS: dict[str, Callable[[Any], Any]] = {
    "inserted_primary_key": lambda r: r.inserted_primary_key,
    "inserted_primary_key_rows": lambda r: r.inserted_primary_key_rows,
    "returned_defaults": lambda r: r.returned_defaults,
    "returned_defaults_rows": lambda r: r.returned_defaults_rows,
    "lastrowid": lambda r: r.lastrowid,
    "rowcount": lambda r: r.rowcount,
    "returns_rows": lambda r: r.returns_rows,
    "is_insert": lambda r: r.is_insert,
    "keys": lambda r: list(r.keys()),
    "all": lambda r: r.all(),
    "scalars": lambda r: r.scalars().all(),
    "first": lambda r: r.first(),
    "iterate": lambda r: list(r),
    "rowcount_after_rows": lambda r: (r.all(), r.rowcount)[1],
}


def _plain(value: Any) -> Any:
    """A comparable form: rows as tuples, mapped objects as (class, id, name)."""
    if isinstance(value, User):
        return ("User", value.id, value.name)
    if isinstance(value, list | tuple | sa.Row):
        return [_plain(v) for v in value]
    return value


def _observe(h: Harness, run: Run, ask: Callable[[Any], Any]) -> Any:
    _reset(h)

    def work(s: Session) -> Any:
        result = run(s)
        try:
            return _plain(ask(result))
        except Exception as exc:  # noqa: BLE001 - the kind of error is what is compared
            return f"raises {type(exc).__name__}"

    return h.tx(work)


def _reset(h: Harness) -> None:
    """Three users with ids 1, 2, 3 and the id counter after them, on either database."""
    with h.sync_engine.begin() as conn:
        if h.dialect == "postgresql":
            conn.exec_driver_sql("TRUNCATE users RESTART IDENTITY CASCADE")
        else:
            conn.execute(sa.delete(users))
        conn.execute(sa.insert(users), [{"name": n} for n in "abc"])


@pytest.mark.parametrize("case", list(CASES))
def test_result__same_with_capture_on_and_off(h: Harness, case: str) -> None:
    """Everything the application can read from the result is the same with capture on."""
    run = CASES[case]
    off = {name: _observe(h, run, ask) for name, ask in ASKS.items()}
    h.capture()
    on = {name: _observe(h, run, ask) for name, ask in ASKS.items()}
    assert on == off
    assert h.events, "the statement was captured"


#: Rows each case changes (of users 1 "a", 2 "b", 3 "c"); ``None``: see the test below.
AFFECTED = {
    "orm-insert-values": 1, "orm-insert-one-params": 1, "orm-insert-many": 2,
    "orm-insert-returning": 1, "orm-insert-many-returning": 2,
    "orm-insert-returning-entity": 2, "orm-update": 2, "orm-update-returning": 1,
    "orm-update-by-pk-many": 2, "orm-delete": 1, "orm-delete-returning": 2,
    "core-insert-values": 1, "core-insert-many": None, "core-insert-multi-values": None,
    "core-insert-returning": 1,
    "core-insert-return-defaults": 1, "core-update": 1, "core-update-many": 2,
    "core-update-returning": 2, "core-delete": 1, "core-delete-returning": 2,
}


@pytest.mark.parametrize("case", list(CASES))
def test_result__events_hold_the_whole_row_of_every_affected_row(h: Harness, case: str) -> None:
    """Each affected row gives one event whose payload is the whole row (generated key and
    server defaults included) and whose key names it; updates carry old and new values.

    The one exception is documented: on PostgreSQL a Core multi-row INSERT (executemany or
    ``values([...])``) whose keys the database generates gives events with the values it was
    given (SQLAlchemy's result holds
    no keys, and adding RETURNING would change it); SQLite finds them by rowid."""
    _reset(h)
    h.capture()

    def work(s: Session) -> None:
        result = CASES[case](s)
        with contextlib.suppress(sa.exc.ResourceClosedError):  # a result without rows
            result.all()

    h.tx(work)
    columns = [c.key for c in users.columns]
    expected = AFFECTED[case]
    if expected is None and h.dialect == "sqlite":
        expected = 2
    if expected is None:
        assert [e.payload for e in h.events] == [{"name": "x", "email": None},
                                                 {"name": "y", "email": None}]
        assert [e.key for e in h.events] == ["", ""]
        return
    assert len(h.events) == expected
    for e in h.events:
        assert list(e.payload) == columns
        assert e.key == f"{h.schema}.users:{e.payload['id']}"
        assert e.metadata["bulk"] is True
        if e.operation == "update":
            changes = e.metadata["changes"]
            assert changes and all(c["old"] != c["new"] for c in changes.values())
            assert all(e.payload[k] == c["new"] for k, c in changes.items())


@pytest.mark.parametrize(("case", "added"), [
    ("orm-update", 2), ("orm-delete", 1), ("orm-insert-many", 0), ("core-insert-values", 1),
    ("core-insert-many", None),
    ("orm-update-by-pk-many", 1), ("core-update-many", 2),
])
def test_result__capture_adds_statements_per_statement_never_per_row(
        h: Harness, case: str, added: int | None) -> None:
    """Capture reads rows around a statement with a fixed number of statements (a SELECT
    before an UPDATE/DELETE, one after when values are not literal; one after an INSERT
    with server defaults), whatever the number of rows."""
    def count() -> int:
        _reset(h)
        with h.sync_engine.begin() as conn:
            conn.execute(sa.insert(users), [{"name": f"n{i}"} for i in range(40)])
        statements = h.count_statements()
        h.tx(lambda s: CASES[case](s))
        return len(statements)

    plain = count()
    h.capture()
    if added is None:  # SQLite: one SELECT by rowid; PostgreSQL: none (keys unknown)
        added = 1 if h.dialect == "sqlite" else 0
    assert count() - plain == added
