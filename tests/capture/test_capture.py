"""ORM capture on SQLite and PostgreSQL, with sync and async sessions (the ``h`` fixture)."""

from __future__ import annotations

import logging
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_eventbroker import EventSource, EventStatus, PayloadError
from sqlalchemy_eventbroker.capture import CRUDHookConfig, event_context

from .conftest import MARKER, Harness, assert_marker_never_logged
from .models import Article, Document, Employee, Engineer, Ledger, Membership, Post, Tag, User


def _add_user(s: Session, name: str = "ada", **kw: object) -> User:
    user = User(name=name, **kw)
    s.add(user)
    s.flush()
    return user


def _load(h: Harness, model: type, ident: object) -> object:
    """Reload a row with capture out of the way (a plain session)."""
    with Session(h.sync_engine) as s:
        return s.get(model, ident)


# -- create / update / delete --------------------------------------------------------------


def test_create__payload_has_generated_key_and_server_defaults(h: Harness) -> None:
    """An insert gives one create event with the generated id and the server defaults."""
    h.capture()
    uid = h.tx(lambda s: _add_user(s, email="a@x").id)
    [e] = h.events
    assert e.type == h.t("users", "create")
    assert (e.source, e.schema, e.entity, e.operation) == (
        EventSource.DATABASE, h.schema, "users", "create")
    assert e.payload == {"id": uid, "name": "ada", "email": "a@x", "status": "new", "score": 7}
    assert e.instance_id == "capture-test"
    assert h.broker.provider.get(e.id).status is EventStatus.COMPLETED


def test_create__unset_nullable_column_is_null(h: Harness) -> None:
    """A nullable column the insert left out appears as null, without any extra query."""
    h.capture()
    h.tx(lambda s: _add_user(s))
    assert h.events[0].payload["email"] is None


def test_update__changes_hold_old_and_new_of_changed_columns_only(h: Harness) -> None:
    """An update carries the row and, in metadata.changes, only what changed."""
    uid = h.tx(lambda s: _add_user(s, email="a@x").id)
    h.capture()

    def change(s: Session) -> None:
        user = s.get(User, uid)
        user.name = "bob"
        user.email = "a@x"  # same value: not a change

    h.tx(change)
    [e] = h.events
    assert e.type == h.t("users", "update")
    assert e.payload["name"] == "bob" and e.payload["id"] == uid
    assert e.metadata == {"changes": {"name": {"old": "ada", "new": "bob"}}}


def test_update__no_column_change_gives_no_event(h: Harness) -> None:
    """Touching only a relationship collection, or setting the same value, emits no update."""
    uid = h.tx(lambda s: _add_user(s).id)
    h.capture()

    def touch(s: Session) -> None:
        user = s.get(User, uid)
        user.name = "ada"
        user.posts.append(Post(title="t"))

    h.tx(touch)
    assert [e.type for e in h.events] == [h.t("posts", "create")]


def test_delete__payload_is_the_row_as_it_was(h: Harness) -> None:
    """A delete carries the row as it was, even if attributes were changed before deleting."""
    uid = h.tx(lambda s: _add_user(s, email="a@x").id)
    h.capture()

    def delete(s: Session) -> None:
        user = s.get(User, uid)
        with s.no_autoflush:  # else the cascade's lazy load flushes the change first
            user.name = "changed-then-deleted"
            s.delete(user)

    h.tx(delete)
    [e] = h.events
    assert e.type == h.t("users", "delete")
    assert e.payload == {"id": uid, "name": "ada", "email": "a@x", "status": "new", "score": 7}


def test_delete__cascade_gives_one_event_per_child_before_parent(h: Harness) -> None:
    """ORM cascade deletes produce a delete per child, children first."""
    uid = h.tx(lambda s: _add_user(s, posts=[Post(title="a"), Post(title="b")]).id)
    h.capture()
    h.tx(lambda s: s.delete(s.get(User, uid)))
    assert [e.type for e in h.events] == [h.t("posts", "delete")] * 2 + [h.t("users", "delete")]
    assert {e.payload["title"] for e in h.events[:2]} == {"a", "b"}


