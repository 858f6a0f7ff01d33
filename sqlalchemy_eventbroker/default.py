"""The process-wide default broker and the module-level functions over it.

::

    import sqlalchemy_eventbroker as eb

    eb.initialize("eventbroker.yaml")       # or an EventBrokerConfig, a dict, YAML text
    eb.register_shutdown()                  # flush on SIGTERM/SIGINT (main thread only)
    eb.subscribe("public.users.*", handler)
    eb.publish(event)
    eb.shutdown()

Rules (all thread-safe; one lock guards the state):

* ``initialize(config)`` builds the provider and a :class:`Broker` from the configuration,
  starts it, makes it the default and returns it. It refuses (``BrokerError``) while a
  running default broker exists: call :func:`shutdown` first. It also registers an
  interpreter-exit hook that calls :func:`shutdown`, so queued async events are flushed when
  the program ends normally. Signal handlers are *not* installed by ``initialize``: call
  :func:`register_shutdown` for that.
* With ``enabled: false``, ``initialize`` builds nothing and returns ``None``; the module-level
  ``publish``/``publish_sync``/``publish_async`` then drop events silently (the library is
  switched off), while ``get_default_broker``, ``subscribe``, ``unsubscribe`` and ``stats``
  raise ``BrokerStopped`` saying the broker is disabled.
* Without a default broker, ``get_default_broker()`` and every module-level function raise
  :class:`~sqlalchemy_eventbroker.errors.BrokerStopped` with a message saying to call
  ``initialize``: the same error a stopped broker gives, so one ``except`` covers both.
* ``set_default_broker(broker)`` installs a broker you built (as it is: it is not started) and
  returns the previous one, which is left running. ``shutdown()`` stops whatever the default
  broker is, whoever built it, and forgets it; it is idempotent.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

from ._types import Handler, SubscriptionID
from .broker import Broker, BrokerStats
from .config import EventBrokerConfig, build_provider, load_config
from .errors import BrokerError, BrokerStopped
from .event import Event

__all__ = [
    "get_default_broker",
    "initialize",
    "is_initialized",
    "publish",
    "publish_async",
    "publish_sync",
    "register_shutdown",
    "set_default_broker",
    "shutdown",
    "stats",
    "subscribe",
    "unsubscribe",
]

log = logging.getLogger(__name__)

# Re-entrant: a signal handler runs in the main thread and may interrupt code holding it.
_lock = threading.RLock()
_broker: Broker | None = None
_disabled = False
_stop_metrics: Callable[[], None] | None = None
_atexit_installed = False

ConfigSource = EventBrokerConfig | Mapping[str, Any] | str | os.PathLike[str]


def initialize(config: ConfigSource | None = None) -> Broker | None:
    """Build, start and install the default broker from ``config``.

    Args:
        config: an :class:`EventBrokerConfig`, or anything :func:`load_config` takes (a YAML
            file path, YAML text, a mapping), or ``None`` for the defaults (memory provider,
            async mode).

    Returns:
        The started broker, or ``None`` when the configuration says ``enabled: false``.

    Raises:
        ConfigError: the configuration is wrong, or its provider's extra is not installed.
        ProviderError: the provider's backend cannot be reached.
        BrokerError: a running default broker already exists; call ``shutdown()`` first.
    """
    global _broker, _disabled, _stop_metrics
    cfg = load_config(config) if config is not None else EventBrokerConfig()
    with _lock:
        if _broker is not None and _broker.is_running:
            raise BrokerError(
                "the default broker is already initialized; call shutdown() before "
                "initialize() again"
            )
        if not cfg.enabled:
            _broker, _disabled = None, True
            log.info("eventbroker: disabled by configuration (enabled: false)")
            return None
        provider = build_provider(cfg)
        try:
            broker = Broker(
                provider=provider,
                mode=cfg.mode,
                worker_count=cfg.worker_count,
                buffer_size=cfg.buffer_size,
                retry_policy=cfg.retry_policy,
                instance_id=cfg.instance_id or None,
                close_provider=True,
            )
            broker.start()
        except BaseException:
            _close_quietly(provider)
            raise
        if cfg.metrics.enabled:
            from .metrics import start_metrics_server

            try:
                _stop_metrics = start_metrics_server(cfg.metrics.port, cfg.metrics.addr)
            except BaseException:
                broker.stop(timeout=1.0)
                raise
        _broker, _disabled = broker, False
        _install_atexit()
        return broker


def is_initialized() -> bool:
    """Whether a default broker is installed and running."""
    with _lock:
        return _broker is not None and _broker.is_running


def get_default_broker() -> Broker:
    """The default broker (running or not).

    Raises:
        BrokerStopped: there is none (``initialize`` was not called, or ``shutdown`` was), or
            the configuration disabled it.
    """
    broker = _broker
    if broker is not None:
        return broker
    with _lock:
        if _broker is not None:
            return _broker
        if _disabled:
            raise BrokerStopped(
                "the default event broker is disabled by configuration (enabled: false)"
            )
        raise BrokerStopped(
            "no default event broker: call sqlalchemy_eventbroker.initialize(config) or "
            "set_default_broker(broker) first"
        )


def set_default_broker(broker: Broker | None) -> Broker | None:
    """Make ``broker`` the default (``None`` clears it) and return the previous default.

    The broker is installed as it is (start it yourself); the previous one is neither
    stopped nor closed.
    """
    global _broker, _disabled
    if broker is not None and not isinstance(broker, Broker):
        raise TypeError(f"expected a Broker or None, got {type(broker).__name__}")
    with _lock:
        previous, _broker, _disabled = _broker, broker, False
        return previous


def shutdown(timeout: float = 10.0) -> None:
    """Stop the default broker, flushing queued events for up to ``timeout`` seconds, and
    forget it. Stops the metrics server ``initialize`` started. Idempotent; never raises for
    a broker that is already stopped.
    """
    global _broker, _disabled, _stop_metrics
    with _lock:
        broker, _broker, _disabled = _broker, None, False
        stop_metrics, _stop_metrics = _stop_metrics, None
    if broker is not None:
        broker.stop(timeout=timeout)
    if stop_metrics is not None:
        try:
            stop_metrics()
        except Exception:  # pragma: no cover - best effort at shutdown
            log.exception("eventbroker: stopping the metrics server failed")


# -- module-level broker operations ------------------------------------------------------------


def publish(event: Event) -> None:
    """``get_default_broker().publish(event)``; dropped when the broker is disabled."""
    if _disabled:
        return
    get_default_broker().publish(event)


def publish_sync(event: Event) -> None:
    """``get_default_broker().publish_sync(event)``; dropped when the broker is disabled."""
    if _disabled:
        return
    get_default_broker().publish_sync(event)


def publish_async(event: Event) -> None:
    """``get_default_broker().publish_async(event)``; dropped when the broker is disabled."""
    if _disabled:
        return
    get_default_broker().publish_async(event)


def subscribe(
    pattern: str, handler: Handler, *, group: str | None = None, lease: float = 30.0
) -> SubscriptionID:
    """``get_default_broker().subscribe(pattern, handler, group=group, lease=lease)``."""
    return get_default_broker().subscribe(pattern, handler, group=group, lease=lease)


def unsubscribe(subscription_id: SubscriptionID) -> None:
    """``get_default_broker().unsubscribe(subscription_id)``."""
    get_default_broker().unsubscribe(subscription_id)


def stats() -> BrokerStats:
    """``get_default_broker().stats()``."""
    return get_default_broker().stats()


# -- stopping at exit and on signals -----------------------------------------------------------

#: Stands for "whatever the default broker is when the hook runs".
_DEFAULT: Any = object()

#: Brokers (or ``_DEFAULT``) to stop, with the timeout each was registered with.
_targets: dict[int, tuple[Any, float]] = {}
#: Signal number -> the handler that was installed before ours.
_previous: dict[int, Any] = {}
_hooks_ran = False
_atexit_registered = False


def register_shutdown(
    broker: Broker | None = None,
    *,
    timeout: float = 10.0,
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Stop ``broker`` at interpreter exit and on ``signals``, flushing its queued events.

    Args:
        broker: the broker to stop; ``None`` means the default broker at the time the hook
            runs (via :func:`shutdown`).
        timeout: seconds ``stop`` may spend flushing.
        signals: signals to handle; ``()`` installs only the exit hook.

    On a signal, the handler stops every registered broker (each flushes what it queued),
    then hands the signal on to what was there before: a Python handler is called (for SIGINT
    that is the one raising ``KeyboardInterrupt``), an ignored signal stays ignored, and the
    default action is restored and the signal raised again, so the process ends as it would
    have (SIGTERM: killed by the signal). A second signal during the flush skips the flush and
    goes straight to the previous behaviour. Registering a broker twice is harmless; handlers
    are installed once per signal.

    Signal handlers can only be installed from the main thread (a CPython rule); from another
    thread pass ``signals=()``. CPython runs them when the main thread next executes Python
    code: a main thread parked in one long ``Event.wait()``/``Lock.acquire(timeout=...)`` may
    see a signal that arrived just as the wait began only when the wait ends, so park it in
    slices (``while True: time.sleep(1)``) or in ``signal.pause()``. The library's own threads
    block these signals, so the kernel always delivers them to the main thread.

    Raises:
        RuntimeError: ``signals`` is not empty and this is not the main thread.
    """
    global _atexit_registered
    wanted = [signal.Signals(s) for s in signals]
    if wanted and threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "register_shutdown() installs signal handlers, which only the main thread can do; "
            "call it from the main thread, or pass signals=() for the exit hook alone"
        )
    target = _DEFAULT if broker is None else broker
    with _lock:
        _targets[id(target)] = (target, timeout)
        if not _atexit_registered:
            atexit.register(_run_hooks)
            _atexit_registered = True
        for sig in wanted:
            if sig not in _previous:
                _previous[sig] = signal.signal(sig, _on_signal)


