"""Build hook: ship ``migrations/`` inside the wheel as ``sqlalchemy_eventbroker/migrations``.

Only in a standard wheel. An editable install must not copy them into site-packages: there,
the package is the checkout, which finds ``migrations/`` beside itself, and a copy would be a
directory of files outside the package that ``pip uninstall`` leaves behind as an empty
``sqlalchemy_eventbroker/`` namespace package (so a later ``import`` "succeeds").
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface  # type: ignore[import-not-found,unused-ignore]


class MigrationsHook(BuildHookInterface):  # type: ignore[misc,unused-ignore]
    """Force-include the Alembic migrations into standard wheels only."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"]["migrations"] = "sqlalchemy_eventbroker/migrations"
