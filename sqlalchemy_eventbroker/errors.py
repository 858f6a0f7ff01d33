"""Every error this library raises on purpose.

::

    BrokerError                      .code = "broker_error"
    ├── BrokerStopped                publish before start() or after stop()
    ├── QueueFull                    the async queue is full; nothing happened
    ├── PatternError (ValueError)    a subscription pattern is malformed
    ├── PayloadError (TypeError)     a payload JSON cannot hold
    ├── EventValidationError (ValueError)
    ├── SubscriptionNotFound (LookupError)
    ├── HandlerError                 publish_sync: handlers failed after their retries
    ├── PublishDepthExceeded (RecursionError)  sync handlers publishing too deep; not retried
    ├── ConfigError (ValueError)     bad configuration, named by its key path
    └── ProviderError                the backend failed or is unreachable

Builtins are mixed in where users already catch them, so ``except ValueError`` around
configuration keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "BrokerError",
    "BrokerStopped",
    "ConfigError",
    "EventValidationError",
    "HandlerError",
    "PatternError",
    "PayloadError",
    "ProviderError",
    "PublishDepthExceeded",
    "QueueFull",
    "SubscriptionNotFound",
]


class BrokerError(Exception):
    """Base of every error this library raises on purpose."""

    code: ClassVar[str] = "broker_error"

    def __init__(self, message: str | None = None) -> None:
        # The docstring's first line is the default message, so a bare raise still says something.
        if message is None:
            message = (type(self).__doc__ or type(self).__name__).strip().splitlines()[0]
        super().__init__(message)
        self.message = message


class BrokerStopped(BrokerError):
    """The broker is not running: call start() first, or it was stopped."""

    code = "worker_pool_stopped"


class QueueFull(BrokerError):
    """The async queue holds buffer_size events; publish refuses instead of blocking."""

    code = "queue_full"


class PatternError(BrokerError, ValueError):
    """A subscription pattern is malformed."""

    code = "invalid_pattern"

    def __init__(self, message: str | None = None, *, pattern: str = "") -> None:
        super().__init__(message)
        self.pattern = pattern


class PayloadError(BrokerError, TypeError):
    """A payload holds a value that JSON cannot represent."""

    code = "invalid_payload"


class EventValidationError(BrokerError, ValueError):
    """An event is missing a required field or holds an invalid value."""

    code = "invalid_event"

    def __init__(self, message: str | None = None, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class SubscriptionNotFound(BrokerError, LookupError):
    """No subscription has this id (it was never made, or was already removed)."""

    code = "subscription_not_found"

    def __init__(self, message: str | None = None, *, subscription_id: str = "") -> None:
        super().__init__(message)
        self.subscription_id = subscription_id


class HandlerError(BrokerError):
    """One or more handlers still failed after their retries."""

    code = "handler_failed"

    def __init__(
        self,
        message: str | None = None,
        *,
        event_id: str = "",
        failures: Sequence[tuple[str, BaseException]] = (),
    ) -> None:
        super().__init__(message)
        self.event_id = event_id
        #: ``(subscription_id, exception)`` for each handler that exhausted its retries.
        self.failures: list[tuple[str, BaseException]] = list(failures)


class PublishDepthExceeded(BrokerError, RecursionError):
    """A sync-mode handler published, and its handlers published, deeper than the broker's
    ``max_publish_depth``: almost always a handler that publishes what it handles.

    Raised by the innermost ``publish_sync`` before anything is stored, it is never retried
    and travels up through every level unchanged, so the chain ends at once instead of
    growing with the retries of each level.
    """

    code = "publish_depth_exceeded"


class ConfigError(BrokerError, ValueError):
    """A configuration value is wrong or unknown."""

    code = "invalid_config"

    def __init__(self, message: str | None = None, *, path: str = "") -> None:
        super().__init__(message)
        #: The dotted key path of the offending value, e.g. ``event_broker.worker_count``.
        self.path = path


class ProviderError(BrokerError):
    """The provider's backend failed or cannot be reached."""

    code = "provider_error"
