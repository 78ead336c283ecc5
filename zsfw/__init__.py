"""zsfw: low-rank compression of Hugging Face causal LMs with Zero-Sum SVD.

    import zsfw
    model, report = zsfw.compress(model, "recipes/zero_sum.yaml", "calibration.txt")
    print(report.table())

Public API: ``compress``, ``load``, ``save``, ``evaluate``, ``generate``, ``export``,
``load_recipe``. Plugin API (what a plugin may import from ``zsfw`` and ``zsfw.errors``, and
nothing else is promised; a test holds the shipped plugins to it): ``hookimpl``, the protocols
and data of ``zsfw.protocols``, the budget, plan and frontier of ``zsfw.budget``, the
modules of ``zsfw.modules``, the score, whitening and factor helpers, the calibration pass
(``collect_statistics``, ``next_token_loss``), what a correction problem's gradients can be
asked for (``CORRECTION_LOSSES``, ``CORRECTION_WINDOWS``, ``CORRECTION_PRECISIONS``,
``native_precision``), ``create_component`` for composite plugins, ``option_of`` for a ``needs_for`` classmethod, and the errors of
``zsfw.errors``. See ``zsfw.hookspecs`` for the hooks.

``import zsfw`` is cheap: names load on first use, and zsfw's ``transformers`` quantizer (which
makes ``from_pretrained`` of a zsfw folder build the compressed modules) is registered as soon as
``transformers`` is imported, before or after zsfw.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from zsfw.errors import (AllocationError, CalibrationError, CheckpointError, DestinationError,
                         NonFiniteError, PluginError, RecipeError, ZsfwError)
from zsfw.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {  # public name -> the module that defines it ("module:attribute" where names differ)
    # the pipeline and its surroundings
    "compress": "zsfw.compression.pipeline", "evaluate": "zsfw.eval.perplexity",
    "generate": "zsfw.serve.generate", "export": "zsfw.serve.export",
    "save": "zsfw.checkpoint.save", "load": "zsfw.checkpoint.load",
    "load_recipe": "zsfw.recipe", "Recipe": "zsfw.recipe", "ZeroSumSVDModifier": "zsfw.recipe",
    "register_plugin": "zsfw.plugins", "storage_format": "zsfw.plugins",
    "create_component": "zsfw.plugins", "option_of": "zsfw.capabilities",
    # the plugin API
    "LayerSpectrum": "zsfw.protocols", "LayerScores": "zsfw.protocols",
    "StorageFormat": "zsfw.protocols", "Scorer": "zsfw.protocols", "Allocator": "zsfw.protocols",
    "AllocationProblem": "zsfw.protocols", "ModelAwareAllocator": "zsfw.protocols",
    "Corrector": "zsfw.protocols", "CorrectionProblem": "zsfw.protocols",
    "KeepBestTracker": "zsfw.protocols", "Stage": "zsfw.protocols",
    "LayerFactors": "zsfw.protocols", "BasedFormat": "zsfw.protocols", "FormatChooser": "zsfw.protocols",
    "ByteBudget": "zsfw.budget", "AllocationPlan": "zsfw.budget", "Allocation": "zsfw.budget",
    "DropFrontier": "zsfw.budget", "rank_of": "zsfw.budget", "useful_rank": "zsfw.budget",
    "has_base": "zsfw.budget", "fits": "zsfw.budget",
    "LowRankLinear": "zsfw.modules", "StoredLinear": "zsfw.modules", "weight_as": "zsfw.modules",
    "first_order_scores": "zsfw.compression.linalg", "lowrank_factors": "zsfw.compression.linalg",
    "whitened_svd": "zsfw.compression.linalg", "whitening_factor": "zsfw.compression.linalg",
    "collect_statistics": "zsfw.compression.statistics:collect",
    "next_token_loss": "zsfw.compression.statistics",
    "CORRECTION_LOSSES": "zsfw.compression.feedback:LOSSES",
    "CORRECTION_WINDOWS": "zsfw.compression.feedback:WINDOWS",
    "CORRECTION_PRECISIONS": "zsfw.compression.feedback:PRECISIONS",
    "native_precision": "zsfw.compression.feedback",
}
__all__ = ["hookimpl", "ZsfwError", "RecipeError", "PluginError", "CalibrationError",
           "AllocationError", "CheckpointError", "DestinationError", "NonFiniteError", *_LAZY,
           "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'zsfw' has no attribute {name!r}")
    module, _, attribute = _LAZY[name].partition(":")
    return getattr(importlib.import_module(module), attribute or name)


def _register_quantizer() -> None:
    """Import the quantizer module, which registers itself when its import completes (it may be
    importing right now: its own import of ``transformers`` is what fires the hook)."""
    if "zsfw.checkpoint.hf_quantizer" not in sys.modules:
        importlib.import_module("zsfw.checkpoint.hf_quantizer")


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs ``transformers``' own loader, then registers zsfw's quantizer with it."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register_quantizer()


class _TransformersImportHook(importlib.abc.MetaPathFinder):
    """Registers the quantizer when ``transformers`` is first imported (once, then leaves)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


if "transformers" in sys.modules:
    _register_quantizer()
elif not any(isinstance(f, _TransformersImportHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TransformersImportHook())
