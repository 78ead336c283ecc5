"""SHA-256 digests of the files zsfw writes and reads back: its cache entries and saved models.

One flipped byte in a cached covariance gives a model that outputs NaN; in a cached gradient,
factor or score, or in a saved model's weights, a silently different model. So every file is
hashed right after it is written (it is still in the page cache) and once more when it is read
back (about a second per GB).

A cache entry lists its files' digests in ``SHA256SUMS`` (the format of ``sha256sum``: ``sha256sum
-c SHA256SUMS`` checks one by hand); an entry that does not match is a miss. A saved model records
them in its ``config.json`` (``quantization_config.checksums``); one that does not match is an
error, unless ``ZSFW_SKIP_CHECKSUM=1`` (weights edited on purpose). A model saved before zsfw
recorded checksums loads unchecked.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable

from zsfw.errors import CheckpointError

log = logging.getLogger(__name__)

SUMS = "SHA256SUMS"
SKIP = "ZSFW_SKIP_CHECKSUM"
SHOWN = 12  # hex digits of a digest an error shows


def sha256_of(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_sums(folder: Path, digests: dict[str, str]) -> None:
    """Write ``folder``'s ``SHA256SUMS`` from the digests of its files (by name)."""
    (folder / SUMS).write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items())))


def check_sums(folder: Path) -> None:
    """Check every file of ``folder`` against its ``SHA256SUMS``: a ``ValueError`` naming the first
    file that differs or is not listed, an ``OSError`` when the list or a listed file is missing."""
    listed = {}
    for line in (folder / SUMS).read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    unlisted = sorted({p.name for p in folder.iterdir()} - set(listed) - {SUMS})
    if unlisted:
        raise ValueError(f"{unlisted[0]} is not in {SUMS}")
    for name, digest in listed.items():
        found = sha256_of(folder / name)
        if found != digest:
            raise ValueError(f"{name} has sha256 {found[:SHOWN]}…, {SUMS} records {digest[:SHOWN]}…")


def check_checkpoint(files: Iterable[str | Path], recorded: dict[str, str] | None) -> None:
    """Check a saved model's weight files against the digests its config.json records (by file
    name): a ``CheckpointError`` naming the first file that differs. Nothing to check when none
    are recorded (saved before zsfw recorded them) or with ``ZSFW_SKIP_CHECKSUM=1``."""
    if os.environ.get(SKIP, "") not in ("", "0"):
        log.warning("%s is set: the weight files are not checked against their recorded checksums", SKIP)
        return
    if not recorded:
        log.debug("no checksums recorded in config.json (saved by an older zsfw): weight files not checked")
        return
    for path in files:
        expected, found = recorded.get(Path(path).name), sha256_of(path)
        if found != expected:
            raise CheckpointError(
                f"{str(path)!r} has sha256 {found[:SHOWN]}…, but config.json records "
                f"{expected[:SHOWN] + '…' if expected else 'none for it'}: the weights were changed or "
                f"swapped; re-save the model, or set {SKIP}=1 to load edited weights anyway")
