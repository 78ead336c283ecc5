"""Third-party plugins: installed through an entry point, or registered at run time."""

import subprocess
import sys

import pytest

import zsfw
from zsfw import plugins

PLUGIN_SOURCE = '''
import torch
import zsfw


class NegativeSigmaScorer:
    """Scores every component by -σ: easy to recognise in the report."""

    name = "negative_sigma"
    needs_gradient = False

    def score(self, layer):
        return -layer.sigma


@zsfw.hookimpl
def zsfw_register_scorers(register):
    register(NegativeSigmaScorer)
'''


def _install_fake_distribution(root, module, body, entry_name):
    (root / f"{module}.py").write_text(body)
    info = root / f"{module}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[zsfw]\n{entry_name} = {module}\n")


@pytest.fixture
def fresh_plugins(monkeypatch, tmp_path):
    """A plugin manager rebuilt from scratch, with tmp_path on sys.path for fake installs."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_manager", None)
    monkeypatch.setattr(plugins, "_registry", None)
    yield tmp_path
    plugins._manager = None
    plugins._registry = None


def test_installed_plugin_is_used_by_name_from_a_recipe(fresh_plugins, llama, windows):
    _install_fake_distribution(fresh_plugins, "zsfw_reverse", PLUGIN_SOURCE, "reverse")
    component = plugins.registry()["scorer"]["negative_sigma"]
    assert (component.plugin, component.distribution, component.version) == ("reverse", "zsfw_reverse", "1.2.3")
    recipe = {"s": {"m": {"ZeroSumSVDModifier": {
        "ratio": 0.7, "scorer": "negative_sigma", "calibration": {"samples": 4, "sequence_length": 32}}}}}
    model, report = zsfw.compress(llama, recipe, windows[:4])
    assert report.recipe["s"]["m"]["ZeroSumSVDModifier"]["scorer"] == "negative_sigma"
    # the report's predicted ΔL is the sum of this scorer's (negative) scores
    assert all(l.predicted_delta_loss < 0 for l in report.layers if l.rank < l.full_rank)


def test_autoload_can_be_disabled(fresh_plugins, monkeypatch):
    _install_fake_distribution(fresh_plugins, "zsfw_reverse", PLUGIN_SOURCE, "reverse")
    monkeypatch.setenv("ZSFW_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "negative_sigma" not in plugins.names("scorer")
    assert "first_order" in plugins.names("scorer")  # built-ins still load


def test_every_shipped_plugin_is_a_built_in():
    """The distribution's entry points and the built-ins are the same set of modules."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    shipped = pyproject["project"]["entry-points"]["zsfw"]
    assert sorted(shipped.values()) == sorted(plugins.DEFAULT_PLUGINS)


def test_default_recipe_runs_with_autoload_disabled(fresh_plugins, monkeypatch, llama, windows):
    """The default recipe's corrector (refine) and a storage list (auto) need no entry points."""
    monkeypatch.setenv("ZSFW_DISABLE_PLUGIN_AUTOLOAD", "1")
    recipe = zsfw.load_recipe(None).to_dict()
    modifier = recipe["zero_sum_stage"]["compression_modifiers"]["ZeroSumSVDModifier"]
    modifier["calibration"].update(samples=4, sequence_length=32, validation_samples=2)
    modifier["corrector"].update(steps=2, validate_every=1)
    modifier.update(ratio=0.3, storage=["bf16", "int8"])  # below int8's 0.5: some layers low rank
    model, report = zsfw.compress(llama, recipe, windows)
    assert report.correction_result  # refine ran
    assert {l.format for l in report.layers} <= {"bf16", "int8"}  # auto chose among the list


def test_broken_plugin_becomes_a_warning_naming_it(fresh_plugins):
    _install_fake_distribution(fresh_plugins, "zsfw_broken", "raise ImportError('no numpy 9')", "broken")
    with pytest.warns(UserWarning, match=r"zsfw plugin 'broken' \(from zsfw_broken 1.2.3\) failed to load.*no numpy 9"):
        names = plugins.names("allocator")
    assert "zero_sum" in names


