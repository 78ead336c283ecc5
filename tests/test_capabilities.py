"""zsfw.capabilities: plugins' needs read from their classes, and every combination rule, one
line each, before any work."""

import copy
import functools

import pytest

import zsfw
from helpers import recipe
from zsfw import capabilities, plugins
from zsfw.capabilities import Needs, needs
from zsfw.errors import RecipeError
from zsfw.recipe import ExecutionConfig, PluginSpec

COMPENSATE = "its copy of the uncompressed model"


@pytest.mark.parametrize("kind, spec, declared", [
    ("scorer", "first_order", Needs(needs_gradient=True)),
    ("scorer", "sigma", Needs()),
    ("allocator", "zero_sum", Needs()),
    ("allocator", "fermigrad", Needs(needs_model=True)),
    ("allocator", "greedy_negative", Needs(keeps_any_component=True)),
    ("allocator", {"name": "greedy_negative", "keep_top_k": True}, Needs()),
    ("stage", "prehab", Needs(needs_training=True)),
    ("stage", {"name": "prehab", "ranks": "plan"}, Needs(needs_training=True, needs_plan=True)),
    ("corrector", "compensate", Needs(needs_memory_driver=COMPENSATE)),
    ("corrector", "refine", Needs()),
    ("corrector", {"name": "refine", "windows": "training", "loss": "distill", "norms": True},
     Needs(needs_training=True, needs_memory_driver="loss: distill and norms: true")),
    ("corrector", {"name": "chain", "correctors": ["compensate", {"name": "refine", "windows": "training"}]},
     Needs(needs_training=True, needs_memory_driver=f"compensate ({COMPENSATE})")),
    ("storage", "int4", Needs(has_base=True)),
    ("storage", {"name": "int3", "rounding": "gptq"}, Needs(has_base=True, needs_hessian=True)),
    ("storage", {"name": "auto", "formats": ["bf16", {"name": "int4", "rounding": "gptq"}]},
     Needs(has_base=True, needs_hessian=True)),
    ("storage", "auto", Needs()),
])
def test_needs_are_read_from_the_class_and_the_options(kind, spec, declared, monkeypatch):
    cls = plugins.component(kind, PluginSpec.model_validate(spec).name).cls

    @functools.wraps(cls.__init__)  # its signature (the options' defaults) stays readable
    def refuse(*args, **kwargs):
        pytest.fail("instantiated to ask its needs")

    monkeypatch.setattr(cls, "__init__", refuse)
    assert needs(kind, spec) == declared


def _modifier(**keys):
    return zsfw.load_recipe(recipe(**keys)).modifier


PLAN_STAGE = {"name": "prehab", "ranks": "plan"}
RULES = [  # modifier keys, lazily loaded, output folder, statistics cache, under torchrun, message
    ({"corrector": "compensate", "execution": {"driver": "streamed"}}, False, None, None, False,
     f"^corrector 'compensate' with {COMPENSATE} needs execution.driver 'memory', not 'streamed'$"),
    ({}, True, "out", None, False, "^a lazily loaded model needs execution.driver 'streamed'; or load it with "
                                   "execution.weights 'resident'"),
    ({"execution": {"driver": "streamed"}}, True, None, None, False,
     r"needs an output folder \(its layers are written as they are compressed\);"),
    ({"execution": {"driver": "streamed"}, "stages": ["prehab"]}, True, "out", None, False,
     "^a lazily loaded model needs no stages;"),
    ({"execution": {"driver": "streamed"}, "corrector": "refine"}, True, "out", None, False,
     "^a lazily loaded model needs no corrector;"),
    ({"execution": {"driver": "streamed"}, "allocator": "fermigrad"}, True, "out", None, False,
     "^a lazily loaded model needs an allocator that needs no model, not 'fermigrad';"),
    ({"corrector": "refine"}, False, None, None, True,
     "^a corrector cannot be used across several processes yet; run without torchrun"),
    ({}, False, None, "cache", True, "^a statistics cache cannot be used across several processes yet;"),
    ({"allocator": "fermigrad"}, False, None, None, True,
     "^allocator 'fermigrad' cannot be used across several processes yet;"),
    ({"stages": [PLAN_STAGE]}, False, None, None, True,
     r"^stage 'prehab' \(it aims at the allocation plan\) cannot be used across several processes yet;"),
    ({"storage": "int4", "corrector": "refine"}, False, None, None, False,
     "^storage 'int4' with a quantized base needs no corrector; recipes/hybrid.yaml is one that runs$"),
    ({"storage": ["bf16", "int4"], "corrector": None, "allocator": "fermigrad"}, False, None, None, False,
     "^storage 'auto' with a quantized base needs an allocator that needs no model, not 'fermigrad';"),
    ({"storage": {"name": "int4", "rounding": "gptq"}, "corrector": None, "whiten": False}, False, None, None, False,
     r"^storage 'int4' with a quantized base needs whiten: true \(GPTQ rounds with the input moments C\);"),
]


@pytest.mark.parametrize("keys, lazy, output, cache, torchrun, message", RULES)
def test_each_combination_rule_is_one_line(keys, lazy, output, cache, torchrun, message, monkeypatch):
    from zsfw.compression import distributed

    monkeypatch.setattr(distributed, "launched", lambda: torchrun)
    m = _modifier(**keys)
    with pytest.raises(RecipeError, match=message) as caught:
        capabilities.check(m, lazy, output, cache)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("keys, lazy, output, cache, torchrun", [
    ({"corrector": "compensate"}, False, None, None, False),
    ({"execution": {"driver": "streamed"}}, True, "out", "cache", False),
    ({"stages": ["prehab"], "allocator": "zero_sum"}, False, None, None, True),  # prehab's own ranks: no plan
])
def test_combinations_that_can_run_pass(keys, lazy, output, cache, torchrun, monkeypatch):
    from zsfw.compression import distributed

    monkeypatch.setattr(distributed, "launched", lambda: torchrun)
    capabilities.check(_modifier(**keys), lazy, output, cache)


def test_lazy_weights_need_an_output_folder_at_the_cli():
    capabilities.check_lazy_output(ExecutionConfig(), None)
    with pytest.raises(RecipeError, match="^execution.weights 'lazy' writes the model as its layers are compressed: "
                                          "pass --output DIR$"):
        capabilities.check_lazy_output(ExecutionConfig(weights="lazy", driver="streamed"), None)


def test_a_stage_aimed_at_the_plan_needs_one():
    capabilities.check_stage_plan(PluginSpec(name="prehab"), False)
    capabilities.check_stage_plan(PluginSpec.model_validate(PLAN_STAGE), True)
    with pytest.raises(RecipeError, match=r"^stage 'prehab' with options \{'ranks': 'plan'\} needs the pipeline's "
                                          r"allocation plan"):
        capabilities.check_stage_plan(PluginSpec.model_validate(PLAN_STAGE), False)


def test_under_torchrun_compress_refuses_a_model_aware_allocator_before_any_work(llama, windows, monkeypatch):
    from zsfw.compression import distributed, pipeline

    monkeypatch.setattr(distributed, "launched", lambda: True)
    monkeypatch.setattr(pipeline, "driver_for", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(RecipeError, match="^allocator 'fermigrad' cannot be used across several processes"):
        zsfw.compress(copy.deepcopy(llama), recipe(allocator="fermigrad"), windows)
