"""Files and folders zsfw writes for itself: where they live (cache, spill), work folders that a
killed run leaves behind for the next one to sweep, permissions that honour the umask, and
writes that appear whole or not at all (a temporary name next to the target, renamed into place).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """Where fetched files and the default spill folder live: ``$ZSFW_CACHE`` if set, else
    ``~/.cache/zsfw``."""
    return Path(os.environ.get("ZSFW_CACHE") or Path.home() / ".cache" / "zsfw").expanduser()


def spill_root() -> Path:
    """Where temporary factor stores and disk-offloaded boundaries live: ``$ZSFW_SPILL``, else
    ``<zsfw cache>/spill``."""
    return Path(os.environ.get("ZSFW_SPILL") or cache_dir() / "spill").expanduser()


def current_umask() -> int:
    """The process umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions the umask gives a new file (mkstemp and safetensors give 0600)."""
    return 0o666 & ~current_umask()


def honour_umask(folder: Path) -> None:
    """Give every file under ``folder`` the permissions the umask gives a new file."""
    mode = file_mode()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def work_folder(parent: Path, prefix: str) -> Path:
    """A new folder ``<prefix><pid>-<random>`` in ``parent``, after removing the folders with that
    prefix that processes no longer running left behind (a kill -9 skips every cleanup)."""
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def new_folder(parent: Path, prefix: str) -> Path:
    """A fresh work folder in ``parent`` (see ``work_folder``) with the permissions the umask
    gives (not mkdtemp's 0700)."""
    folder = work_folder(parent, prefix)
    folder.chmod(0o777 & ~current_umask())
    return folder


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def atomic_file(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``target`` (ending in ``suffix``, for writers that go by it),
    renamed to ``target`` with the umask's permissions only if the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(name)
        os.chmod(name, file_mode())
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)


def publish(folder: Path, final: Path) -> bool:
    """Rename the finished ``folder`` to ``final`` unless another run published it first (then
    ``folder`` is removed); whether ours is the one in place."""
    if final.exists():
        shutil.rmtree(folder, ignore_errors=True)
        return False
    os.replace(folder, final)
    return True