def test_a_name_clash_keeps_the_first_warns_and_fails_only_where_used(fresh_plugins, llama, windows):
    class Clash:
        @zsfw.hookimpl
        def zsfw_register_allocators(self, register):
            class Impostor:
                name = "zero_sum"
            register(Impostor)

    plugins.register_plugin(Clash(), name="clash")
    with pytest.warns(UserWarning, match=r"allocator 'zero_sum' is registered by plugin 'zsfw_zerosum' "
                                         r"\(from zsfw .*\) and by plugin 'clash'.*keeping the first"):
        registered = plugins.registry()
    assert registered["allocator"]["zero_sum"].plugin == "zsfw_zerosum"
    assert "uniform" in registered["allocator"]  # everything else still works
    with pytest.raises(zsfw.RecipeError, match=r"allocator: allocator 'zero_sum' is registered by plugin "
                                               r"'zsfw_zerosum'.* and by plugin 'clash'"):
        zsfw.load_recipe({"s": {"m": {"ZeroSumSVDModifier": {"allocator": "zero_sum"}}}})
    zsfw.load_recipe({"s": {"m": {"ZeroSumSVDModifier": {"allocator": "uniform"}}}})


BAD_PLUGINS = {
    "misspelled_hook": "import zsfw\n@zsfw.hookimpl\ndef zsfw_register_scorer(register):\n    pass\n",
    "wrong_argument": "import zsfw\n@zsfw.hookimpl\ndef zsfw_register_scorers(registrar):\n    pass\n",
    "raises_in_hook": "import zsfw\n@zsfw.hookimpl\ndef zsfw_register_scorers(register):\n    1 / 0\n",
    "nameless_class": "import zsfw\n@zsfw.hookimpl\ndef zsfw_register_scorers(register):\n    register(int)\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_PLUGINS))
def test_a_bad_plugin_is_skipped_with_a_warning_naming_its_distribution(fresh_plugins, kind):
    _install_fake_distribution(fresh_plugins, f"zsfw_{kind}", BAD_PLUGINS[kind], kind)
    _install_fake_distribution(fresh_plugins, "zsfw_reverse", PLUGIN_SOURCE, "reverse")
    with pytest.warns(UserWarning, match=rf"plugin '{kind}' \(from zsfw_{kind} 1.2.3\)"):
        names = plugins.names("scorer")
    assert {"first_order", "sigma", "negative_sigma"} <= set(names)  # the others still register


def test_runtime_registration_and_bad_options(fresh_plugins):
    class Halve:
        name = "halve"

        def allocate(self, layers, budget):
            return {l.name: max(1, l.full_rank // 2) for l in layers}

    class Plugin:
        @zsfw.hookimpl
        def zsfw_register_allocators(self, register):
            register(Halve)

    zsfw.register_plugin(Plugin(), name="halving")
    assert plugins.registry()["allocator"]["halve"].distribution == "(not installed)"
    with pytest.raises(plugins.PluginError, match=r"plugin 'typo' is invalid.*zsfw_register_scorer"):
        class Typo:
            @zsfw.hookimpl
            def zsfw_register_scorer(self, register):
                pass

        zsfw.register_plugin(Typo(), name="typo")
    with pytest.raises(plugins.PluginError, match=r"corrector 'projected_gradient' rejected its options \{'cycle': 2\}"):
        plugins.create("corrector", "projected_gradient", {"cycle": 2})


def test_cli_lists_plugins_with_distribution():
    out = subprocess.run([sys.executable, "-m", "zsfw.cli", "plugins"], capture_output=True,
                         text=True, check=True).stdout
    assert "scorers:" in out and "storages:" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("zero_sum"))
    assert "zsfw_zerosum" in line and zsfw.__version__ in line
