"""The plugin manager: built-in plugins first, then the ``zsfw`` entry-point group.

Set ``ZSFW_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the built-ins. A plugin that fails to import
becomes a warning naming it; two plugins registering one name is an error naming both.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from zsfw import hookspecs

ENTRY_POINT_GROUP = "zsfw"
DEFAULT_PLUGINS = ("zsfw_zerosum", "zsfw_baselines", "zsfw_dense", "zsfw_torchao", "zsfw_packed")
KINDS = {
    "scorer": "zsfw_register_scorers",
    "allocator": "zsfw_register_allocators",
    "corrector": "zsfw_register_correctors",
    "storage": "zsfw_register_storage_formats",
}


class PluginError(Exception):
    """A plugin is missing, broken or clashes with another."""


@dataclass(frozen=True)
class Component:
    """One registered scorer, allocator, corrector or storage format, and who provides it."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str


_manager: pluggy.PluginManager | None = None
_registry: dict[str, dict[str, Component]] | None = None


def _entry_point_distributions() -> dict[str, tuple[str, str]]:
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.dist is not None:
            found[ep.name] = (ep.dist.name, ep.dist.version)
    return found


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for module_name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(module_name), name=module_name)
        if not os.environ.get("ZSFW_DISABLE_PLUGIN_AUTOLOAD"):
            _load_entry_points(pm)
        pm.check_pending()
        _manager = pm
    return _manager


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break zsfw
            dist = f" (from {ep.dist.name} {ep.dist.version})" if ep.dist else ""
            warnings.warn(f"zsfw plugin {ep.name!r}{dist} failed to load and is skipped: "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)
            continue
        pm.register(plugin, name=ep.name)


def register_plugin(plugin: ModuleType | Any, name: str | None = None) -> None:
    """Register a plugin object (module or instance with hookimpls) at run time."""
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    pm.check_pending()
    _invalidate()


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered under ``name``."""
    get_plugin_manager().unregister(name=name)
    _invalidate()


def _invalidate() -> None:
    global _registry
    _registry = None


def registry() -> dict[str, dict[str, Component]]:
    """Every registered component, by kind then name."""
    global _registry
    if _registry is not None:
        return _registry
    pm = get_plugin_manager()
    dists = _entry_point_distributions()
    found: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            dist, version = dists.get(impl.plugin_name, ("(not installed)", ""))

            def register(cls: type, kind=kind, impl=impl, dist=dist, version=version) -> None:
                name = getattr(cls, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {impl.plugin_name!r} registered a {kind} "
                                      f"{cls!r} without a string `name` attribute")
                if name in found[kind]:
                    other = found[kind][name].plugin
                    raise PluginError(f"{kind} {name!r} is registered by two plugins: "
                                      f"{other!r} and {impl.plugin_name!r}")
                found[kind][name] = Component(kind, name, cls, impl.plugin_name, dist, version)

            impl.function(register=register)
    _registry = found
    return found


def names(kind: str) -> list[str]:
    """Registered names of one kind, sorted."""
    return sorted(registry()[kind])


def create(kind: str, name: str, options: dict[str, Any] | None = None) -> Any:
    """Instantiate the ``kind`` component registered as ``name`` with recipe ``options``."""
    components = registry()[kind]
    if name not in components:
        raise PluginError(f"{kind} {name!r} is not registered; registered {kind}s: "
                          f"{', '.join(sorted(components)) or '(none)'}")
    try:
        return components[name].cls(**(options or {}))
    except TypeError as exc:
        raise PluginError(f"{kind} {name!r} rejected its options {options}: {exc}") from exc
