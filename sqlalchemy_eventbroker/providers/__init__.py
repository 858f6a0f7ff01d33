"""Providers: where events are stored and how they travel between brokers.

Concrete providers with optional dependencies (psycopg, redis, nats-py) are imported lazily,
so ``import sqlalchemy_eventbroker`` never needs an extra.
"""

from __future__ import annotations

from .base import BusProvider as BusProvider
from .base import Delivery as Delivery
from .base import EventFilter as EventFilter
from .base import EventStream as EventStream
from .base import GroupStream as GroupStream
from .base import Provider as Provider
from .base import ProviderBase as ProviderBase
from .base import ProviderStats as ProviderStats
from .base import TransactionalProvider as TransactionalProvider

__all__ = [
    "BusProvider",
    "Delivery",
    "EventFilter",
    "EventStream",
    "GroupStream",
    "Provider",
    "ProviderBase",
    "ProviderStats",
    "TransactionalProvider",
]