def test_create__parents_before_children_in_one_flush(h: Harness) -> None:
    """Within a flush, events follow SQLAlchemy's dependency order: parents first."""
    h.capture()

    def add(s: Session) -> None:
        s.add(Post(title="p", author=User(name="ada")))

    h.tx(add)
    assert [e.type for e in h.events] == [h.t("users", "create"), h.t("posts", "create")]
    assert h.events[1].payload["user_id"] == h.events[0].payload["id"]


def test_config__disabled_operations_and_excluded_tables_are_skipped(h: Harness) -> None:
    """CRUDHookConfig switches operations off and include/exclude pick tables."""
    h.capture(CRUDHookConfig(enable_update=False, exclude={"posts"}))

    def work(s: Session) -> None:
        user = _add_user(s, posts=[Post(title="x")])
        user.name = "bob"

    h.tx(work)
    assert [e.type for e in h.events] == [h.t("users", "create")]


def test_config__include_limits_capture_to_named_tables(h: Harness) -> None:
    """With include, only the named tables (name or schema.name) are captured."""
    h.capture(CRUDHookConfig(include=["audit.ledger"]))

    def work(s: Session) -> None:
        _add_user(s)
        s.add(Ledger(note="n"))

    h.tx(work)
    assert [e.type for e in h.events] == ["audit.ledger.create"]


# -- transactions --------------------------------------------------------------------------


def test_publish__nothing_before_commit_then_all_in_flush_order(h: Harness) -> None:
    """Events wait for the commit; several flushes come out in flush order."""
    h.capture()
    seen_before_commit: list[int] = []

    def work(s: Session) -> None:
        user = _add_user(s)
        user.name = "bob"
        s.flush()
        s.delete(user)
        s.flush()
        seen_before_commit.append(len(h.events))

    h.tx(work)
    assert seen_before_commit == [0]
    assert [e.operation for e in h.events] == ["create", "update", "delete"]
    assert h.events[1].metadata["changes"] == {"name": {"old": "ada", "new": "bob"}}


def test_rollback__publishes_nothing(h: Harness) -> None:
    """A rolled-back transaction publishes none of its flushed events."""
    h.capture()
    h.tx(lambda s: _add_user(s), commit=False)
    assert h.events == []
    h.tx(lambda s: _add_user(s, "next"))
    assert [e.payload["name"] for e in h.events] == ["next"]


def test_savepoint__rollback_drops_and_release_keeps(h: Harness) -> None:
    """A rolled-back savepoint drops its events; a released one keeps them, in order."""
    h.capture()

    def work(s: Session) -> None:
        _add_user(s, "before")
        with s.begin_nested():
            _add_user(s, "kept")
        sp = s.begin_nested()
        _add_user(s, "undone")
        with s.begin_nested():
            _add_user(s, "undone-inner")
        sp.rollback()
        _add_user(s, "after")

    h.tx(work)
    assert [e.payload["name"] for e in h.events] == ["before", "kept", "after"]
    names = h.tx(lambda s: s.scalars(sa.select(User.name).order_by(User.id)).all())
    assert names == ["before", "kept", "after"]


def test_savepoint__rollback_of_outer_after_inner_release_drops_both(h: Harness) -> None:
    """Events released into a savepoint that is then rolled back are dropped too."""
    h.capture()

    def work(s: Session) -> None:
        outer = s.begin_nested()
        with s.begin_nested():
            _add_user(s, "inner")
        _add_user(s, "outer")
        outer.rollback()

    h.tx(work)
    assert h.events == []


def test_insert_then_update__same_transaction_two_flushes(h: Harness) -> None:
    """An object inserted then changed after a flush gives create, then update."""
    h.capture()

    def work(s: Session) -> None:
        user = _add_user(s)
        user.score = 8

    h.tx(work)
    assert [e.operation for e in h.events] == ["create", "update"]
    assert h.events[1].metadata["changes"] == {"score": {"old": 7, "new": 8}}


