"""zsfw: low-rank compression of Hugging Face causal LMs with Zero-Sum SVD.

    import zsfw
    model, report = zsfw.compress(model, "recipes/zero_sum.yaml", "calibration.txt")
    print(report.table())

Every step (scorer, allocator, corrector, storage format) is a plugin; see ``zsfw.hookspecs``.
"""

from zsfw.hookspecs import hookimpl
from zsfw.hf_quantizer import register as _register_with_transformers

_register_with_transformers()  # from_pretrained of a zsfw folder builds the compressed modules

__version__ = "0.1.0"

__all__ = ["hookimpl", "compress", "save", "load", "evaluate", "generate", "export", "load_recipe", "Recipe", "ZeroSumSVDModifier", "LowRankLinear",
           "register_plugin", "__version__"]


def __getattr__(name: str):
    # The pipeline's modules wait until used, so the plugin manager can import plugins (which
    # import `zsfw.hookimpl`) while zsfw itself is importing.
    if name == "compress":
        from zsfw.pipeline import compress

        return compress
    if name == "evaluate":
        from zsfw.evaluation import evaluate

        return evaluate
    if name == "generate":
        from zsfw.generation import generate

        return generate
    if name == "export":
        from zsfw.aoti import export

        return export
    if name in ("save", "load"):
        from zsfw import checkpoint

        return getattr(checkpoint, name)
    if name in ("load_recipe", "Recipe", "ZeroSumSVDModifier"):
        from zsfw import recipe

        return getattr(recipe, name)
    if name == "LowRankLinear":
        from zsfw.modules import LowRankLinear

        return LowRankLinear
    if name == "register_plugin":
        from zsfw.plugins import register_plugin

        return register_plugin
    raise AttributeError(f"module 'zsfw' has no attribute {name!r}")
