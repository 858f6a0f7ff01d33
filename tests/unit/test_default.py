"""The process-wide default broker: initialize/shutdown, module functions, shutdown hooks."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sqlalchemy_eventbroker import default
from sqlalchemy_eventbroker.broker import Broker
from sqlalchemy_eventbroker.config import EventBrokerConfig
from sqlalchemy_eventbroker.errors import (
    BrokerError,
    BrokerStopped,
    ConfigError,
    SubscriptionNotFound,
)
from sqlalchemy_eventbroker.event import Event, new_event
from sqlalchemy_eventbroker.providers.memory import MemoryProvider


@pytest.fixture(autouse=True)
def clean_default() -> Iterator[None]:
    """Every test starts and ends without a default broker or shutdown hooks."""
    default.shutdown(timeout=5)
    default._reset_shutdown_hooks()
    yield
    default.shutdown(timeout=5)
    default._reset_shutdown_hooks()


def sync_config(**kw: Any) -> EventBrokerConfig:
    return EventBrokerConfig(mode="sync", instance_id="test", **kw)


# -- initialize ------------------------------------------------------------------------------


def test_initialize__config_object_starts_broker() -> None:
    """initialize(EventBrokerConfig) builds, starts and installs the broker it returns."""
    broker = default.initialize(EventBrokerConfig(worker_count=2, buffer_size=50,
                                                  instance_id="api-1"))
    assert isinstance(broker, Broker)
    assert broker.is_running and default.is_initialized()
    assert default.get_default_broker() is broker
    assert (broker.mode.value, broker.worker_count, broker.buffer_size, broker.instance_id) == (
        "async", 2, 50, "api-1")
    assert isinstance(broker.provider, MemoryProvider)


def test_initialize__passes_retry_policy_and_memory_options() -> None:
    """The retry policy and memory section reach the broker and provider."""
    broker = default.initialize({"retry_policy": {"max_retries": 7, "initial_delay": "10ms"},
                                 "memory": {"max_events": 42}})
    assert broker is not None
    assert broker.retry_policy.max_retries == 7
    assert broker.retry_policy.initial_delay == 0.01
    assert broker.provider.stats().provider_specific["max_events"] == 42


def test_initialize__dict() -> None:
    """A dict is loaded as a configuration."""
    broker = default.initialize({"event_broker": {"mode": "sync"}})
    assert broker is not None and broker.mode.value == "sync"


def test_initialize__yaml_text() -> None:
    """YAML text is loaded as a configuration."""
    broker = default.initialize("mode: sync\ninstance_id: from-yaml\n")
    assert broker is not None and broker.instance_id == "from-yaml"


def test_initialize__yaml_path(tmp_path: pathlib.Path) -> None:
    """A path is loaded as a YAML file."""
    path = tmp_path / "eb.yaml"
    path.write_text("event_broker:\n  instance_id: from-file\n")
    broker = default.initialize(path)
    assert broker is not None and broker.instance_id == "from-file"


def test_initialize__none_means_defaults() -> None:
    """initialize() with no config uses the defaults: memory provider, async, host name."""
    broker = default.initialize()
    assert broker is not None
    assert broker.mode.value == "async" and broker.worker_count == 10
    assert broker.instance_id  # the host name


def test_initialize__twice_refused() -> None:
    """A second initialize while the default broker runs raises, leaving the first in place."""
    first = default.initialize(sync_config())
    with pytest.raises(BrokerError, match="already initialized"):
        default.initialize(sync_config())
    assert default.get_default_broker() is first and first is not None and first.is_running


def test_initialize__again_after_shutdown() -> None:
    """After shutdown(), initialize works again and gives a new broker."""
    first = default.initialize(sync_config())
    default.shutdown()
    second = default.initialize(sync_config())
    assert second is not first and second is not None and second.is_running


def test_initialize__bad_config_leaves_nothing() -> None:
    """A ConfigError from initialize leaves no default broker."""
    with pytest.raises(ConfigError, match="event_broker.worker_count"):
        default.initialize({"worker_count": 0})
    assert not default.is_initialized()
    with pytest.raises(BrokerStopped):
        default.get_default_broker()


def test_initialize__concurrent_calls_make_one_broker() -> None:
    """Of many threads calling initialize at once, exactly one wins; the others are refused."""
    barrier = threading.Barrier(8)
    results: list[object] = []
    lock = threading.Lock()

    def call() -> None:
        barrier.wait()
        try:
            outcome: object = default.initialize(sync_config())
        except BrokerError as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    brokers = [r for r in results if isinstance(r, Broker)]
    assert len(results) == 8 and len(brokers) == 1
    assert default.get_default_broker() is brokers[0]


def test_initialize__metrics_server_started_and_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.enabled starts the metrics server; shutdown stops it."""
    calls: list[tuple[Any, ...]] = []
    from sqlalchemy_eventbroker import metrics

    def fake_server(port: int, addr: str = "127.0.0.1") -> Any:
        calls.append(("start", port, addr))
        return lambda: calls.append(("stop",))

    monkeypatch.setattr(metrics, "start_metrics_server", fake_server)
    default.initialize(sync_config(metrics={"enabled": True, "port": 9999}))
    assert calls == [("start", 9999, "127.0.0.1")]
    default.shutdown()
    assert calls == [("start", 9999, "127.0.0.1"), ("stop",)]


