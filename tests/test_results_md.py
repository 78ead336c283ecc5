"""benchmarks/results_md.py writes the scripts' sections into benchmarks/log/, never into the summary;
the summary and the log index link to files that exist."""

import importlib.util
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
QUESTIONS = ["Quality vs the authors", "Formats at equal bytes", "Allocators", "Correctors", "Stages", "Scale",
             "Speed"]


@pytest.fixture
def results_md(tmp_path, monkeypatch):
    """The module with its log folder in tmp_path, holding an index and one marked section."""
    spec = importlib.util.spec_from_file_location("results_md", BENCHMARKS / "results_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "README.md").write_text("| file | what |\n|---|---|\n| [a.md](a.md) | one |\n")
    (tmp_path / "a.md").write_text("## Old (2026-01-01)\n\n<!-- speed:start -->\n| old |\n<!-- speed:end -->\n\nProse.\n")
    monkeypatch.setattr(module, "LOG", tmp_path)
    return module


def test_a_rerun_replaces_its_section_in_the_log_file_that_holds_it(results_md, tmp_path):
    results_md.write_section("speed", "| new |\n")
    assert (tmp_path / "a.md").read_text() == ("## Old (2026-01-01)\n\n<!-- speed:start -->\n| new |\n"
                                               "<!-- speed:end -->\n\nProse.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "a.md"]


def test_a_new_section_gets_its_own_file_listed_in_the_index(results_md, tmp_path):
    results_md.write_section("scale", "## Scale\n\n| row |")
    assert (tmp_path / "scale.md").read_text() == "<!-- scale:start -->\n## Scale\n\n| row |\n<!-- scale:end -->\n"
    index = (tmp_path / "README.md").read_text()
    assert index.startswith("| file | what |\n|---|---|\n| [a.md](a.md) | one |\n| [scale.md](scale.md) | ")
    assert "section `scale`" in index


def test_an_unmarked_file_of_that_name_is_added_to_not_replaced(results_md, tmp_path):
    (tmp_path / "scale.md").write_text("History.\n")
    results_md.write_section("scale", "| row |")
    assert (tmp_path / "scale.md").read_text() == "History.\n\n<!-- scale:start -->\n| row |\n<!-- scale:end -->\n"


def test_a_section_marked_in_two_files_is_refused(results_md, tmp_path):
    (tmp_path / "b.md").write_text("<!-- speed:start -->\n<!-- speed:end -->\n")
    with pytest.raises(ValueError, match="'speed' is marked in 2 log files"):
        results_md.write_section("speed", "| new |")
    assert (tmp_path / "b.md").read_text() == "<!-- speed:start -->\n<!-- speed:end -->\n"


def test_the_summary_has_one_section_per_question_and_no_script_markers():
    summary = (BENCHMARKS / "RESULTS.md").read_text()
    headings = re.findall(r"^#+ (.+)$", summary, flags=re.MULTILINE)
    assert [h for h in headings if h in QUESTIONS] == QUESTIONS
    assert len(headings) == len(set(headings))
    assert "<!--" not in summary


def test_the_summary_and_the_log_index_link_to_log_files_that_exist():
    log = BENCHMARKS / "log"
    listed = re.findall(r"\]\(([\w.-]+\.md)\)", (log / "README.md").read_text())
    assert sorted(listed) == sorted(p.name for p in log.glob("*.md") if p.name != "README.md")
    links = re.findall(r"\]\((log/[^)#]+)\)", (BENCHMARKS / "RESULTS.md").read_text())
    assert links and all((BENCHMARKS / link).is_file() for link in links)
