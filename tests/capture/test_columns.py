"""Column control: ``CRUDHookConfig(exclude_columns=..., redact_columns=...)`` and
``__eventbroker__`` on mapped classes, for every operation, checked at registration."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_eventbroker import ConfigError
from sqlalchemy_eventbroker.capture import CRUDHookConfig, register_crud_hooks

from .conftest import Harness
from .models import Account, Article, Ledger, Session_, Tag, User

R = "[redacted]"


def test_columns__payload_and_changes_of_unit_of_work_events(h: Harness) -> None:
    """Excluded columns appear nowhere; redacted ones show "[redacted]" in the payload and
    as old and new of a change, which stays visible; an update of excluded columns only
    gives no event."""
    h.capture(CRUDHookConfig(exclude_columns={"users": ["email"]},
                             redact_columns={f"{h.schema}.users": ["name"]}))

    def work(s: Session) -> int:
        u = User(name="ada", email="a@x")
        s.add(u)
        s.flush()
        u.name = "bea"
        s.flush()
        u.email = "b@x"
        s.flush()
        s.delete(u)
        return u.id

    uid = h.tx(work)
    assert [e.operation for e in h.events] == ["create", "update", "delete"]
    for e in h.events:
        assert "email" not in e.payload and e.payload["name"] == R
        assert "a@x" not in e.to_json() and '"ada"' not in e.to_json()
        assert e.key == f"{h.schema}.users:{uid}"
    assert h.events[1].metadata["changes"] == {"name": {"old": R, "new": R}}


def test_columns__bulk_statements_legacy_bulk_and_core(h: Harness) -> None:
    """The same for ORM bulk statements, Core DML on the table and the legacy methods."""
    h.capture(CRUDHookConfig(exclude_columns={"users": ["email"]},
                             redact_columns={"users": ["status"]}))
    users = User.__table__
    h.tx(lambda s: s.execute(sa.insert(User), [{"name": "a", "email": "x"}]))
    h.tx(lambda s: s.execute(sa.insert(users).values(name="b", email="y")))
    h.tx(lambda s: s.bulk_insert_mappings(User, [{"name": "c", "email": "z"}]))
    h.tx(lambda s: s.execute(sa.update(User).values(status="s", email="w")))
    h.tx(lambda s: s.execute(sa.delete(users).where(users.c.name == "a")))
    assert [e.operation for e in h.events] == ["create"] * 3 + ["update"] * 3 + ["delete"]
    for e in h.events:
        assert "email" not in e.payload and e.payload["status"] == R
        if e.operation == "update":
            assert e.metadata["changes"] == {"status": {"old": R, "new": R}}


def test_columns__association_rows_and_reads(h: Harness) -> None:
    """Association rows and read events follow the same rules; a hidden key column leaves
    the event key empty."""
    h.capture(CRUDHookConfig(enable_read=True, exclude_columns={"article_tags": ["tag_id"]},
                             redact_columns={"tags": ["label"]}))
    h.tx(lambda s: s.add(Article(title="a", tags=[Tag(label="secret")])))
    links = [e for e in h.events if e.entity == "article_tags"]
    assert [list(e.payload) for e in links] == [["article_id"]] and links[0].key == ""
    h.recorder.clear()
    h.tx(lambda s: s.scalars(sa.select(Tag)).all())
    assert [(e.operation, e.payload["label"]) for e in h.events] == [("read", R)]


def test_columns__class_rules_and_capture_false(h: Harness) -> None:
    """``__eventbroker__`` on the class: exclude and redact; ``{"capture": False}`` gives no
    events of that class at all."""
    h.capture()
    h.tx(lambda s: s.add_all([Account(name="n", email="e@x", token="t0k"),
                              Session_(data="d")]))
    h.tx(lambda s: s.execute(sa.update(Account).values(token="t1k", email="f@x")))
    assert [(e.entity, e.operation) for e in h.events] == [("accounts", "create"),
                                                           ("accounts", "update")]
    create, update = h.events
    assert create.payload == {"id": create.payload["id"], "name": "n", "email": R}
    assert update.metadata["changes"] == {"email": {"old": R, "new": R}}
    assert "t0k" not in create.to_json() + update.to_json()


def test_columns__schema_qualified_table_name(h: Harness) -> None:
    """A table in another schema is named by ``schema.table`` (or its bare name)."""
    h.capture(CRUDHookConfig(exclude_columns={"audit.ledger": ["note"]}))
    h.tx(lambda s: s.add(Ledger(note="n")))
    assert "note" not in h.events[0].payload


@pytest.mark.parametrize(("config", "named"), [
    (CRUDHookConfig(exclude_columns={"nosuch": ["x"]}), "nosuch"),
    (CRUDHookConfig(redact_columns={"users": ["nosuch_col"]}), "nosuch_col"),
    (CRUDHookConfig(exclude_columns={"other.users": ["name"]}), "other.users"),
], ids=["table", "column", "schema"])
def test_columns__unknown_names_raise_config_error(hs: Harness, config: CRUDHookConfig,
                                                   named: str) -> None:
    """A table or column name that matches nothing mapped raises ``ConfigError`` naming it."""
    with pytest.raises(ConfigError, match=named):
        register_crud_hooks(hs.factory, config, broker=hs.broker)


@pytest.mark.parametrize(("rules", "named"), [
    ({"exclude": ["nosuch"]}, "nosuch"),
    ({"hide": ["x"]}, "hide"),
    ({"capture": "no"}, "capture"),
], ids=["column", "key", "capture"])
def test_columns__bad_class_rules_raise_config_error(hs: Harness, rules: dict[str, Any],
                                                     named: str) -> None:
    """A class's ``__eventbroker__`` with an unknown column or key raises ``ConfigError``
    naming it and the class."""
    class Base(DeclarativeBase):
        pass

    class Widget(Base):
        __tablename__ = "widgets"
        __eventbroker__: ClassVar[dict[str, Any]] = rules
        id: Mapped[int] = mapped_column(primary_key=True)

    try:
        with pytest.raises(ConfigError, match=f"Widget.*{named}|{named}.*Widget"):
            register_crud_hooks(hs.factory, broker=hs.broker)
    finally:
        Base.registry.dispose()


def test_columns__config_is_checked_for_kinds() -> None:
    """A string where a list of columns belongs is refused at construction."""
    with pytest.raises(TypeError, match="exclude_columns"):
        CRUDHookConfig(exclude_columns={"users": "password_hash"})
