"""The conformance suite on ``MemoryProvider``: one object is the whole bus."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sqlalchemy_eventbroker.providers.memory import MemoryProvider

from .conformance import ProviderConformance, ProviderFactory


class TestMemoryProvider(ProviderConformance):
    #: Everything lives in the provider object: nothing survives closing it.
    durable_across_restart = False
    #: Brokers share the bus by sharing the object, so the factory hands out that one object.
    separate_instances = False

    @pytest.fixture
    def provider_factory(self) -> Iterator[ProviderFactory]:
        shared = MemoryProvider()
        closed: list[MemoryProvider] = [shared]

        def make() -> MemoryProvider:
            nonlocal shared
            if shared._closed:  # a test closed it on purpose: a "restart" gets a fresh one
                shared = MemoryProvider()
                closed.append(shared)
            return shared

        yield make
        for p in closed:
            p.close()
