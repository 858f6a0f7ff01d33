"""The conformance suite on ``MemoryProvider``: one object is the whole bus.

It runs a second time on ``bus_provider(Section4Only(MemoryProvider()))``: a provider with
only API.md section 4's methods, as a third party writes one, served to the broker's contract
by the adapter in ``providers.base`` (batches as loops, origin skipping by id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sqlalchemy_eventbroker.providers.base import (
    BusProvider,
    Provider,
    bus_provider,
)
from sqlalchemy_eventbroker.providers.memory import MemoryProvider

from .._section4 import Section4Only
from .conformance import ProviderConformance, ProviderFactory


def _shared_memory() -> tuple[Callable[[], MemoryProvider], list[MemoryProvider]]:
    """A maker handing out one ``MemoryProvider`` until a test closes it (a "restart" then
    gets a fresh one), and the list of every one made, for the teardown."""
    made = [MemoryProvider()]

    def make() -> MemoryProvider:
        if made[-1]._closed:
            made.append(MemoryProvider())
        return made[-1]

    return make, made


class TestMemoryProvider(ProviderConformance):
    #: Everything lives in the provider object: nothing survives closing it.
    durable_across_restart = False
    #: Brokers share the bus by sharing the object, so the factory hands out that one object.
    separate_instances = False

    @pytest.fixture
    def provider_factory(self) -> Iterator[ProviderFactory]:
        make, made = _shared_memory()
        yield make
        for p in made:
            p.close()


class TestSectionFourAdapter(TestMemoryProvider):
    """The whole suite through ``bus_provider`` over a section-4-only provider (the same
    capabilities as the memory provider it wraps)."""

    @pytest.fixture
    def provider_factory(self) -> Iterator[ProviderFactory]:
        make_memory, made = _shared_memory()
        adapted: dict[int, BusProvider] = {}

        def make() -> BusProvider:
            # One adapter per bus object, as each broker adapts the provider it is given once.
            inner = make_memory()
            if id(inner) not in adapted:
                adapted[id(inner)] = bus_provider(Section4Only(inner))
            return adapted[id(inner)]

        yield make
        for p in made:
            p.close()

    def test_adapter__is_in_use(self, provider: BusProvider) -> None:
        """``Section4Only`` is a ``Provider`` but not a ``BusProvider``, so it is adapted."""
        inner = Section4Only(MemoryProvider())
        try:
            assert isinstance(inner, Provider) and not isinstance(inner, BusProvider)
            assert not isinstance(bus_provider(inner), Section4Only)
            assert not isinstance(provider, Section4Only)
            assert type(provider).in_process is False
        finally:
            inner.close()

    def test_adapter__passes_a_bus_provider_through(self) -> None:
        """A provider that already is a ``BusProvider`` is used as it is."""
        with MemoryProvider() as p:
            assert bus_provider(p) is p
