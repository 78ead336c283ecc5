"""Where a compressed model is written: checked before any work, replaced without losing anything.

Nothing the user owns is ever deleted. An existing destination is replaced only with
``overwrite`` and only when it is an empty folder or a previous zsfw output (its ``config.json``
has a zsfw ``quantization_config``); a destination that is, or contains, the model's source, the
working folder or the home folder is refused. The destination's parent is created and probed
with a temporary folder, and its free space is compared with the bytes to be written, so an
unwritable or full destination fails in one line before the model is loaded or compressed.

A finished save (a hidden folder next to the destination) is swapped into place atomically with
``renameat2(RENAME_EXCHANGE)`` where the OS has it; elsewhere the old output is renamed aside and
restored if the second rename fails. Another program may have made a folder at the destination
while zsfw worked: it is checked again by the same rules just before the swap and once more after
it, swapped back untouched when it may not be replaced, and the finished save is then kept beside
it under a name the error gives. New folders and files honour the process umask.

A write that fails for a reason of the filesystem (full, read-only, forbidden: ``writing``) is a
one-line ``DestinationError`` naming the folder, the reason and what to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from zsfw.checkpoint.files import read_config
from zsfw.checkpoint.schema import QUANT_METHOD
from zsfw.errors import CheckpointError, DestinationError

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
SPACE_MARGIN = 1.05  # headroom over the predicted bytes (safetensors headers, report of a big model)
SPACE_EXTRA = 1_000_000  # and for the small files: config, recipe, report of a small model
OUTPUT_SETTING = "give it as --output (output_dir=)"
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
FORBIDDEN = (errno.EROFS, errno.EACCES, errno.EPERM)


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
    if out.exists() or out.is_symlink():
        check_replaceable(out, overwrite)
    probe(out.parent, OUTPUT_SETTING)
    if needed:
        check_space(out, needed)
    return out


def check_replaceable(out: Path, overwrite: bool, found: Path | None = None) -> None:
    """Refuse to replace the existing ``out`` (its content moved to ``found``, if it was) unless
    ``overwrite`` and it is an empty folder or a previous zsfw output."""
    found = found or out
    if found.is_symlink() or not found.is_dir():
        raise DestinationError(f"output path {str(out)!r} exists and is not a folder; choose a folder")
    if not overwrite:
        raise DestinationError(f"output folder {str(out)!r} already exists; pass overwrite=True "
                               f"(CLI: --overwrite) to replace it")
    if any(found.iterdir()) and not is_zsfw_output(found):
        raise DestinationError(f"output folder {str(out)!r} holds files that are not a zsfw output; "
                               f"overwrite replaces only an empty folder or a previous zsfw "
                               f"output: choose another folder")


def probe(folder: Path, setting: str) -> None:
    """Create ``folder`` and a temporary folder in it, or fail naming why (``setting``: how to
    choose another folder, for the error)."""
    with writing("", folder, setting):
        folder.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".zsfw-probe-", dir=folder)).rmdir()


def write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write: an ``OSError``'s, or the one safetensors' writer puts in its
    message ("... No space left on device (os error 28)"); None for any other failure."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return int(found.group(1)) if found else None


@contextmanager
def writing(what: str, folder: Path, setting: str, after: str = "") -> Iterator[None]:
    """Writes of ``what`` in ``folder``: one that fails for a reason of the filesystem (full,
    read-only, forbidden, not a folder) becomes a one-line ``DestinationError`` naming the folder,
    the reason and what to do (``setting``: how to choose another folder; ``after``: what became
    of the work, said last)."""
    try:
        yield
    except Exception as exc:
        code = write_errno(exc)
        if code is None:
            raise
        fix = ("free space there or choose a folder on another disk" if code in FULL else
               "choose a writable folder" if code in FORBIDDEN else "choose another folder")
        raise DestinationError(f"cannot write {what + ' ' if what else ''}in {str(folder)!r}: "
                               f"{os.strerror(code)}; {fix}: {setting}{'; ' + after if after else ''}"
                               ) from exc


def check_space(out: Path, needed: int) -> None:
    """Refuse when the destination's filesystem has less free space than ``needed`` bytes and
    the headroom."""
    free, room = shutil.disk_usage(out.parent).free, needed * SPACE_MARGIN + SPACE_EXTRA
    if free < room:
        raise DestinationError(f"{str(out.parent)!r} has {free / 1e6:.0f} MB free, the compressed "
                               f"model needs about {room / 1e6:.0f} MB; free space "
                               f"or choose another folder")


def replace(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an existing ``out`` atomically where
    the OS allows; the old output is removed only once the new one is in place.

    What is at ``out`` now may have appeared while zsfw worked: it is replaced only as
    ``check_replaceable`` allows, checked before the swap and again once swapped out (it may have
    changed in between); otherwise it is left as it was and ``tmp`` is kept beside it under a
    name the ``DestinationError`` gives.
    """
    if _move_new(tmp, out):
        return
    try:
        check_replaceable(out, overwrite)
        if _renameat2(tmp, out, RENAME_EXCHANGE):
            _check_swapped(out, tmp, overwrite, lambda: _renameat2(tmp, out, RENAME_EXCHANGE))
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
            return
        old = out.with_name(f".{out.name}.zsfw-old-{os.getpid()}")
        os.rename(out, old)
        _check_swapped(out, old, overwrite, lambda: os.rename(old, out))
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except DestinationError as exc:
        raise DestinationError(f"{exc}; nothing there was changed: the compressed model is saved in "
                               f"{str(_keep(tmp, out))!r} instead") from None


def _check_swapped(out: Path, found: Path, overwrite: bool, undo: Callable[[], object]) -> None:
    """``check_replaceable`` of what was at ``out``, now at ``found``; ``undo`` puts it back first
    when it may not be replaced."""
    try:
        check_replaceable(out, overwrite, found)
    except DestinationError:
        undo()
        raise


def _move_new(tmp: Path, out: Path) -> bool:
    """Rename ``tmp`` to ``out`` when nothing is there; False when something is (it may have
    appeared a moment ago: renameat2's RENAME_NOREPLACE never replaces it)."""
    try:
        if _renameat2(tmp, out, RENAME_NOREPLACE):
            return True
        if out.exists() or out.is_symlink():
            return False
        os.rename(tmp, out)  # replaces at most an empty folder made since the line above
        return True
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise


def _keep(tmp: Path, out: Path) -> Path:
    """``tmp`` renamed to a new visible folder beside ``out`` (``<name>.zsfw-saved-…``), out of
    reach of the sweep of folders left by dead runs."""
    kept = Path(tempfile.mkdtemp(prefix=f"{out.name}.zsfw-saved-", dir=out.parent))
    os.rename(tmp, kept)  # onto the empty folder just made
    return kept


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2 of ``a`` to ``b`` with ``flags`` (swap both, or never replace ``b``):
    False where it is not available."""
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path, use_errno=True) if path else None
    function = getattr(libc, "renameat2", None)
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
