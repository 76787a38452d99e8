"""Writing so that nobody sees half a file: write beside the final place, then rename.

A reader (a resumed run, `lmtune eval`, the token cache, the hub) finds either the old version or the
complete new one, never a file cut short by a full disk, a crash or a second Ctrl-C.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmtune.errors import LmtuneError


def cannot_write_in(folder: Path) -> str | None:
    """Why no file can be written in `folder` (the OS's words), or None when one can. The one sure test is
    a file made and removed there: permissions, read-only disks and root's exemptions all answer it."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lmtune-"):
            return None
    except OSError as err:
        return err.strerror or str(err)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def written_beside(final: Path, *, folder: bool = False, into: bool = False) -> Iterator[Path]:
    """Yield `.NAME.tmp` beside `final` to write into (a folder, made empty, if `folder`). When the block
    ends, it replaces `final`, or with `into` its files are moved into the folder `final` (which keeps its
    other files); if the block fails, it is removed and `final` is untouched."""
    tmp = final.with_name(f".{final.name}.tmp")
    remove(tmp)
    if folder or into:
        tmp.mkdir(parents=True)
    else:
        tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        honour_umask(tmp)
    except BaseException:
        remove(tmp)
        raise
    if into:
        try:
            final.mkdir(parents=True, exist_ok=True)
            if reason := cannot_write_in(final):  # before any file is moved: none or all of them
                raise PermissionError(errno.EACCES, reason, str(final))
            for f in tmp.iterdir():
                f.replace(final / f.name)
        finally:
            remove(tmp)
        return
    if folder:  # a folder cannot be renamed over a non-empty one
        remove(final)
    tmp.replace(final)


def write_text(path: Path, text: str) -> None:
    """`path` holding `text`, written beside it and renamed."""
    with written_beside(path) as tmp:
        tmp.write_text(text)


def honour_umask(path: Path) -> None:
    """Give `path` (and what a folder holds) the modes a plain `open` would: safetensors writes its files
    0600 whatever the umask, which leaves a run folder shared with a team unreadable to it."""
    mask = os.umask(0)
    os.umask(mask)
    for f in [path, *path.rglob("*")] if path.is_dir() else [path]:
        wanted = (0o777 if f.is_dir() else 0o666) & ~mask
        if not f.is_symlink() and stat.S_IMODE(f.stat().st_mode) != wanted:
            f.chmod(wanted)


def check_folder(flag: str, folder: Path) -> None:
    """Fail before the work, not after it, when the folder `flag` names cannot take files."""
    if not folder.is_dir():
        raise LmtuneError(f"{flag} {folder}: no such folder; make it first or choose another")
    if reason := cannot_write_in(folder):
        raise LmtuneError(f"{flag} {folder}: cannot write in it ({reason}); choose another folder")