def test_insert_then_update__before_any_flush_is_one_create(h: Harness) -> None:
    """Changes made before the first flush fold into the create event."""
    h.capture()

    def work(s: Session) -> None:
        user = User(name="ada")
        s.add(user)
        user.name = "final"

    h.tx(work)
    assert [(e.operation, e.payload["name"]) for e in h.events] == [("create", "final")]


def test_merge__new_row_is_create_and_existing_row_is_update(h: Harness) -> None:
    """merge produces a create for a new row and an update for a changed existing one."""
    uid = h.tx(lambda s: _add_user(s).id)
    h.capture()
    h.tx(lambda s: s.merge(User(id=uid, name="merged")))
    h.tx(lambda s: s.merge(User(id=uid + 100, name="fresh")))
    assert [e.operation for e in h.events] == ["update", "create"]
    assert h.events[0].metadata["changes"]["name"] == {"old": "ada", "new": "merged"}
    assert h.events[1].payload["id"] == uid + 100


# -- mapping shapes ------------------------------------------------------------------------


def test_inheritance__joined_gives_one_event_for_the_subclass_table(h: Harness) -> None:
    """A joined-inheritance instance is one event, entity = its own table, all columns."""
    h.capture()
    eid = h.tx(lambda s: (s.add(e := Engineer(name="e", language="py")), s.flush(), e.id)[2])

    def change(s: Session) -> None:
        eng = s.get(Engineer, eid)
        eng.language = "rust"
        eng.name = "f"

    h.tx(change)
    h.tx(lambda s: s.delete(s.get(Employee, eid)))
    assert [e.type for e in h.events] == [
        h.t("engineers", "create"), h.t("engineers", "update"), h.t("engineers", "delete")]
    assert h.events[0].payload == {"id": eid, "name": "e", "kind": "engineer", "language": "py"}
    assert h.events[1].metadata["changes"] == {
        "name": {"old": "e", "new": "f"}, "language": {"old": "py", "new": "rust"}}


def test_composite_pk__payload_has_every_key_column(h: Harness) -> None:
    """A composite primary key appears whole in create, update and delete payloads."""
    h.capture()
    h.tx(lambda s: s.add(Membership(group_id=1, user_id=2, role="a")))
    h.tx(lambda s: setattr(s.get(Membership, (1, 2)), "role", "b"))
    h.tx(lambda s: s.delete(s.get(Membership, (1, 2))))
    assert [e.operation for e in h.events] == ["create", "update", "delete"]
    for e in h.events:
        assert (e.payload["group_id"], e.payload["user_id"]) == (1, 2)


def test_schema__explicit_schema_names_the_event(h: Harness) -> None:
    """A table in an explicit schema gives that schema in the type; bytes are base64."""
    h.capture()
    h.tx(lambda s: s.add(Ledger(note="n", blob=b"\x00\x01")))
    [e] = h.events
    assert (e.type, e.schema) == ("audit.ledger.create", "audit")
    assert e.payload["blob"] == "AAE="


# -- bulk statements -----------------------------------------------------------------------


def test_bulk_update__one_event_per_row_and_rowcount_kept(h: Harness) -> None:
    """ORM update(...) gives one event per affected row; the result keeps its rowcount."""
    h.tx(lambda s: s.add_all([User(name="a"), User(name="b"), User(name="c")]))
    h.capture()
    rowcount = h.tx(lambda s: s.execute(
        sa.update(User).where(User.name != "c").values(score=User.score + 1, status="x")
    ).rowcount)
    assert rowcount == 2
    assert sorted(e.payload["name"] for e in h.events) == ["a", "b"]
    for e in h.events:
        assert e.type == h.t("users", "update")
        assert (e.payload["score"], e.payload["status"]) == (8, "x")
        assert e.metadata["changes"] == {"score": {"old": 7, "new": 8},
                                         "status": {"old": "new", "new": "x"}}
        assert e.metadata["bulk"] is True


