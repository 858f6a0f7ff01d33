"""The public surface: everything API.md names is importable from the top-level package."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sqlalchemy_eventbroker as eb

#: Every public name API.md promises at the top level.
API_NAMES = {
    "Event", "EventSource", "EventStatus", "event_type", "new_event",
    "matches", "compile_pattern",
    "Broker", "BrokerStats", "ProcessingMode", "MemoryProvider", "RetryPolicy",
    "SubscriptionID",
    "BrokerError", "BrokerStopped", "QueueFull", "PatternError", "PayloadError",
    "EventValidationError", "SubscriptionNotFound", "HandlerError", "ConfigError",
    "ProviderError",
    "Provider", "EventFilter", "ProviderStats", "EventStream",
    "DatabaseProvider", "RedisProvider", "NatsProvider",
    "register_crud_hooks", "CRUDHookConfig", "event_context",
    "load_config", "EventBrokerConfig",
    "initialize", "is_initialized", "get_default_broker", "set_default_broker", "publish",
    "publish_sync", "publish_async", "subscribe", "unsubscribe", "stats", "shutdown",
    "register_shutdown",
    "start_metrics_server",
}


def test_all__lists_every_api_name() -> None:
    """__all__ holds every name of the API contract, sorted, without duplicates."""
    assert API_NAMES <= set(eb.__all__)
    assert list(eb.__all__) == sorted(eb.__all__)
    assert len(set(eb.__all__)) == len(eb.__all__)


@pytest.mark.parametrize("name", sorted(API_NAMES))
def test_all__every_name_resolves(name: str) -> None:
    """Each exported name, lazy ones included, resolves to a real object."""
    assert getattr(eb, name) is not None


def test_import__needs_no_extra() -> None:
    """Importing the package loads none of the optional drivers."""
    code = (
        "import sys, sqlalchemy_eventbroker\n"
        "loaded = [m for m in ('psycopg', 'redis', 'nats') if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_getattr__unknown_name_raises_attribute_error() -> None:
    """A name that is not exported raises AttributeError naming it."""
    with pytest.raises(AttributeError, match="no_such_thing"):
        eb.no_such_thing  # noqa: B018


def test_subscription_id__is_what_subscribe_returns() -> None:
    """``SubscriptionID`` (API.md section 3) is importable and is the ``str`` alias that
    ``subscribe`` returns."""
    from sqlalchemy_eventbroker import Broker, SubscriptionID

    assert SubscriptionID is str
    with Broker(mode="sync") as broker:
        sid = broker.subscribe("*", lambda e: None)
        assert isinstance(sid, SubscriptionID) and sid
