"""What each plugin needs, and every rule about what can run with what, in one place.

A plugin class declares its needs once, as class attributes (``zsfw.hookspecs`` documents each):
``needs_model``, ``needs_training``, ``needs_plan``, ``needs_memory_driver``,
``keeps_any_component``, ``needs_gradient``. A need that depends on the plugin's options is
declared by a classmethod ``needs_for(options)`` returning those attributes' values for them;
a composite plugin names the option that lists its members (``members_option = "correctors"``) and needs
what any of them needs. Needs are read from the class and the recipe's options, never from an
instance, so ``check`` can refuse a combination before anything is built or run.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from zsfw.errors import RecipeError


@dataclass(frozen=True)
class Needs:
    """A plugin's needs, as its recipe spec (name and options) makes them."""

    needs_model: bool = False  # an allocator called with the model (``AllocationProblem``)
    needs_training: bool = False  # training windows held out from calibration
    needs_plan: bool = False  # a stage given the plan compression would make before it
    needs_memory_driver: str | None = None  # why it needs execution.driver 'memory' (None: it does not)
    keeps_any_component: bool = False  # an allocator that may keep any components, not the top ones
    needs_gradient: bool = False  # a scorer given each layer's gradient
    has_base: bool = False  # a storage format that stores a quantized base plus a low-rank residual
    needs_hessian: bool = False  # a storage format whose base is rounded with H = C (GPTQ)


def needs(kind: str, spec: Any) -> Needs:
    """The needs of the ``kind`` plugin a recipe spells ``spec`` (a name, ``{name, <options>}``
    or a ``PluginSpec``), read from its class: a chain's from its members' specs."""
    from zsfw import plugins
    from zsfw.recipe import PluginSpec

    spec = PluginSpec.model_validate(spec)
    cls = plugins.component(kind, spec.name).cls
    values = {f.name: getattr(cls, f.name, f.default) for f in fields(Needs)}
    if hasattr(cls, "needs_for"):
        values.update(cls.needs_for(spec.options))
    members = getattr(cls, "members_option", None)
    if members:
        parts = [(PluginSpec.model_validate(member).name, needs(kind, member))
                 for member in spec.options.get(members) or []]
        for f in fields(Needs):
            if f.type == "bool":
                values[f.name] = values[f.name] or any(getattr(n, f.name) for _, n in parts)
        memory = [f"{name} ({n.needs_memory_driver})" for name, n in parts if n.needs_memory_driver]
        values["needs_memory_driver"] = " and ".join(memory) or values["needs_memory_driver"]
    return Needs(**values)


def option_of(cls: type, options: dict[str, Any], name: str) -> Any:
    """Option ``name`` of plugin class ``cls`` as ``options`` set it, else its constructor's default
    (what a ``needs_for`` reads)."""
    return options.get(name, inspect.signature(cls).parameters[name].default)


def check(m: Any, lazy: bool, output_dir: str | Path | None, statistics_cache: str | Path | None) -> None:
    """Refuse, before any work, what the recipe's modifier ``m`` cannot run with: a corrector that
    needs the in-memory driver with another one, what a lazily loaded model (decoder layers read
    one at a time), or several processes under torchrun, cannot do yet; one-line ``RecipeError``."""
    _check_driver(m)
    model_aware = needs("allocator", m.allocator).needs_model
    storage = needs("storage", m.storage)
    if storage.has_base:
        _check_base(m, model_aware, storage.needs_hessian)
    if lazy:
        _check_lazy(m, output_dir, model_aware)
    from zsfw.compression import distributed

    if distributed.launched():
        _check_processes(m, statistics_cache, model_aware)


def _check_base(m: Any, model_aware: bool, needs_hessian: bool) -> None:
    """A format with a quantized base: its residual is truncated as planned (no corrector moves it
    yet, no model-aware allocator soft-truncates it), and GPTQ rounding needs the moments C."""
    wanted = ["no corrector" if m.corrector else "",
              f"an allocator that needs no model, not {m.allocator.name!r}" if model_aware else "",
              "whiten: true (GPTQ rounds with the input moments C)" if needs_hessian and not m.whiten else ""]
    wanted = [w for w in wanted if w]
    if wanted:
        raise RecipeError(f"storage {m.storage.name!r} with a quantized base needs {', '.join(wanted)}; "
                          f"recipes/hybrid.yaml is one that runs")


def _check_driver(m: Any) -> None:
    needs_memory = m.corrector and needs("corrector", m.corrector).needs_memory_driver
    if needs_memory and m.execution.driver != "memory":
        raise RecipeError(f"corrector {m.corrector.name!r} with {needs_memory} needs execution.driver 'memory', "
                          f"not {m.execution.driver!r}")


def _check_lazy(m: Any, output_dir: str | Path | None, model_aware: bool) -> None:
    wanted = ["execution.driver 'streamed'" if m.execution.driver != "streamed" else "",
              "an output folder (its layers are written as they are compressed)" if output_dir is None else "",
              "no stages" if m.stages else "", "no corrector" if m.corrector else "",
              f"an allocator that needs no model, not {m.allocator.name!r}" if model_aware else ""]
    wanted = [w for w in wanted if w]
    if wanted:
        raise RecipeError(f"a lazily loaded model needs {', '.join(wanted)}; or load it with "
                          f"execution.weights 'resident' (recipes/zero_sum_oneshot.yaml has no corrector)")


def _check_processes(m: Any, statistics_cache: str | Path | None, model_aware: bool) -> None:
    planning = ", ".join(repr(s.name) for s in m.stages if needs("stage", s).needs_plan)
    unsupported = [what for what, used in (("a corrector", m.corrector), ("a statistics cache", statistics_cache),
                                           (f"allocator {m.allocator.name!r}", model_aware),
                                           (f"stage {planning} (it aims at the allocation plan)", planning))
                   if used]
    if unsupported:
        raise RecipeError(f"{' and '.join(unsupported)} cannot be used across several processes yet; "
                          f"run without torchrun (recipes/zero_sum_oneshot.yaml has no corrector)")


def check_lazy_output(execution: Any, output: str | Path | None) -> None:
    """Refuse, before the model loads, a lazily loaded model without ``--output``."""
    if execution.weights == "lazy" and output is None:
        raise RecipeError("execution.weights 'lazy' writes the model as its layers are compressed: "
                          "pass --output DIR")


def check_stage_plan(spec: Any, planned: bool) -> None:
    """Refuse a stage that aims at the plan where no plan is made (``run_stages`` called on its own)."""
    if needs("stage", spec).needs_plan and not planned:
        raise RecipeError(f"stage {spec.name!r} with options {spec.options} needs the pipeline's allocation "
                          f"plan: run it from zsfw.compress (or the CLI), not on its own")
