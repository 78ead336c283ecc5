"""Hook specifications: how a plugin adds scorers, allocators, correctors and storage formats.

A plugin is any module with functions marked ``@zsfw.hookimpl``. Each hook receives a
``register`` callback and calls it once per component it provides, as in simonw/llm::

    import zsfw

    @zsfw.hookimpl
    def zsfw_register_scorers(register):
        register(MyScorer)

``register`` takes a class with a ``name`` attribute; the recipe instantiates it by that name
with the options the recipe gives (``scorer: {name: my_scorer, alpha: 0.5}``).
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "zsfw"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[type], None]


@hookspec
def zsfw_register_scorers(register: Register) -> None:
    """Register importance scorers: classes implementing ``zsfw.interfaces.Scorer``."""


@hookspec
def zsfw_register_allocators(register: Register) -> None:
    """Register rank allocators: classes implementing ``zsfw.interfaces.Allocator``."""


@hookspec
def zsfw_register_correctors(register: Register) -> None:
    """Register correctors: classes implementing ``zsfw.interfaces.Corrector``."""


@hookspec
def zsfw_register_storage_formats(register: Register) -> None:
    """Register storage formats: classes implementing ``zsfw.interfaces.StorageFormat``."""
