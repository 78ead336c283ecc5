"""The plugin manager: built-in plugins first, then the ``zsfw`` entry-point group.

Set ``ZSFW_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the built-ins. Each plugin is validated,
registered and asked for its components on its own, so one broken plugin is a warning naming
its distribution and never stops the others (see ``zsfw.hookspecs`` for the contract).
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from zsfw import hookspecs
from zsfw.errors import PluginError

ENTRY_POINT_GROUP = "zsfw"
# Every shipped plugin, registered first so the built-in recipes work with autoload disabled; the
# same modules are also the distribution's entry points (pyproject.toml), as a third party's would be.
DEFAULT_PLUGINS = ("zsfw_zerosum", "zsfw_baselines", "zsfw_dense", "zsfw_torchao", "zsfw_packed",
                   "zsfw_refine", "zsfw_pivga", "zsfw_groupwise", "zsfw_fermigrad", "zsfw_prehab",
                   "zsfw_auto", "zsfw_compensate", "zsfw_chain")
KINDS = {
    "stage": "zsfw_register_stages",
    "scorer": "zsfw_register_scorers",
    "allocator": "zsfw_register_allocators",
    "corrector": "zsfw_register_correctors",
    "storage": "zsfw_register_storage_formats",
}
NOT_INSTALLED = ("(not installed)", "")


@dataclass(frozen=True)
class Component:
    """One registered stage, scorer, allocator, corrector or storage format, and who provides it."""

    kind: str
    name: str
    cls: type
    plugin: str
    distribution: str
    version: str


_manager: pluggy.PluginManager | None = None
_distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
_registry: dict[str, dict[str, Component]] | None = None
_clashes: dict[tuple[str, str], list[Component]] = {}  # (kind, name) -> the components refused


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _who(plugin_name: str) -> str:
    dist, version = _distributions.get(plugin_name, NOT_INSTALLED)
    return f"plugin {plugin_name!r} (from {dist} {version})".replace(" )", ")")


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        _distributions.clear()
        zsfw_dist = _own_distribution()
        for module_name in DEFAULT_PLUGINS:
            _distributions[module_name] = zsfw_dist
            pm.register(importlib.import_module(module_name), name=module_name)
        if not os.environ.get("ZSFW_DISABLE_PLUGIN_AUTOLOAD"):
            _load_entry_points(pm)
        _manager = pm
    return _manager


def _own_distribution() -> tuple[str, str]:
    from zsfw import __version__

    return "zsfw", __version__


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        _distributions[ep.name] = (ep.dist.name, ep.dist.version) if ep.dist else NOT_INSTALLED
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break zsfw
            _warn(f"zsfw {_who(ep.name)} failed to load and is skipped: {type(exc).__name__}: {exc}")
            continue
        _register_checked(pm, plugin, ep.name)


def _register_validated(pm: pluggy.PluginManager, plugin: Any, name: str | None) -> None:
    """Register one plugin whose hooks all exist and take arguments the specs pass; a
    ``pluggy.PluginValidationError`` (or ``ValueError`` for a taken name) leaves nothing behind."""
    try:
        pm.register(plugin, name=name)
        for hook in pm.get_hookcallers(plugin) or []:
            if not hook.has_spec():
                raise pluggy.PluginValidationError(
                    plugin, f"unknown hook {hook.name!r}; zsfw's hooks are {sorted(KINDS.values())}")
    except (pluggy.PluginValidationError, ValueError):
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        raise


def _register_checked(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """Register an entry point's plugin; an invalid one is skipped with a warning."""
    try:
        _register_validated(pm, plugin, name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        _warn(f"zsfw {_who(name)} is invalid and is skipped: {exc}")


def register_plugin(plugin: ModuleType | Any, name: str | None = None) -> None:
    """Register a plugin object (module or instance with hookimpls) at run time.

    Unlike an entry point, an invalid plugin passed here is an error (the caller wrote it)."""
    try:
        _register_validated(get_plugin_manager(), plugin, name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"plugin {name or plugin!r} is invalid: {exc}") from None
    _invalidate()


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered under ``name``."""
    get_plugin_manager().unregister(name=name)
    _invalidate()


def _invalidate() -> None:
    global _registry
    _registry = None


def registry() -> dict[str, dict[str, Component]]:
    """Every registered component, by kind then name (first registration of a name wins)."""
    global _registry
    if _registry is not None:
        return _registry
    pm = get_plugin_manager()
    found: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
    _clashes.clear()
    plugins = pm.list_name_plugin()
    for kind, hook_name in KINDS.items():
        for plugin_name, plugin in plugins:
            if not any(impl.plugin is plugin for impl in getattr(pm.hook, hook_name).get_hookimpls()):
                continue
            for component in _components_of(pm, plugins, plugin_name, kind, hook_name):
                first = found[kind].setdefault(component.name, component)
                if first is not component:
                    _clashes.setdefault((kind, component.name), []).append(component)
                    _warn(f"zsfw: {kind} {component.name!r} is registered by {_who(first.plugin)} "
                          f"and by {_who(component.plugin)}; keeping the first")
    _registry = found
    return found


def _components_of(pm: pluggy.PluginManager, plugins: list, plugin_name: str, kind: str,
                   hook_name: str) -> list[Component]:
    """What one plugin registers for one kind, through pluggy; [] and a warning if it fails."""
    dist, version = _distributions.get(plugin_name, NOT_INSTALLED)
    out: list[Component] = []

    def register(cls: type) -> None:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"it registered a {kind} {cls!r} without a string `name` attribute")
        out.append(Component(kind, name, cls, plugin_name, dist, version))

    others = [p for n, p in plugins if n != plugin_name]
    try:
        pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
    except Exception as exc:  # one plugin's failure must not hide the others' components
        _warn(f"zsfw {_who(plugin_name)} failed in {hook_name} and its {kind}s are skipped: "
              f"{type(exc).__name__}: {exc}")
        return []
    return out


def names(kind: str) -> list[str]:
    """Registered names of one kind, sorted."""
    return sorted(registry()[kind])


def component(kind: str, name: str) -> Component:
    """The registered component, or a ``PluginError`` naming what is registered or the clash."""
    components = registry()[kind]
    if name not in components:
        raise PluginError(f"{kind} {name!r} is not registered; registered {kind}s: "
                          f"{', '.join(sorted(components)) or '(none)'}")
    if (kind, name) in _clashes:
        who = [_who(c.plugin) for c in [components[name], *_clashes[(kind, name)]]]
        raise PluginError(f"{kind} {name!r} is registered by {' and by '.join(who)}; uninstall "
                          f"one of them or name the {kind} of the other in the recipe")
    return components[name]


def option_names(kind: str, name: str) -> set[str] | None:
    """The options (constructor keywords) a component accepts; None if it takes any."""
    params = inspect.signature(component(kind, name).cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def create(kind: str, name: str, options: dict[str, Any] | None = None) -> Any:
    """Instantiate the ``kind`` component registered as ``name`` with recipe ``options``."""
    cls = component(kind, name).cls
    try:
        return cls(**(options or {}))
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{kind} {name!r} rejected its options {options}: {exc}") from exc


def create_component(kind: str, spec: Any) -> Any:
    """A ``kind`` component from a recipe's spelling of one: a name, or ``{name, <options>}``
    (what a composite plugin, such as a chain of correctors, builds its members with)."""
    from zsfw.recipe import PluginSpec

    spec = PluginSpec.model_validate(spec)
    return create(kind, spec.name, spec.options)


def storage_format(spec: Any) -> Any:
    """A storage format from a recipe's spelling of one: a name, or ``{name, <options>}``."""
    return create_component("storage", spec)
