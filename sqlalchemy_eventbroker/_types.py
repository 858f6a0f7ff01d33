"""Type aliases shared across the package."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from .event import Event

__all__ = ["JSON", "Handler", "SubscriptionID"]

#: Any value JSON can hold.
JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None

#: A subscriber: a plain or ``async def`` callable taking the event.
Handler: TypeAlias = Callable[["Event"], "object | Awaitable[object]"]

#: The opaque, non-empty id that ``subscribe`` returns.
SubscriptionID: TypeAlias = str