# -- disabled ----------------------------------------------------------------------------------


def test_disabled__initialize_returns_none() -> None:
    """enabled: false builds nothing; is_initialized is False."""
    assert default.initialize({"enabled": False}) is None
    assert not default.is_initialized()


def test_disabled__publish_dropped() -> None:
    """When disabled, the module-level publish functions drop events without error."""
    default.initialize({"enabled": False})
    event = new_event("system", "a.b")
    default.publish(event)
    default.publish_sync(event)
    default.publish_async(event)


def test_disabled__get_and_subscribe_say_disabled() -> None:
    """When disabled, get_default_broker and subscribe raise BrokerStopped saying so."""
    default.initialize({"enabled": False})
    with pytest.raises(BrokerStopped, match="disabled by configuration"):
        default.get_default_broker()
    with pytest.raises(BrokerStopped, match="disabled"):
        default.subscribe("*", print)


def test_disabled__shutdown_clears() -> None:
    """shutdown() after a disabled initialize returns to the uninitialized state."""
    default.initialize({"enabled": False})
    default.shutdown()
    with pytest.raises(BrokerStopped, match="initialize"):
        default.publish(new_event("system", "a.b"))


# -- without a broker --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: default.get_default_broker(),
        lambda: default.publish(new_event("system", "a.b")),
        lambda: default.publish_sync(new_event("system", "a.b")),
        lambda: default.publish_async(new_event("system", "a.b")),
        lambda: default.subscribe("*", print),
        lambda: default.unsubscribe("x"),
        lambda: default.stats(),
    ],
    ids=["get", "publish", "publish_sync", "publish_async", "subscribe", "unsubscribe", "stats"],
)
def test_uninitialized__raises_broker_stopped(call: Any) -> None:
    """Without a default broker every module function raises BrokerStopped naming initialize."""
    with pytest.raises(BrokerStopped, match=r"initialize\(config\)"):
        call()
    assert not default.is_initialized()


# -- module functions --------------------------------------------------------------------------


def test_module_functions__sync_round_trip() -> None:
    """subscribe/publish/publish_sync/unsubscribe/stats go to the default broker."""
    default.initialize(sync_config())
    seen: list[Event] = []
    sub = default.subscribe("public.users.*", seen.append)
    default.publish(new_event("database", "public.users.create", {"id": 1}))
    default.publish_sync(new_event("database", "public.users.update", {"id": 1}))
    default.publish(new_event("database", "public.orders.create"))
    assert [e.type for e in seen] == ["public.users.create", "public.users.update"]
    assert seen[0].instance_id == "test"
    s = default.stats()
    assert (s.total_published, s.active_subscribers, s.instance_id) == (3, 1, "test")
    default.unsubscribe(sub)
    default.publish(new_event("database", "public.users.delete"))
    assert len(seen) == 2
    with pytest.raises(SubscriptionNotFound):
        default.unsubscribe(sub)


def test_module_functions__publish_async() -> None:
    """publish_async on the default broker runs the handler on a worker."""
    default.initialize(EventBrokerConfig(worker_count=2))
    done = threading.Event()
    threads: list[str] = []

    def handler(event: Event) -> None:
        threads.append(threading.current_thread().name)
        done.set()

    default.subscribe("a.*", handler)
    default.publish_async(new_event("system", "a.b"))
    assert done.wait(10)
    assert threads[0] != threading.current_thread().name


def test_module_functions__subscribe_group() -> None:
    """subscribe passes group= through."""
    default.initialize(sync_config())
    sub = default.subscribe("a.*", print, group="g", lease=5.0)
    assert isinstance(sub, str) and sub


# -- shutdown ----------------------------------------------------------------------------------


def test_shutdown__flushes_queued_async_events() -> None:
    """shutdown() returns only after every accepted async event was handled."""
    broker = default.initialize(EventBrokerConfig(worker_count=2, buffer_size=100))
    assert broker is not None
    gate = threading.Event()
    handled: list[int] = []
    lock = threading.Lock()

    def handler(event: Event) -> None:
        gate.wait(10)
        with lock:
            handled.append(event.payload["i"])  # type: ignore[index,call-overload]

    default.subscribe("work.*", handler)
    for i in range(50):
        default.publish_async(new_event("system", "work.item", {"i": i}))
    assert broker.stats().queue_size > 0
    gate.set()
    default.shutdown(timeout=10)
    assert sorted(handled) == list(range(50))
    assert not broker.is_running and not default.is_initialized()


