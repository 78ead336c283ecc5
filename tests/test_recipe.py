from pathlib import Path

import pytest
import torch
import yaml

import zsfw
from helpers import billion_laughs
from zsfw.compression.targets import find_targets
from zsfw.errors import RecipeError, TargetError
from zsfw.recipe import load_recipe

GOOD = """
my_stage:
  my_modifiers:
    ZeroSumSVDModifier:
      ratio: 0.7
      corrector: {name: projected_gradient, cycles: 3}
      calibration: {samples: 4, sequence_length: 16}
"""


def test_path_string_dict_and_object_give_the_same_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    from_path = load_recipe(path)
    from_str_path = load_recipe(str(path))
    from_yaml = load_recipe(GOOD)
    from_dict = load_recipe(yaml.safe_load(GOOD))
    from_object = load_recipe(zsfw.ZeroSumSVDModifier(
        ratio=0.7, corrector={"name": "projected_gradient", "cycles": 3},
        calibration={"samples": 4, "sequence_length": 16}))
    mods = [r.modifier for r in (from_path, from_str_path, from_yaml, from_dict, from_object)]
    assert all(m == mods[0] for m in mods)
    assert mods[0].corrector.options == {"cycles": 3}
    assert load_recipe(from_yaml.to_yaml()).modifier == mods[0]


@pytest.mark.parametrize("body,expected", [
    ("ratio: 1.5", r"<yaml string>: s\.m\.ZeroSumSVDModifier\.ratio: .*less than or equal to 1.*got 1\.5"),
    ("ratios: 0.5", r"ratios: unknown key; allowed keys: targets, ignore, ratio"),
    ("calibration: {samples: 4, seq_len: 8}", r"calibration\.seq_len: unknown key; allowed keys: samples, sequence_length"),
    ("calibration: {samples: 0}", r"calibration\.samples: .*greater than 0.*got 0"),
    ("calibration: {samples: 2, gradient_samples: 3}", r"gradient_samples \(3\) must be <= samples \(2\)"),
    ("scorer: magic", r"scorer: 'magic' is not a registered scorer; registered: first_order, sigma"),
    ("allocator: {name: nope}", r"allocator: 'nope' is not a registered allocator; registered: .*zero_sum"),
    ("storage: int5", r"storage: 'int5' is not a registered storage; registered: auto, bf16, fp16, fp32, fp8, int2, int3, int4, int8"),
    ("targets: ['re:(']", r"targets: .*'re:\(' is not a valid regex.*got \['re:\('\]"),
    ("whiten: maybe", r"whiten: .*valid boolean.*got 'maybe'"),
])
def test_validation_errors_name_key_value_and_allowed(body, expected):
    text = "s:\n  m:\n    ZeroSumSVDModifier:\n      " + body + "\n"
    with pytest.raises(RecipeError, match=expected):
        load_recipe(text)


def test_structure_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="unknown modifier 'QuantizationModifier'; allowed: ZeroSumSVDModifier"):
        load_recipe({"s": {"m": {"QuantizationModifier": {}}}})
    with pytest.raises(RecipeError, match="exactly one stage"):
        load_recipe({"a": {}, "b": {}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("s:\n  m:\n    ZeroSumSVDModifier:\n      ratio: -1\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: s\.m\.ZeroSumSVDModifier\.ratio"):
        load_recipe(bad)


def test_targets_that_match_nothing_or_non_linear_are_errors(llama):
    with pytest.raises(TargetError, match=r"\['re:.*nothing_here'\] match no module"):
        find_targets(llama, ["Linear", "re:.*nothing_here"], [])
    with pytest.raises(TargetError, match="is a LlamaMLP, not a torch.nn.Linear"):
        find_targets(llama, ["re:model\\.layers\\.0\\.mlp"], [])
    found = find_targets(llama, ["re:.*mlp\\..*_proj"], ["re:.*down_proj"])
    assert sorted(n.rsplit(".", 1)[1] for n in found) == ["gate_proj", "gate_proj", "up_proj", "up_proj"]
    assert "lm_head" not in find_targets(llama, ["Linear"], [])  # tied output embedding


SHIPPED = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_shipped_recipes_validate():
    assert len(SHIPPED) >= 5
    for path in SHIPPED:
        load_recipe(path)
    assert load_recipe(Path(__file__).parent.parent / "recipes" / "zero_sum.yaml").modifier == load_recipe(None).modifier


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_compresses_the_tiny_model(path, llama, windows):
    from helpers import patterned_windows

    recipe = load_recipe(path)
    recipe.modifier.calibration = recipe.modifier.calibration.model_copy(update={"samples": 8, "sequence_length": 32})
    model, report = zsfw.compress(llama, recipe, windows, validation=patterned_windows(4, seed=1),
                                  training=patterned_windows(4, seed=2))
    assert 0 < report.total_bytes <= report.budget_bytes  # (bytes as written: tests/test_checkpoint.py)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=windows[:2]).logits).all()


def test_r5_nested_aliases_are_refused_in_one_short_line(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    for recipe in (path, path.read_text()):
        with pytest.raises(RecipeError, match=r"aliases expand to \d+ values, more than the 100000") as info:
            load_recipe(recipe)
        assert "\n" not in str(info.value) and len(str(info.value)) < 500
    # aliases that expand to little are YAML a recipe may use
    with pytest.raises(RecipeError, match=r"ignore\.0: Input should be a valid string \(got \['lol'"):
        load_recipe(billion_laughs(levels=2, width=3))
    aliased = load_recipe("s:\n  m:\n    ZeroSumSVDModifier:\n      targets: &t ['re:.*mlp.*']\n"
                          "      ignore: *t\n")
    assert aliased.modifier.ignore == aliased.modifier.targets == ["re:.*mlp.*"]


def test_r5_huge_values_are_cut_short_in_messages():
    shared: list = ["lol"] * 10
    for _ in range(9):  # 10**10 strings if expanded, 100 lists in memory
        shared = [shared] * 10
    with pytest.raises(RecipeError, match=r"ignore\.0: .*valid string \(got \[\[\[") as info:
        load_recipe({"s": {"m": {"ZeroSumSVDModifier": {"ignore": shared}}}})
    message = str(info.value)
    assert "\n" not in message and len(message) < 500 and "(and 9 more error(s)" in message
    with pytest.raises(RecipeError, match=r"valid regex") as info:
        load_recipe({"s": {"m": {"ZeroSumSVDModifier": {"targets": ["re:(" + "x" * 100_000]}}}})
    assert len(str(info.value)) < 500


def test_r5_self_referencing_aliases_and_bad_yaml_are_one_line():
    with pytest.raises(RecipeError, match="aliases expand to"):
        load_recipe("s: &a\n  m: *a\n")
    with pytest.raises(RecipeError, match=r"<yaml string>: not valid YAML: expected ',' or ']', "
                                          r"but got '<stream end>' at line 2, column 3$"):
        load_recipe("s: [1,\n b")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_r10_utf16_and_utf8_with_a_byte_order_mark_are_read(tmp_path, encoding):
    path = tmp_path / "r.yaml"
    path.write_bytes(("# café\n" + GOOD).encode(encoding))
    assert load_recipe(path).modifier == load_recipe(GOOD).modifier


def test_r10_a_recipe_that_is_not_utf8_is_one_line_naming_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(("# café\n" + GOOD).encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1\.yaml: byte 5 \(0xe9\) is not UTF-8 text .*"
                                          r"recipes must be UTF-8") as info:
        load_recipe(path)
    assert "\n" not in str(info.value)
