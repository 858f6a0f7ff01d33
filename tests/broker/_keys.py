"""A handler that records per-key order and concurrency (shared by the ordering tests)."""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable

from sqlalchemy_eventbroker import Event


class KeyRecorder:
    """Records per key the order of handled events and the most that ran at once."""

    def __init__(self, delay: float = 0.002, fail: Callable[[Event, int], bool] | None = None,
                 seed: int = 7) -> None:
        self.lock = threading.Lock()
        self.order: dict[str, list[int]] = collections.defaultdict(list)
        self.running: collections.Counter[str] = collections.Counter()
        self.max_same_key = 0
        self.total_running = 0
        self.max_total = 0
        self.attempts: collections.Counter[str] = collections.Counter()
        self.delay = delay
        self.fail = fail
        self.rng = random.Random(seed)
        self.done = 0
        self.pause = threading.Event()  # never set: a timed wait stands for real work

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.running[event.key] += 1
            self.total_running += 1
            self.max_same_key = max(self.max_same_key, self.running[event.key])
            self.max_total = max(self.max_total, self.total_running)
            self.attempts[event.id] += 1
            attempt = self.attempts[event.id]
            delay = self.rng.uniform(0, self.delay)
        try:
            self.pause.wait(delay)
            if self.fail is not None and self.fail(event, attempt):
                raise RuntimeError(f"attempt {attempt} of {event.payload['n']} fails")
            with self.lock:
                self.order[event.key].append(event.payload["n"])
                self.done += 1
        finally:
            with self.lock:
                self.running[event.key] -= 1
                self.total_running -= 1
