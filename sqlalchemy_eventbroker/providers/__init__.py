"""Providers: where events are stored and how they travel between brokers.

Concrete providers with optional dependencies (psycopg, redis, nats-py) are imported lazily,
so ``import sqlalchemy_eventbroker`` never needs an extra.
"""

from __future__ import annotations

from .base import (
    BatchProvider as BatchProvider,
    Delivery as Delivery,
    EventFilter as EventFilter,
    EventStream as EventStream,
    GroupStream as GroupStream,
    Provider as Provider,
    ProviderBase as ProviderBase,
    ProviderStats as ProviderStats,
    TransactionalProvider as TransactionalProvider,
)

__all__ = [
    "BatchProvider",
    "Delivery",
    "EventFilter",
    "EventStream",
    "GroupStream",
    "Provider",
    "ProviderBase",
    "ProviderStats",
    "TransactionalProvider",
]
