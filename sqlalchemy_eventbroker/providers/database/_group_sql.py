"""The consumer groups' statements: take, acknowledge, renew, release and add claims.

Built once per provider (each call only binds parameters). PostgreSQL takes claims with
``FOR UPDATE SKIP LOCKED`` in one statement that also writes the deferred acknowledgements,
with ``synchronous_commit = off`` (a claim or ack lost to a server crash only means the event
is delivered again, which at-least-once allows). Elsewhere a compare-and-set ``UPDATE``
inside a transaction takes a batch, which the database's write lock keeps exclusive.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa

from ._schema import EVENT_COLUMNS, EventTables

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.compiler import IdentifierPreparer

__all__ = ["GenericGroupSql", "GroupSql", "PostgresGroupSql"]


class GroupSql(Protocol):
    """What the group machinery needs from the database, one statement each where possible."""

    def claim(self, conn: Connection, gid: int, acks: Sequence[int], n: int, lease: float,
              token: str, *, ordered: bool = False) -> Sequence[Any]:
        """Delete the claims ``acks`` and lease up to ``n`` free (or expired) claims to
        ``token``; rows ``(seq, <EVENT_COLUMNS>)``, the event columns NULL when the event
        is gone. ``ordered``: only claims with no older claim of their key left."""
        ...

    def ack(self, conn: Connection, gid: int, seqs: Sequence[int]) -> None: ...

    def relet(self, conn: Connection, gid: int, held: Sequence[tuple[int, str]],
              lease: float) -> set[int]:
        """Set the leases of the claims ``(seq, token)`` still held to ``lease`` seconds from
        now (0: free them); the seqs that were still held."""
        ...

    def advance(self, conn: Connection, gid: int, old: tuple[int, int], new: tuple[int, int],
                claims: Sequence[tuple[int, str, str]]) -> bool:
        """Move the group's cursor from ``old`` to ``new`` and add ``claims`` (free), both or
        neither: False (nothing written) when the cursor was no longer ``old``."""
        ...

    def renew(self, conn: Connection, gid: int, seq: int, token: str, lease: float) -> bool: ...


class PostgresGroupSql:
    """PostgreSQL: every operation is one statement (see the module docstring)."""

    def __init__(self, tables: EventTables, prep: IdentifierPreparer) -> None:
        ct, et = prep.format_table(tables.claims), prep.format_table(tables.events)
        gt = prep.format_table(tables.groups)
        cols = ", ".join(f"t.{prep.quote(n)}" for n in EVENT_COLUMNS)
        now = "extract(epoch FROM clock_timestamp())"
        # An uncorrelated scalar subquery, evaluated once before the scan (an InitPlan), sets
        # synchronous_commit for this statement's own transaction only: no round trip, and
        # nothing leaks into the pooled session.
        fast = "(SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL"
        acks = "CAST(:acks AS bigint[])"
        lease: sa.BindParameter[float] = sa.bindparam("lease", type_=sa.Double())
        # Deferred acknowledgements ride along with the next claim: one round trip.
        # Ordered groups skip a claim while an older claim of its key is left (the CTE's
        # DELETE is not visible to the same statement, hence the acks excluded by hand); a
        # claim another member is taking is locked (skipped) but still seen by NOT EXISTS.
        older = (f"AND (p.key = '' OR NOT EXISTS (SELECT 1 FROM {ct} AS o "
                 f"WHERE o.group_id = :gid AND o.key = p.key AND o.seq < p.seq "
                 f"AND NOT (o.seq = ANY({acks})))) ")

        def claim_sql(extra: str) -> sa.TextClause:
            return sa.text(
                f"WITH acked AS (DELETE FROM {ct} WHERE group_id = :gid "
                f"AND seq = ANY({acks})), "
                f"pick AS (SELECT p.group_id, p.seq FROM {ct} AS p WHERE p.group_id = :gid "
                f"AND p.lease_until <= {now} AND NOT (p.seq = ANY({acks})) {extra}AND {fast} "
                f"ORDER BY p.seq LIMIT :n FOR UPDATE SKIP LOCKED), "
                f"claimed AS (UPDATE {ct} AS c SET lease_until = {now} + :lease, "
                f"token = :token, deliveries = c.deliveries + 1 FROM pick "
                f"WHERE c.group_id = pick.group_id AND c.seq = pick.seq RETURNING c.seq) "
                f"SELECT claimed.seq, {cols} FROM claimed LEFT JOIN {et} AS t "
                f"ON t.seq = claimed.seq ORDER BY claimed.seq"
            ).bindparams(lease)

        self._claim = claim_sql("")
        self._claim_ordered = claim_sql(older)
        # The cursor's compare-and-set and the claims it adds in one statement (its own
        # transaction in autocommit): the filler's read needs no transaction around it, so a
        # page costs three round trips (group row, page, this) instead of six with BEGIN and
        # COMMIT. Data-modifying CTEs always run; the INSERT adds rows only if `moved` has one.
        self._advance = sa.text(
            f"WITH moved AS (UPDATE {gt} SET cursor_tx = :ntx, cursor_seq = :nseq "
            f"WHERE id = :gid AND cursor_tx = :otx AND cursor_seq = :oseq RETURNING id), "
            f"added AS (INSERT INTO {ct} "
            f"(group_id, seq, event_id, lease_until, token, deliveries, key) "
            f"SELECT moved.id, u.seq, u.id, 0, '', 0, u.key FROM moved CROSS JOIN "
            f"unnest(CAST(:seqs AS bigint[]), CAST(:ids AS uuid[]), CAST(:keys AS text[])) "
            f"AS u(seq, id, key)) "
            f"SELECT count(*) FROM moved"
        )
        self._ack = sa.text(f"DELETE FROM {ct} WHERE group_id = :gid AND seq = ANY({acks}) AND {fast}")
        pairs = "unnest(CAST(:seqs AS bigint[]), CAST(:tokens AS text[])) AS u(seq, token)"
        self._relet = sa.text(
            f"UPDATE {ct} AS c SET lease_until = CASE WHEN :lease > 0 THEN {now} + :lease "
            f"ELSE 0 END FROM {pairs} WHERE c.group_id = :gid AND c.seq = u.seq "
            f"AND c.token = u.token AND {fast} RETURNING c.seq"
        ).bindparams(lease)
        self._renew = sa.text(
            f"UPDATE {ct} SET lease_until = {now} + :lease WHERE group_id = :gid AND seq = :seq "
            f"AND token = :token AND {fast}"
        ).bindparams(lease)

    def claim(self, conn: Connection, gid: int, acks: Sequence[int], n: int, lease: float,
              token: str, *, ordered: bool = False) -> Sequence[Any]:
        sql = self._claim_ordered if ordered else self._claim
        return conn.execute(sql, {"gid": gid, "acks": list(acks), "n": n, "lease": lease,
                                          "token": token}).all()

    def ack(self, conn: Connection, gid: int, seqs: Sequence[int]) -> None:
        conn.execute(self._ack, {"gid": gid, "acks": list(seqs)})

    def relet(self, conn: Connection, gid: int, held: Sequence[tuple[int, str]],
              lease: float) -> set[int]:
        rows = conn.execute(self._relet, {"gid": gid, "seqs": [s for s, _ in held],
                                          "tokens": [t for _, t in held], "lease": lease}).all()
        return {int(r[0]) for r in rows}

    def advance(self, conn: Connection, gid: int, old: tuple[int, int], new: tuple[int, int],
                claims: Sequence[tuple[int, str, str]]) -> bool:
        return bool(conn.execute(self._advance, {
            "gid": gid, "otx": old[0], "oseq": old[1], "ntx": new[0], "nseq": new[1],
            "seqs": [c[0] for c in claims], "ids": [c[1] for c in claims],
            "keys": [c[2] for c in claims],
        }).scalar())

    def renew(self, conn: Connection, gid: int, seq: int, token: str, lease: float) -> bool:
        result = conn.execute(self._renew, {"gid": gid, "seq": seq, "token": token, "lease": lease})
        return bool(result.rowcount)


class GenericGroupSql:
    """Other databases: Core statements, leases against this host's clock."""

    def __init__(self, tables: EventTables) -> None:
        c, t = tables.claims, tables.events
        self._c = c
        self._g = tables.groups
        gid = sa.bindparam("p_gid", type_=sa.Integer())
        now: sa.BindParameter[float] = sa.bindparam("p_now", type_=sa.Double())
        older = c.alias("o")
        # Ordered groups: no older claim of the same key is left (acks are deleted first).
        first_of_key = sa.or_(c.c.key == "", ~sa.exists().where(
            older.c.group_id == c.c.group_id, older.c.key == c.c.key, older.c.seq < c.c.seq))

        def take(*extra: sa.ColumnElement[bool]) -> sa.Update:
            free = (
                sa.select(c.c.seq)
                .where(c.c.group_id == gid, c.c.lease_until <= now, *extra)
                .order_by(c.c.seq)
                .limit(sa.bindparam("p_n", type_=sa.Integer()))
                .scalar_subquery()
            )
            # One statement: the database takes its write lock for it, so two members never
            # take the same claim (the token then finds exactly this batch).
            return (
                c.update()
                .where(c.c.group_id == gid, c.c.seq.in_(free))
                .values(lease_until=now + sa.bindparam("p_lease", type_=sa.Double()),
                        token=sa.bindparam("p_token", type_=sa.String()),
                        deliveries=c.c.deliveries + 1)
            )

        self._take = take()
        self._take_ordered = take(first_of_key)
        self._taken = (
            sa.select(c.c.seq, *(t.c[n] for n in EVENT_COLUMNS))
            .select_from(c.outerjoin(t, t.c.seq == c.c.seq))
            .where(c.c.group_id == gid, c.c.token == sa.bindparam("p_token", type_=sa.String()))
            .order_by(c.c.seq)
        )
        self._renew = (
            c.update()
            .where(c.c.group_id == gid, c.c.seq == sa.bindparam("p_seq", type_=sa.BigInteger()),
                   c.c.token == sa.bindparam("p_token", type_=sa.String()))
            .values(lease_until=now + sa.bindparam("p_lease", type_=sa.Double()))
        )

    def claim(self, conn: Connection, gid: int, acks: Sequence[int], n: int, lease: float,
              token: str, *, ordered: bool = False) -> Sequence[Any]:
        if acks:
            self.ack(conn, gid, acks)
        params = {"p_gid": gid, "p_now": time.time(), "p_n": n, "p_lease": lease, "p_token": token}
        take = self._take_ordered if ordered else self._take
        if not conn.execute(take, params).rowcount:
            return []
        return conn.execute(self._taken, params).all()

    def ack(self, conn: Connection, gid: int, seqs: Sequence[int]) -> None:
        c = self._c
        conn.execute(c.delete().where(c.c.group_id == gid, c.c.seq.in_(list(seqs))))

    def relet(self, conn: Connection, gid: int, held: Sequence[tuple[int, str]],
              lease: float) -> set[int]:
        c = self._c
        until = time.time() + lease if lease > 0 else 0.0
        kept: set[int] = set()
        for seq, token in held:
            if conn.execute(
                c.update().where(c.c.group_id == gid, c.c.seq == seq, c.c.token == token)
                .values(lease_until=until)
            ).rowcount:
                kept.add(seq)
        return kept

    def advance(self, conn: Connection, gid: int, old: tuple[int, int], new: tuple[int, int],
                claims: Sequence[tuple[int, str, str]]) -> bool:
        g = self._g
        moved = conn.execute(
            g.update()
            .where(g.c.id == gid, g.c.cursor_tx == old[0], g.c.cursor_seq == old[1])
            .values(cursor_tx=new[0], cursor_seq=new[1])
        ).rowcount
        if moved and claims:  # one free claim per (seq, event_id, key)
            conn.execute(self._c.insert(), [
                {"group_id": gid, "seq": seq, "event_id": event_id, "lease_until": 0.0,
                 "token": "", "deliveries": 0, "key": key}
                for seq, event_id, key in claims
            ])
        return bool(moved)

    def renew(self, conn: Connection, gid: int, seq: int, token: str, lease: float) -> bool:
        params = {"p_gid": gid, "p_seq": seq, "p_token": token, "p_lease": lease,
                  "p_now": time.time()}
        return bool(conn.execute(self._renew, params).rowcount)