def test_shutdown__idempotent_and_safe_without_broker() -> None:
    """shutdown() twice, or with nothing initialized, is harmless."""
    default.shutdown()
    default.initialize(sync_config())
    default.shutdown()
    default.shutdown()
    assert not default.is_initialized()


def test_shutdown__stops_broker_set_by_hand() -> None:
    """shutdown() stops whatever the default broker is, also one installed with set_default."""
    broker = Broker(mode="sync").start()
    default.set_default_broker(broker)
    default.shutdown()
    assert not broker.is_running


def test_is_initialized__false_when_default_broker_stopped() -> None:
    """is_initialized() is False once the default broker was stopped, even if still set."""
    broker = default.initialize(sync_config())
    assert broker is not None
    broker.stop()
    assert not default.is_initialized()
    assert default.get_default_broker() is broker
    assert default.initialize(sync_config()) is not broker  # a stopped one may be replaced


# -- set_default_broker ------------------------------------------------------------------------


def test_set_default_broker__returns_previous() -> None:
    """set_default_broker installs a broker and returns the previous (left running)."""
    first = Broker(mode="sync").start()
    second = Broker(mode="sync").start()
    try:
        assert default.set_default_broker(first) is None
        assert default.set_default_broker(second) is first
        assert default.get_default_broker() is second and first.is_running
        assert default.set_default_broker(None) is second
        with pytest.raises(BrokerStopped):
            default.get_default_broker()
    finally:
        first.stop()
        second.stop()


def test_set_default_broker__not_started_is_installed_as_is() -> None:
    """A broker that was not started is installed unstarted; publishing says it is stopped."""
    broker = Broker(mode="sync")
    default.set_default_broker(broker)
    assert not default.is_initialized()
    with pytest.raises(BrokerStopped):
        default.publish(new_event("system", "a.b"))


def test_set_default_broker__rejects_other_objects() -> None:
    """Only a Broker (or None) can be the default."""
    with pytest.raises(TypeError, match="expected a Broker"):
        default.set_default_broker("broker")  # type: ignore[arg-type]


def test_set_default_broker__clears_disabled() -> None:
    """Installing a broker by hand ends the disabled state."""
    default.initialize({"enabled": False})
    broker = Broker(mode="sync").start()
    default.set_default_broker(broker)
    seen: list[Event] = []
    default.subscribe("*", seen.append)
    default.publish(new_event("system", "a.b"))
    assert len(seen) == 1


# -- register_shutdown, in process -------------------------------------------------------------


def test_register_shutdown__exit_hook_stops_broker() -> None:
    """The registered exit hook stops the broker (run here by hand, as atexit would)."""
    broker = Broker(mode="sync").start()
    default.register_shutdown(broker, signals=())
    default._run_hooks()
    assert not broker.is_running


def test_register_shutdown__default_target_follows_default_broker() -> None:
    """register_shutdown() with no broker stops the default broker of the moment."""
    default.register_shutdown(signals=())
    broker = default.initialize(sync_config())
    assert broker is not None
    default._run_hooks()
    assert not broker.is_running and not default.is_initialized()


def test_register_shutdown__non_main_thread_refused() -> None:
    """Installing signal handlers from another thread raises RuntimeError; signals=() works."""
    outcome: list[object] = []

    def call() -> None:
        try:
            default.register_shutdown(Broker(mode="sync"))
            outcome.append("installed")
        except RuntimeError as exc:
            outcome.append(exc)
        default.register_shutdown(Broker(mode="sync"), signals=())
        outcome.append("exit hook only")

    t = threading.Thread(target=call)
    t.start()
    t.join(10)
    assert isinstance(outcome[0], RuntimeError) and "main thread" in str(outcome[0])
    assert outcome[1] == "exit hook only"


def test_register_shutdown__signal_chains_to_previous_python_handler() -> None:
    """On the signal, the broker is stopped first, then the handler that was there before runs."""
    order: list[str] = []
    broker = Broker(mode="sync").start()
    original = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, lambda signum, frame: order.append(
        f"previous running={broker.is_running}"))
    try:
        default.register_shutdown(broker, signals=[signal.SIGUSR1])
        assert signal.getsignal(signal.SIGUSR1) is default._on_signal
        signal.raise_signal(signal.SIGUSR1)
        assert order == ["previous running=False"]
    finally:
        default._reset_shutdown_hooks()
        assert signal.getsignal(signal.SIGUSR1) is not default._on_signal
        signal.signal(signal.SIGUSR1, original)


