"""The worked example plugin in ``examples/``, discovered the way pip would install it."""

import copy
import sys
from pathlib import Path

import pytest

import zsfw
from helpers import recipe
from zsfw import plugins
from zsfw.cli import main

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "zsfw-example-scorer"


@pytest.fixture
def installed_example(monkeypatch, tmp_path):
    """The example as an installed distribution: its folder on ``sys.path`` and a dist-info whose
    ``entry_points.txt`` is its pyproject's ``[project.entry-points.zsfw]`` table, so that
    ``importlib.metadata`` discovers it as a real entry point; a plugin manager built afresh."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n")
    entries = "".join(f"{name} = {value}\n" for name, value in project["entry-points"]["zsfw"].items())
    (info / "entry_points.txt").write_text(f"[zsfw]\n{entries}")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_manager", None)
    monkeypatch.setattr(plugins, "_registry", None)
    yield project
    sys.modules.pop("zsfw_example_scorer", None)


def _ranks(report) -> dict[str, int]:
    return {layer.name: layer.rank for layer in report.layers}


def test_the_example_scorer_is_discovered_through_its_entry_point_and_used_by_name(installed_example, llama,
                                                                                   windows, capsys):
    component = plugins.registry()["scorer"]["damped_first_order"]
    assert (component.distribution, component.version) == (installed_example["name"], installed_example["version"])
    assert main(["plugins"]) == 0
    assert "damped_first_order" in capsys.readouterr().out

    def compress(scorer):
        return zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, scorer=scorer), windows)[1]

    first_order = compress("first_order")
    undamped = compress({"name": "damped_first_order", "alpha": 0.0})
    damped = compress({"name": "damped_first_order", "alpha": 10.0})
    # alpha 0 is first_order exactly: the same plan and the same predicted loss change
    assert _ranks(undamped) == _ranks(first_order)
    assert [l.predicted_delta_loss for l in undamped.layers] == pytest.approx(
        [l.predicted_delta_loss for l in first_order.layers], rel=1e-9, abs=1e-12)
    # the σ² prior moves the budget between layers: the plugin's scores decide the plan
    assert _ranks(damped) != _ranks(first_order)
    assert damped.recipe["test_stage"]["modifiers"]["ZeroSumSVDModifier"]["scorer"] == {
        "name": "damped_first_order", "alpha": 10.0}


def test_the_example_scorer_checks_its_option(installed_example, llama, windows):
    with pytest.raises(zsfw.PluginError, match="alpha must be >= 0"):
        zsfw.compress(llama, recipe(scorer={"name": "damped_first_order", "alpha": -1.0}), windows)
