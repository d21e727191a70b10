"""Package attributes that import their module on first use, so light commands never pay for torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_getattr(package: str, table: Mapping[str, str], plugin_group: str | None = None) -> Callable[[str], object]:
    """A module-level `__getattr__` for `package` resolving each name in `table` from the module it maps to.

    Names not in `table` may come from the entry-point group `plugin_group`: how the core offers functions
    that live in packages it must not import (e.g. `difffeat.sweep`, which `gate` provides)."""

    def __getattr__(name: str):
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        if plugin_group and not name.startswith("_"):
            from importlib.metadata import entry_points

            for entry in entry_points(group=plugin_group, name=name):
                return entry.load()
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
