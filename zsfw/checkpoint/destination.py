"""Where a compressed model is written: checked before any work, replaced without losing anything.

Nothing the user owns is ever deleted. An existing destination is replaced only with
``overwrite`` and only when it is an empty folder or a previous zsfw output (its ``config.json``
has a zsfw ``quantization_config``); a destination that is, or contains, the model's source, the
working folder or the home folder is refused. The destination's parent is created and probed
with a temporary folder, and its free space is compared with the bytes to be written, so an
unwritable or full destination fails in one line before the model is loaded or compressed.

A finished save (a hidden folder next to the destination) is swapped into place atomically with
``renameat2(RENAME_EXCHANGE)`` where the OS has it; elsewhere the old output is renamed aside and
restored if the second rename fails. New folders and files honour the process umask.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from zsfw.checkpoint.files import read_config
from zsfw.checkpoint.schema import QUANT_METHOD
from zsfw.errors import CheckpointError, DestinationError

AT_FDCWD = -100
RENAME_EXCHANGE = 2
SPACE_MARGIN = 1.05  # headroom over the predicted bytes (headers, tokenizer, report)


def is_zsfw_output(folder: Path) -> bool:
    """Whether ``folder`` holds a model saved by zsfw (a config with a zsfw quantization_config)."""
    try:
        config = read_config(folder).get("quantization_config")
    except CheckpointError:
        return False
    return isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD


def check_destination(out: str | os.PathLike, overwrite: bool, protected: Iterable[str | os.PathLike] = (),
                      needed: int = 0) -> Path:
    """The resolved destination, or a ``DestinationError`` saying why it cannot be written.

    ``protected`` are further paths that must not be replaced (the model's source: entries that
    are not existing paths, such as a hub id, are ignored); ``needed`` the bytes to be written.
    """
    out = Path(out).expanduser().resolve()
    guarded = {"the working folder": Path.cwd(), "the home folder": Path.home(),
               **{"the model's source": Path(p).expanduser().resolve()
                  for p in protected if p and Path(p).expanduser().exists()}}
    for what, path in guarded.items():
        if out == path or out in path.resolve().parents:
            raise DestinationError(f"output folder {str(out)!r} is or contains {what} ({str(path)!r}); "
                                   f"choose a new folder")
    if out.exists():
        if not out.is_dir():
            raise DestinationError(f"output path {str(out)!r} exists and is not a folder; choose a folder")
        if not overwrite:
            raise DestinationError(f"output folder {str(out)!r} already exists; pass overwrite=True "
                                   f"(CLI: --overwrite) to replace it")
        if any(out.iterdir()) and not is_zsfw_output(out):
            raise DestinationError(f"output folder {str(out)!r} holds files that are not a zsfw output; "
                                   f"overwrite replaces only an empty folder or a previous zsfw "
                                   f"output: choose another folder")
    _probe(out.parent)
    if needed:
        check_space(out, needed)
    return out


def _probe(parent: Path) -> None:
    """Create ``parent`` and a temporary folder in it, or fail naming why."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".zsfw-probe-", dir=parent)).rmdir()
    except OSError as exc:
        raise DestinationError(f"cannot write in {str(parent)!r}: {exc.strerror or exc}; choose a "
                               f"writable folder") from None


def check_space(out: Path, needed: int) -> None:
    """Refuse when the destination's filesystem has less free space than ``needed`` bytes."""
    free = shutil.disk_usage(out.parent).free
    if free < needed * SPACE_MARGIN:
        raise DestinationError(f"{str(out.parent)!r} has {free / 1e6:.0f} MB free, the compressed "
                               f"model needs about {needed * SPACE_MARGIN / 1e6:.0f} MB; free space "
                               f"or choose another folder")


def new_folder(parent: Path, prefix: str) -> Path:
    """A fresh work folder in ``parent`` (see ``work_folder``) with the permissions the umask
    gives (not mkdtemp's 0700)."""
    folder = work_folder(parent, prefix)
    folder.chmod(0o777 & ~current_umask())
    return folder


def work_folder(parent: Path, prefix: str) -> Path:
    """A new folder ``<prefix><pid>-<random>`` in ``parent``, after removing the folders with that
    prefix that processes no longer running left behind (a kill -9 skips every cleanup)."""
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def file_mode() -> int:
    """The permissions the umask gives a new file (mkstemp and safetensors give 0600)."""
    return 0o666 & ~current_umask()


def honour_umask(folder: Path) -> None:
    """Give every file under ``folder`` the permissions the umask gives a new file."""
    mode = file_mode()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def current_umask() -> int:
    """The process umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an existing ``out`` atomically where
    the OS allows; the old output is removed only once the new one is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
        return
    old = out.with_name(f".{out.name}.zsfw-old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where that is not available."""
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path, use_errno=True) if path else None
    function = getattr(libc, "renameat2", None)
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
