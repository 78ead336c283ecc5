"""zsfw: low-rank compression of Hugging Face causal LMs with Zero-Sum SVD.

    import zsfw
    model, report = zsfw.compress(model, "recipes/zero_sum.yaml", "calibration.txt")
    print(report.table())

Every step (scorer, allocator, corrector, storage format) is a plugin; see ``zsfw.hookspecs``.
"""

import importlib

from zsfw.hookspecs import hookimpl
from zsfw.hf_quantizer import register as _register_with_transformers

_register_with_transformers()  # from_pretrained of a zsfw folder builds the compressed modules

__version__ = "0.1.0"

_LAZY = {  # public name -> the module that defines it
    "compress": "zsfw.pipeline", "evaluate": "zsfw.evaluation", "generate": "zsfw.generation",
    "export": "zsfw.aoti", "save": "zsfw.checkpoint", "load": "zsfw.checkpoint",
    "load_recipe": "zsfw.recipe", "Recipe": "zsfw.recipe", "ZeroSumSVDModifier": "zsfw.recipe",
    "LowRankLinear": "zsfw.modules", "register_plugin": "zsfw.plugins",
}
__all__ = ["hookimpl", *_LAZY, "__version__"]


def __getattr__(name: str):
    # The pipeline's modules wait until used, so the plugin manager can import plugins (which
    # import `zsfw.hookimpl`) while zsfw itself is importing.
    if name not in _LAZY:
        raise AttributeError(f"module 'zsfw' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