def test_bulk_update__synchronizes_session_objects(h: Harness) -> None:
    """Adding RETURNING keeps the ORM's session synchronization working."""
    h.capture()

    def work(s: Session) -> str:
        user = _add_user(s)
        s.execute(sa.update(User).where(User.id == user.id).values(name="bulk"))
        return user.name

    assert h.tx(work) == "bulk"
    assert [e.operation for e in h.events] == ["create", "update"]


def test_bulk_delete__one_event_per_row_with_the_row_as_it_was(h: Harness) -> None:
    """ORM delete(...) gives one event per deleted row, holding the whole row."""
    h.tx(lambda s: s.add_all([User(name="a", email="e"), User(name="b"), User(name="c")]))
    h.capture()
    rowcount = h.tx(lambda s: s.execute(sa.delete(User).where(User.name.in_(["a", "b"]))).rowcount)
    assert rowcount == 2
    assert sorted((e.payload["name"], e.payload["email"]) for e in h.events) == [
        ("a", "e"), ("b", None)]
    assert all(e.payload["score"] == 7 and e.operation == "delete" for e in h.events)


def test_bulk_insert__list_of_dicts_gives_one_event_per_row(h: Harness) -> None:
    """session.execute(insert(Model), [dicts]) gives one create per row with generated keys."""
    h.capture()
    h.tx(lambda s: s.execute(sa.insert(User), [{"name": "a"}, {"name": "b", "score": 1}]))
    assert [(e.payload["name"], e.payload["score"], e.payload["status"]) for e in h.events] == [
        ("a", 7, "new"), ("b", 1, "new")]
    assert all(isinstance(e.payload["id"], int) for e in h.events)


def test_bulk_update_by_pk__events_hold_the_given_values(h: Harness) -> None:
    """The ORM 'bulk UPDATE by primary key' form gives one event per dict: the whole row
    with the given values, and their old values in ``changes``."""
    ids = h.tx(lambda s: [_add_user(s, n).id for n in ("a", "b")])
    h.capture()
    h.tx(lambda s: s.execute(sa.update(User), [{"id": ids[0], "name": "A"},
                                              {"id": ids[1], "name": "B"}]))
    assert [(e.payload["id"], e.payload["name"], e.payload["score"]) for e in h.events] == [
        (ids[0], "A", 7), (ids[1], "B", 7)]
    assert h.events[0].metadata["changes"] == {"name": {"old": "a", "new": "A"}}


def test_bulk__user_returning_is_left_intact(h: Harness) -> None:
    """A statement with its own RETURNING gives the caller its rows and events per row."""
    h.tx(lambda s: s.add_all([User(name="a"), User(name="b")]))
    h.capture()
    rows = h.tx(lambda s: s.execute(
        sa.update(User).values(score=1).returning(User.id, User.score)).all())
    assert sorted(r.score for r in rows) == [1, 1]
    assert sorted(e.payload["id"] for e in h.events) == sorted(r.id for r in rows)


def test_bulk_update__own_returning_events_hold_the_values_it_set(h: Harness) -> None:
    """An UPDATE with its own ``returning()`` gives events with the values it set (literal
    and SQL expression), merged with the rest of the row; the caller's rows are intact."""
    ids = h.tx(lambda s: [_add_user(s, n).id for n in ("a", "b")])
    h.capture()
    rows = h.tx(lambda s: s.execute(
        sa.update(User).where(User.id == ids[0]).values(name="z", score=User.score * 2)
        .returning(User.id)).all())
    assert [tuple(r) for r in rows] == [(ids[0],)]
    [e] = h.events
    assert e.payload == {"id": ids[0], "name": "z", "email": None, "status": "new", "score": 14}
    assert e.metadata["changes"] == {"name": {"old": "a", "new": "z"},
                                     "score": {"old": 7, "new": 14}}
    h.recorder.clear()
    h.tx(lambda s: s.execute(sa.update(User.__table__).values(status="s").returning(
        User.__table__.c.name)).all())
    assert sorted((e.payload["name"], e.payload["status"], e.metadata["changes"]["status"]["new"])
                  for e in h.events) == [("b", "s", "s"), ("z", "s", "s")]


