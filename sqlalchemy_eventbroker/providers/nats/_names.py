"""Subjects and JetStream names: how event types and groups map onto NATS."""

from __future__ import annotations

import re

from ...pattern import validate_pattern

__all__ = ["BAD_SUBJECT", "safe_name", "subject_filter"]

#: What an event type or subject prefix must not contain: whitespace, wildcards, empty tokens.
BAD_SUBJECT = re.compile(r"[\s*>]|^\.|\.\.|\.$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")


def subject_filter(prefix: str, pattern: str) -> str:
    """The JetStream subject filter for a subscription ``pattern`` under ``prefix``."""
    validate_pattern(pattern)
    if pattern == "*":
        return f"{prefix}.>"
    return prefix + "." + ".".join(">" if s == "**" else s for s in pattern.split("."))


def safe_name(text: str) -> str:
    """``text`` usable in a stream, bucket or consumer name (other characters become ``_``)."""
    return _UNSAFE_NAME.sub("_", text)
