"""Raw PostgreSQL baseline with psycopg: insert rows + NOTIFY in one transaction, LISTEN.

The publisher inserts a transaction's events (one ``INSERT ... SELECT unnest(%b)`` for a
batch: JSON strings as one binary array parameter, as BASELINES.md recommends), sends one
``pg_notify`` and commits. A fan-out reader LISTENs and, on each notification (or every
200 ms), reads the rows past the last ``seq`` it saw. Group members claim up to 100 rows at a
time with ``DELETE ... WHERE seq IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`` and
commit after handling them.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg

from ._env import psycopg_dsn, raw_items


def setup(url: str, tag: str, *, group: bool = False) -> dict[str, Any]:
    cfg = {"dsn": psycopg_dsn(url), "table": f"raw_events_{tag}", "channel": f"raw_{tag}"}
    with psycopg.connect(cfg["dsn"], autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {cfg['table']} (seq bigserial PRIMARY KEY, body jsonb NOT NULL)")
    return cfg


def cleanup(cfg: dict[str, Any]) -> None:
    with psycopg.connect(cfg["dsn"], autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {cfg['table']}")


class Publisher:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.conn = psycopg.connect(cfg["dsn"])
        self.one = f"INSERT INTO {cfg['table']} (body) VALUES (%s::jsonb)"
        self.many = f"INSERT INTO {cfg['table']} (body) SELECT unnest(%b::text[])::jsonb"
        self.channel = cfg["channel"]

    make = staticmethod(raw_items)

    @staticmethod
    def stamp(item: dict[str, Any], t: float) -> None:
        item["payload"]["t"] = t

    def send(self, items: list[dict[str, Any]]) -> None:
        cur = self.conn.cursor()
        if len(items) == 1:
            cur.execute(self.one, (json.dumps(items[0]),))
        else:
            cur.execute(self.many, ([json.dumps(i) for i in items],))
        cur.execute("SELECT pg_notify(%s, '')", (self.channel,))
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()


class Subscriber:
    def __init__(self, cfg: dict[str, Any], on_payload: Any) -> None:
        self.conn = psycopg.connect(cfg["dsn"], autocommit=True)
        self.conn.execute(f"LISTEN {cfg['channel']}")
        row = self.conn.execute(f"SELECT coalesce(max(seq), 0) FROM {cfg['table']}").fetchone()
        self.last = row[0] if row else 0
        self.select = (f"SELECT seq, body::text FROM {cfg['table']} WHERE seq > %s "
                       f"ORDER BY seq LIMIT 1000")
        self.on_payload = on_payload
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        on_payload, loads, conn = self.on_payload, json.loads, self.conn
        while not self.stopped.is_set():
            for _ in conn.notifies(timeout=0.2, stop_after=1):
                pass
            while True:
                rows = conn.execute(self.select, (self.last,)).fetchall()
                for seq, body in rows:
                    self.last = seq
                    on_payload(loads(body)["payload"])
                if len(rows) < 1000:
                    break

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.conn.close()


class GroupConsumer:
    def __init__(self, cfg: dict[str, Any], on_payload: Any) -> None:
        self.conn = psycopg.connect(cfg["dsn"])
        t = cfg["table"]
        self.claim = (f"DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} ORDER BY seq "
                      f"FOR UPDATE SKIP LOCKED LIMIT 100) RETURNING body::text")
        self.on_payload = on_payload
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        on_payload, loads, conn = self.on_payload, json.loads, self.conn
        while not self.stopped.is_set():
            rows = conn.execute(self.claim).fetchall()
            for (body,) in rows:
                on_payload(loads(body)["payload"])
            conn.commit()
            if not rows:
                self.stopped.wait(0.05)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.conn.close()