def test_bulk__rolled_back_statement_publishes_nothing(h: Harness) -> None:
    """Bulk events wait for the commit like the rest."""
    h.tx(lambda s: s.add(User(name="a")))
    h.capture()
    h.tx(lambda s: s.execute(sa.delete(User)), commit=False)
    assert h.events == []


def test_bulk__without_returning_falls_back_to_a_select_first(h: Harness) -> None:
    """Where the dialect lacks RETURNING, affected rows are read by one SELECT beforehand."""
    h.tx(lambda s: s.add_all([User(name="a"), User(name="b")]))
    h.capture()
    dialect = (h.engine.sync_engine if h.is_async else h.engine).dialect
    saved = dialect.update_returning, dialect.delete_returning
    dialect.update_returning = dialect.delete_returning = False
    try:
        h.tx(lambda s: s.execute(sa.update(User).where(User.name == "a").values(name="z")))
        h.tx(lambda s: s.execute(sa.delete(User).where(User.name == "b")))
    finally:
        dialect.update_returning, dialect.delete_returning = saved
    upd, dele = h.events
    assert upd.payload["name"] == "z"
    assert upd.metadata["changes"] == {"name": {"old": "a", "new": "z"}}
    assert (dele.operation, dele.payload["name"]) == ("delete", "b")


# -- reads ---------------------------------------------------------------------------------


def test_read__one_event_per_loaded_row_with_primary_key(h: Harness) -> None:
    """With enable_read, each row loaded into the session is a read event, sent at once."""
    h.tx(lambda s: s.add_all([User(name="a"), User(name="b")]))
    h.capture(CRUDHookConfig(enable_read=True))
    seen: list[int] = []

    def read(s: Session) -> None:
        users = s.scalars(sa.select(User)).all()
        seen.append(len(h.events))
        again = s.scalars(sa.select(User)).all()  # already in the identity map: no new event
        assert again == users

    h.tx(read, commit=False)
    assert seen == [2]
    assert [e.type for e in h.events] == [h.t("users", "read")] * 2
    assert sorted(e.payload["name"] for e in h.events) == ["a", "b"]
    assert all("id" in e.payload for e in h.events)


def test_read__off_by_default(h: Harness) -> None:
    """Reads produce no events unless enabled."""
    h.tx(lambda s: s.add(User(name="a")))
    h.capture()
    h.tx(lambda s: s.scalars(sa.select(User)).all())
    assert h.events == []


# -- who -----------------------------------------------------------------------------------


def test_context__fills_user_session_and_metadata(h: Harness) -> None:
    """event_context fills user_id, session_id and metadata; changes merge in."""
    h.capture()
    with event_context(user_id=7, session_id="s-1", metadata={"request_id": "r1"}):
        uid = h.tx(lambda s: _add_user(s).id)
        with event_context(metadata={"step": 2}):
            h.tx(lambda s: setattr(s.get(User, uid), "name", "b"))
    create, update = h.events
    assert (create.user_id, create.session_id, create.metadata) == (7, "s-1", {"request_id": "r1"})
    assert update.metadata == {"request_id": "r1", "step": 2,
                               "changes": {"name": {"old": "ada", "new": "b"}}}


def test_context__session_info_is_the_fallback(h: Harness) -> None:
    """Without event_context, session.info user_id/session_id are used."""
    h.capture()

    def work(s: Session) -> None:
        s.info["user_id"] = 42
        s.info["session_id"] = "web-9"
        _add_user(s)

    h.tx(work)
    assert (h.events[0].user_id, h.events[0].session_id) == (42, "web-9")


# -- failures never reach the user's transaction -------------------------------------------


