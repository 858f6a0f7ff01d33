"""``Event.key`` from capture: ``schema.entity:`` and the primary key values, for every
operation (unit of work, bulk statements, reads), on SQLite and PostgreSQL, sync and async."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_eventbroker.capture import CRUDHookConfig

from .conftest import Harness
from .models import Engineer, Ledger, Membership, User, log_lines


def test_key__unit_of_work_create_update_delete(h: Harness) -> None:
    """Create, update and delete of one row all carry ``schema.users:<id>``."""
    h.capture()
    uid = h.tx(lambda s: (s.add(u := User(name="a")), s.flush(), u.id)[2])
    h.tx(lambda s: setattr(s.get(User, uid), "name", "b"))
    h.tx(lambda s: s.delete(s.get(User, uid)))
    assert [e.key for e in h.events] == [f"{h.schema}.users:{uid}"] * 3


def test_key__composite_in_primary_key_column_order(h: Harness) -> None:
    """A composite key joins its values with ``,`` in primary-key column order."""
    h.capture()
    h.tx(lambda s: s.add(Membership(group_id=3, user_id=9, role="a")))
    h.tx(lambda s: s.delete(s.get(Membership, (3, 9))))
    assert [e.key for e in h.events] == [f"{h.schema}.memberships:3,9"] * 2


def test_key__explicit_schema_and_joined_inheritance(h: Harness) -> None:
    """The key names the event's own schema and table (the subclass table for joined
    inheritance)."""
    h.capture()
    lid = h.tx(lambda s: (s.add(x := Ledger(note="n")), s.flush(), x.id)[2])
    eid = h.tx(lambda s: (s.add(x := Engineer(name="e", language="py")), s.flush(), x.id)[2])
    assert [e.key for e in h.events] == [f"audit.ledger:{lid}", f"{h.schema}.engineers:{eid}"]


def test_key__bulk_statements_and_reads(h: Harness) -> None:
    """ORM bulk insert, update, delete and read events carry the row's key too."""
    h.capture(CRUDHookConfig(enable_read=True))
    h.tx(lambda s: s.execute(sa.insert(User), [{"name": "a"}, {"name": "b"}]))
    ids = sorted(e.payload["id"] for e in h.events)
    h.recorder.clear()
    h.tx(lambda s: s.execute(sa.update(User).where(User.name == "a").values(score=1)))
    h.tx(lambda s: s.execute(sa.delete(User).where(User.name == "b")))
    h.tx(lambda s: s.scalars(sa.select(User)).all())
    assert [(e.operation, e.key) for e in h.events] == [
        ("update", f"{h.schema}.users:{ids[0]}"), ("delete", f"{h.schema}.users:{ids[1]}"),
        ("read", f"{h.schema}.users:{ids[0]}")]


def test_key__table_without_primary_key_is_empty(h: Harness) -> None:
    """Rows of a table without a primary key give ``key == ""``."""
    h.capture()
    h.tx(lambda s: s.execute(sa.insert(log_lines), [{"line": "x"}, {"line": "y"}]))
    assert [(e.entity, e.key) for e in h.events] == [("log_lines", ""), ("log_lines", "")]


def test_key__string_values_unquoted(h: Harness) -> None:
    """String key values appear as they are, without JSON quotes."""
    h.capture()
    t = sa.Table("codes", sa.MetaData(), sa.Column("code", sa.String(10), primary_key=True))

    def work(s: Session) -> None:
        t.create(s.connection())
        s.execute(sa.insert(t).values(code="ab"))

    h.tx(work)
    assert [e.key for e in h.events] == [f"{h.schema}.codes:ab"]
