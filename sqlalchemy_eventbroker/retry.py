"""Retry timing: capped exponential backoff. Pure, no I/O."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often, and after how long, a failing handler is tried again.

    Retry ``n`` (n >= 1) waits ``min(initial_delay * backoff_factor ** (n - 1), max_delay)``
    seconds. With ``jitter`` (off by default) each delay is drawn uniformly from
    ``[delay / 2, delay]`` so that many failing handlers do not retry in lockstep.
    """

    #: Retries after the first attempt; 0 means a failure is final at once.
    max_retries: int = 3
    #: Delay before the first retry, seconds.
    initial_delay: float = 1.0
    #: Cap on any one delay, seconds.
    max_delay: float = 30.0
    #: Growth of the delay from one retry to the next.
    backoff_factor: float = 2.0
    #: Randomise delays (see above).
    jitter: bool = False

    def __init__(
        self,
        max_retries: int = 3,
        initial_delay: float = 1.0,
        max_delay: float = 30.0,
        backoff_factor: float = 2.0,
        *,
        jitter: bool = False,
    ) -> None:
        # Positional arguments are part of the public contract, so no kw_only __init__.
        object.__setattr__(self, "max_retries", max_retries)
        object.__setattr__(self, "initial_delay", initial_delay)
        object.__setattr__(self, "max_delay", max_delay)
        object.__setattr__(self, "backoff_factor", backoff_factor)
        object.__setattr__(self, "jitter", jitter)
        self.__post_init__()

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) \
                or self.max_retries < 0:
            raise ConfigError(
                f"retry_policy.max_retries: expected int >= 0, got {self.max_retries!r}",
                path="retry_policy.max_retries",
            )
        for name in ("initial_delay", "max_delay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or v < 0:
                raise ConfigError(
                    f"retry_policy.{name}: expected a finite number of seconds >= 0, got {v!r}",
                    path=f"retry_policy.{name}",
                )
        factor = self.backoff_factor
        if isinstance(factor, bool) or not isinstance(factor, int | float) \
                or not math.isfinite(factor) or factor < 1:
            raise ConfigError(
                "retry_policy.backoff_factor: expected a finite number >= 1, "
                f"got {self.backoff_factor!r}",
                path="retry_policy.backoff_factor",
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        if attempt < 1:
            return 0.0
        try:
            d = self.initial_delay * self.backoff_factor ** (attempt - 1)
        except OverflowError:
            d = self.max_delay
        d = min(d, self.max_delay)
        if self.jitter:
            d = random.uniform(d / 2, d)
        return d
