"""Models for the capture tests: plain, server defaults, parent/child cascade, joined
inheritance, composite primary key, a table in an explicit schema, a JSON column."""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import JSON, Column, ForeignKey, Integer, LargeBinary, String, Table, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

AUDIT_SCHEMA = "audit"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    email: Mapped[str | None] = mapped_column(String(100), default=None)
    status: Mapped[str] = mapped_column(String(20), server_default="new")
    score: Mapped[int] = mapped_column(server_default=text("7"))
    posts: Mapped[list[Post]] = relationship(
        back_populates="author", cascade="all, delete-orphan", order_by="Post.id"
    )


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    title: Mapped[str] = mapped_column(String(100))
    author: Mapped[User] = relationship(back_populates="posts")


class Employee(Base):
    __tablename__ = "employees"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Engineer(Employee):
    __tablename__ = "engineers"

    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20))
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "engineer"}


class Membership(Base):
    __tablename__ = "memberships"

    group_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    role: Mapped[str] = mapped_column(String(20))


class Ledger(Base):
    __tablename__ = "ledger"
    __table_args__: ClassVar[dict[str, Any]] = {"schema": AUDIT_SCHEMA}

    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(String(100))
    blob: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)


class Document(Base):
    """A JSON column (PostgreSQL ``json`` keeps a U+0000 escape that ``jsonb`` refuses) and a
    text column (SQLite stores U+0000 in it; PostgreSQL text cannot)."""

    __tablename__ = "documents"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    body: Mapped[Any] = mapped_column(JSON, nullable=True, default=None)
    text: Mapped[str | None] = mapped_column(Text, default=None)


#: A plain Core table without a primary key (events get an empty ``key``).
log_lines = Table(
    "log_lines", Base.metadata,
    Column("line", String(100), nullable=False),
    Column("level", Integer, nullable=True),
)

#: The association table of ``Article.tags`` (many-to-many).
article_tags = Table(
    "article_tags", Base.metadata,
    Column("article_id", ForeignKey("articles.id", ondelete="CASCADE"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id"), primary_key=True),
)


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(30))


class Article(Base):
    __tablename__ = "articles"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    tags: Mapped[list[Tag]] = relationship(secondary=article_tags, order_by="Tag.id")


class Account(Base):
    """Column control on the class: ``token`` never in events, ``email`` redacted."""

    __tablename__ = "accounts"
    __eventbroker__: ClassVar[dict[str, Any]] = {"exclude": ["token"], "redact": ["email"]}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    email: Mapped[str | None] = mapped_column(String(100), default=None)
    token: Mapped[str | None] = mapped_column(String(100), default=None)


class Session_(Base):
    """``{"capture": False}``: no events at all for this class."""

    __tablename__ = "web_sessions"
    __eventbroker__: ClassVar[dict[str, Any]] = {"capture": False}

    id: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[str] = mapped_column(String(100))
