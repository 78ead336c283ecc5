"""The README and docs/ say what the code does: every ``zsfw`` command in them parses, every
Python block compiles, every relative link and anchor resolves, and the recipe reference names
every option the code takes."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from zsfw import plugins
from zsfw.cli import build_parser
from zsfw.recipe import CalibrationConfig, ExecutionConfig, ZeroSumSVDModifier, default_modifier, load_recipe

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _blocks(text: str, language: str | None = None) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if language is None or lang == language]


def zsfw_arguments(line: str) -> list[str] | None:
    """The arguments after ``zsfw`` if ``line`` (one shell command, no ``&&``) runs the zsfw CLI
    (``zsfw …``, ``.venv/bin/zsfw …``, ``python -m zsfw …``, ``torchrun … -m zsfw …``), else None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value before it
        words = words[1:]
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1]  # .venv/bin/zsfw, not the folder zsfw/
    if program == "zsfw":
        return words[1:]
    if program.startswith("python") or program == "torchrun":
        for i in range(1, len(words) - 1):
            if words[i:i + 2] == ["-m", "zsfw"]:
                return words[i + 2:]
    return None


def commands(text: str) -> list[list[str]]:
    """Every zsfw command in ``text``'s code blocks (continued lines joined, ``&&``/``;`` split)
    and in its inline code that gives an option (``zsfw compress --model M`` but not ``zsfw eval``)."""
    lines = []
    for block in _blocks(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += [span for span in INLINE.findall(text) if " --" in span]
    found = []
    for line in lines:
        for part in re.split(r"&&|\|\||;", line):
            arguments = zsfw_arguments(part.strip())
            if arguments is not None:
                found.append(arguments)
    return found


def parse_error(arguments: list[str]) -> str | None:
    """argparse's complaint about ``zsfw arguments`` (None when they parse)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(arguments)
    except SystemExit as exc:
        return None if exc.code == 0 else stderr.getvalue().strip().splitlines()[-1]
    return None


def test_the_checker_finds_commands_and_rejects_an_unknown_option():
    text = ("```bash\nzsfw compress --model M --output O\n"
            "torchrun --standalone --nproc_per_node=2 -m zsfw compress MODEL --recipe R\n```\n"
            "Prose with `python -m zsfw eval out --windows 8` and `zsfw inspect`.\n")
    found = commands(text)
    assert found == [["compress", "--model", "M", "--output", "O"], ["compress", "MODEL", "--recipe", "R"],
                     ["eval", "out", "--windows", "8"]]
    assert parse_error(found[0]) is None and parse_error(found[2]) is None
    assert "unrecognized arguments: MODEL" in parse_error(found[1])
    assert "unrecognized arguments: --bogus" in parse_error(["eval", "--bogus", "1"])


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_zsfw_command_in_the_docs_parses(path):
    found = commands(path.read_text())
    errors = [f"zsfw {shlex.join(arguments)}: {parse_error(arguments)}" for arguments in found
              if parse_error(arguments)]
    assert not errors, f"{path.name}: " + "; ".join(errors)


def test_the_readme_shows_the_commands_a_newcomer_runs():
    found = {arguments[0] for arguments in commands((REPO / "README.md").read_text()) if arguments}
    assert {"compress", "eval", "inspect", "plugins"} <= found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_python_block_compiles(path):
    for block in _blocks(path.read_text(), "python"):
        compile(block, str(path), "exec")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_and_their_anchors_resolve(path):
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{path.name}: broken links {broken}"


def test_the_recipe_reference_names_every_key_and_every_plugin_option():
    text = (REPO / "docs" / "recipes.md").read_text()
    keys = [*ZeroSumSVDModifier.model_fields, *CalibrationConfig.model_fields, *ExecutionConfig.model_fields]
    missing = [key for key in keys if f"`{key}`" not in text and f"{key}:" not in text]
    for kind in plugins.KINDS:
        for name, component in plugins.registry()[kind].items():
            if component.distribution != "zsfw":
                continue
            if f"`{name}`" not in text:
                missing.append(f"{kind} {name}")
            missing += [f"{kind} {name}: {option}" for option in sorted(plugins.option_names(kind, name) or ())
                        if f"`{option}`" not in text and f"{option}:" not in text]
    assert not missing, f"docs/recipes.md does not mention {missing}"


def test_the_recipe_reference_shows_the_defaults():
    """docs/recipes.md's "every key" block is a valid recipe equal to the built-in default."""
    block = next(b for b in _blocks((REPO / "docs" / "recipes.md").read_text(), "yaml") if "execution:" in b)
    assert load_recipe(block).modifier == default_modifier()
