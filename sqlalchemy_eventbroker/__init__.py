"""sqlalchemy-eventbroker: every SQLAlchemy create, read, update and delete as an event.

Events are stored for audit and replay and delivered to subscribers in-process and across
processes through PostgreSQL LISTEN/NOTIFY, Redis Streams or NATS JetStream. Start with
``register_crud_hooks(session_factory, CRUDHookConfig(), broker=Broker(...))``.

Providers that need an extra (``DatabaseProvider`` on PostgreSQL needs ``[postgres]``,
``RedisProvider`` ``[redis]``, ``NatsProvider`` ``[nats]``) are imported on first use, so
importing this package never requires them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._types import SubscriptionID as SubscriptionID
from .broker import Broker as Broker
from .broker import BrokerStats as BrokerStats
from .broker import ProcessingMode as ProcessingMode
from .errors import BrokerError as BrokerError
from .errors import BrokerStopped as BrokerStopped
from .errors import ConfigError as ConfigError
from .errors import EventValidationError as EventValidationError
from .errors import HandlerError as HandlerError
from .errors import PatternError as PatternError
from .errors import PayloadError as PayloadError
from .errors import ProviderError as ProviderError
from .errors import PublishDepthExceeded as PublishDepthExceeded
from .errors import QueueFull as QueueFull
from .errors import SubscriptionNotFound as SubscriptionNotFound
from .event import Event as Event
from .event import EventSource as EventSource
from .event import EventStatus as EventStatus
from .event import event_type as event_type
from .event import new_event as new_event
from .metrics import start_metrics_server as start_metrics_server
from .pattern import compile_pattern as compile_pattern
from .pattern import matches as matches
from .providers.base import EventFilter as EventFilter
from .providers.base import EventStream as EventStream
from .providers.base import Provider as Provider
from .providers.base import ProviderStats as ProviderStats
from .providers.memory import MemoryProvider as MemoryProvider
from .retry import RetryPolicy as RetryPolicy

if TYPE_CHECKING:
    from .capture import CRUDHookConfig as CRUDHookConfig
    from .capture import event_context as event_context
    from .capture import register_crud_hooks as register_crud_hooks
    from .config import EventBrokerConfig as EventBrokerConfig
    from .config import load_config as load_config
    from .default import get_default_broker as get_default_broker
    from .default import initialize as initialize
    from .default import is_initialized as is_initialized
    from .default import publish as publish
    from .default import publish_async as publish_async
    from .default import publish_sync as publish_sync
    from .default import register_shutdown as register_shutdown
    from .default import set_default_broker as set_default_broker
    from .default import shutdown as shutdown
    from .default import stats as stats
    from .default import subscribe as subscribe
    from .default import unsubscribe as unsubscribe
    from .inbox import Inbox as Inbox
    from .providers.database import DatabaseProvider as DatabaseProvider
    from .providers.nats import NatsProvider as NatsProvider
    from .providers.redis import RedisProvider as RedisProvider

__version__ = "0.1.0"

# Resolved on first access: providers whose drivers are optional extras, and the modules
# that build on the broker (kept lazy so ``import sqlalchemy_eventbroker`` stays cheap).
_LAZY = {
    "DatabaseProvider": ".providers.database",
    "RedisProvider": ".providers.redis",
    "NatsProvider": ".providers.nats",
    "CRUDHookConfig": ".capture",
    "event_context": ".capture",
    "register_crud_hooks": ".capture",
    "EventBrokerConfig": ".config",
    "load_config": ".config",
    "get_default_broker": ".default",
    "initialize": ".default",
    "is_initialized": ".default",
    "publish": ".default",
    "publish_async": ".default",
    "publish_sync": ".default",
    "register_shutdown": ".default",
    "set_default_broker": ".default",
    "shutdown": ".default",
    "stats": ".default",
    "subscribe": ".default",
    "unsubscribe": ".default",
    "Inbox": ".inbox",
}
_EXTRAS = {
    ".providers.database": "postgres",
    ".providers.redis": "redis",
    ".providers.nats": "nats",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'sqlalchemy_eventbroker' has no attribute {name!r}")
    try:
        module = import_module(module_name, __name__)
    except ImportError as exc:
        extra = _EXTRAS.get(module_name)
        if extra is None:
            raise
        raise ImportError(
            f"{name} needs an optional dependency ({exc.name}): "
            f"pip install 'sqlalchemy-eventbroker[{extra}]'"
        ) from exc
    value = getattr(module, name)
    globals()[name] = value
    return value


__all__ = sorted([
    "Broker", "BrokerError", "BrokerStats", "BrokerStopped", "ConfigError", "CRUDHookConfig",
    "DatabaseProvider", "Event", "EventBrokerConfig", "EventFilter", "EventSource",
    "EventStatus", "EventStream", "EventValidationError", "HandlerError", "Inbox", "MemoryProvider",
    "NatsProvider", "PatternError", "PayloadError", "ProcessingMode", "Provider",
    "ProviderError", "ProviderStats", "PublishDepthExceeded", "QueueFull", "RedisProvider", "RetryPolicy",
    "SubscriptionID", "SubscriptionNotFound", "compile_pattern", "event_context", "event_type",
    "get_default_broker", "initialize", "is_initialized", "load_config", "matches",
    "new_event", "publish", "publish_async", "publish_sync", "register_crud_hooks",
    "register_shutdown", "set_default_broker", "shutdown", "start_metrics_server", "stats",
    "subscribe", "unsubscribe",
])
