"""Rows of ``relationship(secondary=...)`` tables become events like every other row:
append, remove, replace, clear and a parent's deletion, in flush order, after commit, into
the outbox, without any statement added (SQLite and PostgreSQL, sync and async)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_eventbroker import Broker, EventFilter, RetryPolicy
from sqlalchemy_eventbroker.capture import CRUDHookConfig

from .conftest import Harness
from .models import Article, Tag


def _setup(h: Harness) -> tuple[int, list[int]]:
    """An article with tags 1 and 2, and a third tag, made before capture."""
    def work(s: Session) -> tuple[int, list[int]]:
        tags = [Tag(label=f"t{i}") for i in range(3)]
        article = Article(title="a", tags=tags[:2])
        s.add_all([article, *tags])
        s.flush()
        return article.id, [t.id for t in tags]

    return h.tx(work)  # type: ignore[no-any-return]


def _on_article(aid: int, change: Any) -> Any:
    """``change(session, article)`` with the article held (the identity map is weak)."""
    def work(s: Session) -> None:
        article = s.get(Article, aid)
        change(s, article)

    return work


def _links(h: Harness) -> list[tuple[str, Any]]:
    return [(e.operation, (e.payload["article_id"], e.payload["tag_id"]))
            for e in h.events if e.entity == "article_tags"]


def test_association__create_with_parent_comes_after_both_ends(h: Harness) -> None:
    """A new article with tags: the link rows' create events follow the article's and the
    tags' creates, typed ``<schema>.article_tags.create``, payload the association row."""
    h.capture()
    aid, tids = _setup(h)
    assert [e.entity for e in h.events] == ["articles", "tags", "tags", "tags",
                                            "article_tags", "article_tags"]
    links = [e for e in h.events if e.entity == "article_tags"]
    assert {e.type for e in links} == {h.t("article_tags", "create")}
    assert sorted(e.payload["tag_id"] for e in links) == tids[:2]
    assert all(e.payload == {"article_id": aid, "tag_id": e.payload["tag_id"]} for e in links)
    assert all(e.key == f"{h.schema}.article_tags:{aid},{e.payload['tag_id']}" for e in links)


def test_association__append_remove_replace_clear(h: Harness) -> None:
    """Append gives a create, remove a delete, replacing the collection deletes the old links
    and creates the new ones, clear deletes them all; nothing else changes."""
    aid, (t0, t1, t2) = _setup(h)
    h.capture()
    h.tx(_on_article(aid, lambda s, a: a.tags.append(s.get(Tag, t2))))
    assert _links(h) == [("create", (aid, t2))]
    h.recorder.clear()
    h.tx(_on_article(aid, lambda s, a: a.tags.remove(s.get(Tag, t0))))
    assert _links(h) == [("delete", (aid, t0))]
    h.recorder.clear()
    h.tx(_on_article(aid, lambda s, a: setattr(a, "tags", [s.get(Tag, t0)])))
    assert sorted(_links(h)) == [("create", (aid, t0)), ("delete", (aid, t1)),
                                 ("delete", (aid, t2))]
    h.recorder.clear()
    h.tx(_on_article(aid, lambda s, a: a.tags.clear()))
    assert _links(h) == [("delete", (aid, t0))]
    assert [e.entity for e in h.events] == ["article_tags"]


def test_association__parent_deleted_removes_its_links_first(h: Harness) -> None:
    """Deleting the article deletes its link rows (events before the article's delete),
    even when its collection was never loaded before the flush."""
    aid, (t0, t1, _) = _setup(h)
    h.capture()
    h.tx(lambda s: s.delete(s.get(Article, aid)))
    assert [(e.entity, e.operation) for e in h.events] == [
        ("article_tags", "delete"), ("article_tags", "delete"), ("articles", "delete")]
    assert sorted(_links(h)) == [("delete", (aid, t0)), ("delete", (aid, t1))]


def test_association__rollback_and_config(h: Harness) -> None:
    """A rolled-back link change publishes nothing; excluding the table or disabling
    creates leaves association rows out."""
    aid, (_, _, t2) = _setup(h)
    handle = h.capture()
    h.tx(_on_article(aid, lambda s, a: a.tags.append(s.get(Tag, t2))), commit=False)
    assert h.events == []
    handle.remove()
    h.capture(CRUDHookConfig(exclude=frozenset({"article_tags"})))
    h.tx(_on_article(aid, lambda s, a: a.tags.append(s.get(Tag, t2))))
    assert _links(h) == []


def test_association__no_statement_added(h: Harness) -> None:
    """A flush cycle with link rows (create, append, remove, delete the parent) sends the
    same statements with capture on as off."""
    def cycle() -> int:
        statements = h.count_statements()

        def work(s: Session) -> None:
            tags = [Tag(label=f"t{i}") for i in range(20)]
            articles = [Article(title=f"a{i}", tags=tags[i:i + 3]) for i in range(10)]
            s.add_all(articles)
            s.flush()
            for a in articles:
                a.tags.append(tags[-1]) if tags[-1] not in a.tags else a.tags.pop()
            s.flush()
            for a in articles:
                s.delete(a)

        h.tx(work)
        return len(statements)

    plain = cycle()
    h.capture()
    assert cycle() == plain
    assert any(e.entity == "article_tags" for e in h.events)


def test_association__written_to_the_outbox(h: Harness) -> None:
    """With a DatabaseProvider on the same database, link events are stored in the
    transaction like every other event."""
    database = pytest.importorskip("sqlalchemy_eventbroker.providers.database")
    provider = database.DatabaseProvider(sa.make_url(h.url), table_name="events")
    provider.create_schema()
    broker = Broker(provider, mode="sync", instance_id="outbox-test",
                    retry_policy=RetryPolicy(max_retries=0)).start()
    try:
        h.capture(broker=broker)
        aid, _ = _setup(h)
        stored = provider.list(EventFilter(entity="article_tags"))
        assert len(stored) == 2 and all(e.payload["article_id"] == aid for e in stored)
    finally:
        broker.stop()
        provider.close()