def test_failure__raising_handler_keeps_the_row_and_counts(h: Harness) -> None:
    """A handler that raises: the row stays committed and the failure is counted."""
    h.capture()

    def boom(event: object) -> None:
        raise RuntimeError("handler down")

    h.broker.subscribe("*.users.create", boom)
    uid = h.tx(lambda s: _add_user(s).id)
    assert _load(h, User, uid) is not None
    assert h.broker.stats().total_failed == 1
    [dead] = h.broker.dead_letters()
    assert dead.status is EventStatus.FAILED and "handler down" in dead.error


def test_failure__stopped_broker_keeps_the_row_and_counts(h: Harness) -> None:
    """A broker that cannot publish never fails the commit; the error is counted."""
    h.capture()
    h.broker.stop()
    uid = h.tx(lambda s: _add_user(s).id)
    assert _load(h, User, uid) is not None
    assert h.capture_errors() == 1


# -- one bad event never takes the others with it ------------------------------------------

def refused(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Messages of the capture's own ERROR records about dropped events."""
    return [r.getMessage() for r in caplog.records
            if r.name == "sqlalchemy_eventbroker.capture" and r.levelno == logging.ERROR]


def test_bad_event__nul_in_json_column_is_dropped_alone(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """A U+0000 in one row's JSON value drops that row's event alone: the row commits, the
    other rows' events are published, and the log names type and id, never the data."""
    caplog.set_level(logging.DEBUG)
    h.capture()
    h.tx(lambda s: s.add_all([Document(title="a", body={"k": "fine"}),
                              Document(title="bad", body={"k": f"x\u0000{MARKER}"}),
                              Document(title="c", body=[1, "ok"])]))
    assert [e.payload["title"] for e in h.events] == ["a", "c"]
    titles = h.tx(lambda s: s.scalars(sa.select(Document.title).order_by(Document.id)).all())
    assert titles == ["a", "bad", "c"]  # the data commits as without capture
    assert h.capture_errors() == 1
    [line] = refused(caplog)
    assert h.t("documents", "create") in line and "U+0000" in line and "payload.body.k" in line
    # One ERROR line for the dropped event in all: not a second, generic one from the broker.
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert_marker_never_logged(caplog)


def test_bad_event__nul_in_text_column_is_dropped_alone(
        hs: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """SQLite stores U+0000 in a text column; its event is refused, the others go on."""
    caplog.set_level(logging.DEBUG)
    hs.capture()

    def work(s: Session) -> None:
        s.add_all([Document(title="a"), Document(title="b", text=f"\u0000{MARKER}")])
        s.flush()
        s.add(Document(title="c", text="plain"))

    hs.tx(work)
    assert [e.payload["title"] for e in hs.events] == ["a", "c"]
    assert hs.capture_errors() == 1
    assert len(refused(caplog)) == 1
    assert_marker_never_logged(caplog)


def test_bad_event__bulk_insert_drops_only_the_bad_row(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """A bulk INSERT of three rows, one holding U+0000, gives the two other events."""
    caplog.set_level(logging.DEBUG)
    h.capture()
    h.tx(lambda s: s.execute(sa.insert(Document), [
        {"title": "a"}, {"title": "bad", "body": {"k": [f"\u0000{MARKER}"]}}, {"title": "c"}]))
    assert [e.payload["title"] for e in h.events] == ["a", "c"]
    assert h.capture_errors() == 1
    assert_marker_never_logged(caplog)


def test_bad_event__nul_in_update_changes_drops_that_update(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """An update whose new value holds U+0000 is refused; the flush's other update is not."""
    caplog.set_level(logging.DEBUG)
    ids = h.tx(lambda s: [(s.add(d := Document(title=t)), s.flush(), d.id)[2] for t in "ab"])
    h.capture()

    def work(s: Session) -> None:
        s.get(Document, ids[0]).body = {"k": f"\u0000{MARKER}"}
        s.get(Document, ids[1]).title = "b2"

    h.tx(work)
    assert [(e.operation, e.payload["title"]) for e in h.events] == [("update", "b2")]
    assert h.capture_errors() == 1
    assert_marker_never_logged(caplog)


def test_context__nul_in_metadata_is_refused_at_once() -> None:
    """event_context refuses U+0000 in its metadata up front, naming the path only."""
    with pytest.raises(PayloadError) as info, event_context(metadata={"r": f"\u0000{MARKER}"}):
        pass
    assert "metadata.r" in str(info.value) and MARKER not in str(info.value)


# -- cost ----------------------------------------------------------------------------------


def test_cost__flush_of_100_objects_adds_no_statements(h: Harness) -> None:
    """Capture adds no statements to a 100-object insert/update/delete cycle, many-to-many
    association rows in the same flushes included."""
    def cycle() -> int:
        statements = h.count_statements()

        def work(s: Session) -> None:
            users = [User(name=f"u{i}") for i in range(100)]
            tags = [Tag(label=f"t{i}") for i in range(3)]
            articles = [Article(title=f"a{i}", tags=tags[:2]) for i in range(10)]
            s.add_all([*users, *articles])
            s.flush()
            for u in users:
                u.score += 1
            for a in articles:
                a.tags.append(tags[2])
                a.tags.remove(tags[0])
            s.flush()
            for u in users:
                s.delete(u)
            for a in articles:
                s.delete(a)

        h.tx(work)
        return len(statements)

    plain = cycle()
    h.capture()
    captured = cycle()
    assert captured == plain
    links = [e for e in h.events if e.entity == "article_tags"]
    assert len(h.events) - len(links) == 300 + 3 + 10 + 10  # users, tags, articles
    assert len(links) == 20 + 20 + 20  # 2 per article, then +1 -1, then 2 with the article


# -- registration --------------------------------------------------------------------------


def test_remove__detaches_every_listener(h: Harness) -> None:
    """handle.remove() stops capture and removes exactly the listeners it added."""
    handle = h.capture(CRUDHookConfig(enable_read=True))
    assert handle.is_active and handle.listeners
    targets = list(handle.listeners)
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.is_active
    for target, identifier, fn in targets:
        assert not sa.event.contains(target, identifier, fn)
    h.tx(lambda s: (_add_user(s), s.scalars(sa.select(User)).all()))
    assert h.events == []


def test_threads__context_is_per_thread(h_sync: Harness) -> None:
    """event_context in one thread does not leak into another."""
    h = h_sync
    h.capture()
    barrier = threading.Barrier(2)

    def worker(user_id: int) -> None:
        with event_context(user_id=user_id):
            barrier.wait(10)
            h.tx(lambda s: _add_user(s, f"u{user_id}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(e.user_id for e in h.events) == [1, 2]
    assert all(e.payload["name"] == f"u{e.user_id}" for e in h.events)


def test_tasks__context_is_per_task(h_async: Harness) -> None:
    """With AsyncSession used natively, each asyncio task sees its own event_context."""
    h = h_async
    import asyncio

    h.capture()

    async def task(user_id: int, gate: asyncio.Event) -> None:
        with event_context(user_id=user_id, session_id=f"task-{user_id}"):
            async with h.factory() as s:
                s.add(User(name=f"u{user_id}"))
                await s.flush()
                gate.set()
                await s.commit()

    async def main() -> None:
        gates = [asyncio.Event(), asyncio.Event()]
        await asyncio.gather(task(1, gates[0]), task(2, gates[1]))

    h.run(main())
    assert sorted((e.user_id, e.session_id) for e in h.events) == [(1, "task-1"), (2, "task-2")]
    assert all(e.payload["name"] == f"u{e.user_id}" for e in h.events)


def test_async__native_bulk_and_unit_of_work(h_async: Harness) -> None:
    """AsyncSession add/flush/execute/commit go through the same capture."""
    h = h_async
    h.capture()

    async def main() -> None:
        async with h.factory() as s, s.begin():
            s.add(User(name="a"))
            await s.flush()
            await s.execute(sa.update(User).values(name="b"))
            await s.execute(sa.insert(User), [{"name": "c"}])

    h.run(main())
    assert [(e.operation, e.payload["name"]) for e in h.events] == [
        ("create", "a"), ("update", "b"), ("create", "c")]
