"""Hook specifications: how a plugin adds stages, scorers, allocators, correctors and formats.

A plugin is any module (or object) with functions marked ``@zsfw.hookimpl``, installed through
the ``zsfw`` entry-point group or registered with ``zsfw.register_plugin``. Each hook receives a
``register`` callback and calls it once per component it provides, as in simonw/llm::

    import zsfw

    @zsfw.hookimpl
    def zsfw_register_scorers(register):
        register(MyScorer)

``register`` takes a class with a string ``name`` attribute; a recipe instantiates it by that
name with the options the recipe gives (``scorer: {name: my_scorer, alpha: 0.5}``), which must
be keyword arguments of its constructor. The protocols each kind implements are in
``zsfw.protocols``.

Contract common to every hook:

- Built-in plugins are registered first, then entry points in the order ``importlib.metadata``
  lists them. Each plugin's hook is called on its own (through pluggy, so its tracing applies):
  a plugin whose hook raises, or that registers a class without a ``name``, is skipped with a
  warning naming its distribution, and the others still register.
- Name clash: when two plugins register one name for one kind, the first (a built-in before any
  third party) keeps it and a warning names both distributions; a recipe that uses the clashing
  name then fails with an error naming both, so a user never gets the other one by surprise.
- A plugin that fails to import, implements a hook that does not exist, or declares a hook
  argument the spec does not pass is skipped with a warning naming its distribution.

What a plugin needs it declares once, as class attributes (all optional; ``zsfw.capabilities``
reads them from the class, never from an instance, and refuses a recipe whose plugins cannot run
together before any work):

- ``needs_model: bool`` (allocator): called with an ``AllocationProblem`` (the model), not ``(layers, budget)``.
- ``keeps_any_component: bool`` (allocator): may keep any components, not only each layer's top ones.
- ``needs_gradient: bool`` (scorer): gets each layer's gradient.
- ``needs_training: bool`` (stage, corrector): the run draws training windows for it.
- ``needs_plan: bool`` (stage): gets the plan compression would make of the model before it.
- ``needs_memory_driver: str | None`` (corrector): why it needs ``execution.driver: memory``.
- ``has_base: bool`` (storage): stores rank k as a quantized base Q(W) plus k components of the
  whitened residual W − Q(W) (rank 0: the base alone); see ``zsfw.protocols.BasedFormat``.
- ``needs_hessian: bool`` (storage with a base): rounds the base with H = C, the layer's input moments.
- ``needs_for(options) -> dict`` (classmethod): those of the above that depend on the recipe's options.
- ``members_option: str`` (a composite, such as ``chain``): the option listing its members; it
  needs what any member needs.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "zsfw"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[type], None]


@hookspec
def zsfw_register_stages(register: Register) -> None:
    """Register pre-compression stages: classes implementing ``zsfw.protocols.Stage``.

    A recipe lists stages by name (``stages: [{name: prehab, epochs: 1}]``); they run in that
    order after the calibration windows are drawn and before the statistics pass, and each gets
    the model, the target linear layers and the calibration windows. A stage may change any
    weight in place. Its name and options enter the statistics and factorization cache keys
    (and the changed weights do anyway); the summary it returns is recorded in the report. A
    stage may ask for training and validation windows (``needs_training``) and for the plan
    compression would make of the model before it and its whitening factors (``needs_plan``).
    """


@hookspec
def zsfw_register_scorers(register: Register) -> None:
    """Register importance scorers: classes implementing ``zsfw.protocols.Scorer``.

    ``score`` gets each layer's whitened SVD (and its gradient when ``needs_gradient``) and
    returns one float score per component: the estimated loss change of dropping it.
    """


@hookspec
def zsfw_register_allocators(register: Register) -> None:
    """Register rank allocators: classes implementing ``zsfw.protocols.Allocator``.

    ``allocate(layers, budget)`` returns an ``AllocationPlan`` whose cost is within
    ``budget.limit``, keeping each layer's top components unless it sets
    ``keeps_any_component = True``. An allocator that sets ``needs_model = True`` is instead called as
    ``allocate(problem)`` with a ``zsfw.protocols.AllocationProblem``, which can also evaluate
    the loss and its gradient for soft-truncated layers.
    """


@hookspec
def zsfw_register_correctors(register: Register) -> None:
    """Register correctors: classes implementing ``zsfw.protocols.Corrector``.

    ``correct`` gets a ``CorrectionProblem`` (the truncated model with its plan) after
    truncation and returns the calibration loss measured at the start of each cycle.
    """


@hookspec
def zsfw_register_storage_formats(register: Register) -> None:
    """Register storage formats: classes implementing ``zsfw.protocols.StorageFormat``.

    A format prices a layer in bytes (the budget uses exactly these numbers), builds its module
    and an empty skeleton of it for loading. Loading a checkpoint needs only the formats it uses.
    """
