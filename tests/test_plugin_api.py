"""The shipped plugins use only the public plugin API: names of ``zsfw`` and ``zsfw.errors``."""

import ast
from pathlib import Path

import pytest

import zsfw

PLUGINS = sorted((Path(__file__).parents[1] / "plugins").glob("zsfw_*/__init__.py"))
PUBLIC_MODULES = {"zsfw", "zsfw.errors"}


def _private_uses(tree: ast.AST) -> list[str]:
    """Every import of a zsfw module other than the public ones, and every ``zsfw.<name>`` that
    ``zsfw`` does not export."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "zsfw":
            if node.module not in PUBLIC_MODULES:
                bad.append(f"line {node.lineno}: from {node.module} import …")
            elif node.module == "zsfw":
                bad += [f"line {node.lineno}: zsfw.{a.name}" for a in node.names if a.name not in zsfw.__all__]
        elif isinstance(node, ast.Import):
            bad += [f"line {node.lineno}: import {a.name}" for a in node.names
                    if a.name.startswith("zsfw.") and a.name not in PUBLIC_MODULES]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "zsfw"
              and node.attr not in zsfw.__all__ and node.attr != "errors"):
            bad.append(f"line {node.lineno}: zsfw.{node.attr}")
    return bad


def test_there_are_plugins_to_check():
    assert len(PLUGINS) >= 12


@pytest.mark.parametrize("path", PLUGINS, ids=lambda p: p.parent.name)
def test_plugin_imports_only_public_names(path):
    assert _private_uses(ast.parse(path.read_text())) == []


def test_the_check_catches_private_imports():
    source = "import zsfw\nfrom zsfw.compression.linalg import x\nzsfw.plugins.create('a', 'b')\n"
    assert len(_private_uses(ast.parse(source))) == 2


@pytest.mark.parametrize("name", [n for n in zsfw.__all__ if n != "__version__"])
def test_every_public_name_resolves(name):
    assert getattr(zsfw, name) is not None