def test_register_shutdown__ignored_signal_stays_ignored() -> None:
    """A signal that was ignored before is still ignored after the flush."""
    broker = Broker(mode="sync").start()
    original = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        default.register_shutdown(broker, signals=[signal.SIGUSR2])
        signal.raise_signal(signal.SIGUSR2)  # would end the process if not ignored
        assert not broker.is_running
    finally:
        default._reset_shutdown_hooks()
        signal.signal(signal.SIGUSR2, original)


def test_register_shutdown__twice_installs_once() -> None:
    """Registering twice keeps one handler per signal, whose 'previous' is the original."""
    original = signal.getsignal(signal.SIGUSR1)
    try:
        default.register_shutdown(Broker(mode="sync"), signals=[signal.SIGUSR1])
        default.register_shutdown(Broker(mode="sync"), signals=[signal.SIGUSR1])
        assert default._previous[signal.SIGUSR1] == original
    finally:
        default._reset_shutdown_hooks()
    assert signal.getsignal(signal.SIGUSR1) == original


# -- register_shutdown, in a child process ------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from sqlalchemy_eventbroker import default
    from sqlalchemy_eventbroker.event import new_event

    N, how = int(sys.argv[1]), sys.argv[2]
    default.initialize({"worker_count": 2, "buffer_size": N, "instance_id": "child"})

    def handler(event):
        time.sleep(0.005)  # simulated work, so that events are still queued at the signal
        # One os.write per line: print() writes text and newline separately, and lines of
        # different threads would interleave.
        os.write(1, b"handled %d\\n" % event.payload["i"])

    default.subscribe("work.*", handler)
    if how == "previous":
        def previous(signum, frame):
            os.write(1, b"previous handler\\n")
            sys.exit(3)
        signal.signal(signal.SIGTERM, previous)
    if how != "exit":
        default.register_shutdown()
    for i in range(N):
        default.publish_async(new_event("system", "work.item", {"i": i}))
    os.write(1, b"published queued=%d\\n" % default.stats().queue_size)
    if how == "exit":
        sys.exit(0)  # the exit hook that initialize() registered must flush
    # Wait in slices, as servers do (select with a timeout): CPython runs a Python signal
    # handler only when the main thread runs bytecode, and a signal that lands just before a
    # long lock wait starts would otherwise wait for the whole wait (not this library's doing).
    for _ in range(600):
        time.sleep(0.1)
    os.write(1, b"no signal came\\n")
    """
)


def run_child(tmp_path: pathlib.Path, how: str, sig: int | None, n: int = 200) -> tuple[
        int, list[str], str]:
    """Run CHILD; after its "published" line send ``sig``; return status, stdout lines, stderr."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # Unbuffered, so reading up to "published" reads no further: communicate() below reads
    # the pipe itself and would never see lines sitting in a read-ahead buffer.
    proc = subprocess.Popen(
        [sys.executable, str(script), str(n), how],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while True:  # the child blocks after "published" until signalled (or exits)
            line = proc.stdout.readline().decode()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith("published"):
                break
        if sig is not None:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += out.decode().splitlines()
    return proc.returncode, lines, err.decode()


def check_all_handled(lines: list[str], n: int) -> None:
    published = [line for line in lines if line.startswith("published")]
    assert published, lines
    assert int(published[0].split("=")[1]) > 0  # there was a backlog to flush
    handled = [int(line.split()[1]) for line in lines if line.startswith("handled")]
    assert sorted(handled) == list(range(n))


def test_register_shutdown__sigterm_flushes_then_dies_by_signal(tmp_path: pathlib.Path) -> None:
    """SIGTERM: every queued event is handled, then the process ends as killed by SIGTERM."""
    rc, lines, err = run_child(tmp_path, "default", signal.SIGTERM)
    check_all_handled(lines, 200)
    assert rc == -signal.SIGTERM, err
    assert "no signal came" not in lines


def test_register_shutdown__sigint_flushes_then_keyboard_interrupt(tmp_path: pathlib.Path) -> None:
    """SIGINT: every queued event is handled, then KeyboardInterrupt ends the program."""
    rc, lines, err = run_child(tmp_path, "default", signal.SIGINT)
    check_all_handled(lines, 200)
    assert "KeyboardInterrupt" in err
    assert rc in (-signal.SIGINT, 1, 130), err


def test_register_shutdown__sigterm_then_previous_handler(tmp_path: pathlib.Path) -> None:
    """SIGTERM with an application handler: flush first, then the application's handler."""
    rc, lines, err = run_child(tmp_path, "previous", signal.SIGTERM)
    check_all_handled(lines, 200)
    assert lines[-1] == "previous handler"
    assert rc == 3, err


def test_initialize__exit_hook_flushes_at_normal_exit(tmp_path: pathlib.Path) -> None:
    """A program that just ends after publish_async still gets every event handled."""
    rc, lines, err = run_child(tmp_path, "exit", None)
    check_all_handled(lines, 200)
    assert rc == 0, err