def _run_hooks() -> None:
    """Stop every registered broker, once."""
    global _hooks_ran
    with _lock:
        if _hooks_ran:
            return
        _hooks_ran = True
        targets = list(_targets.values())
    for target, timeout in targets:
        try:
            if target is _DEFAULT:
                shutdown(timeout)
            else:
                target.stop(timeout=timeout)
        except Exception:
            log.exception("eventbroker: stopping %r at shutdown failed", target)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if not _hooks_ran:
        log.info("eventbroker: signal %s, stopping brokers", signal.Signals(signum).name)
        _run_hooks()
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:
        # SIG_DFL, or None (a handler installed outside Python): behave as if we never were.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _reset_shutdown_hooks() -> None:
    """Restore the previous signal handlers and forget every registration (for tests)."""
    global _hooks_ran, _atexit_registered
    with _lock:
        for sig, previous in _previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        _previous.clear()
        _targets.clear()
        _hooks_ran = False
        if _atexit_registered:
            atexit.unregister(_run_hooks)
            _atexit_registered = False


def _install_atexit() -> None:
    global _atexit_installed
    if not _atexit_installed:
        atexit.register(_shutdown_at_exit)
        _atexit_installed = True


def _shutdown_at_exit() -> None:
    try:
        shutdown()
    except Exception:  # pragma: no cover - nothing left to tell at exit but the log
        log.exception("eventbroker: shutting down the default broker at exit failed")


def _close_quietly(obj: object) -> None:
    try:
        obj.close()  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover
        log.debug("eventbroker: closing %r failed", obj, exc_info=True)
