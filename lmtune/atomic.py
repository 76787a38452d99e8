"""Writing so that nobody sees half a file: write beside the final place, then rename.

A reader (a resumed run, `lmtune eval`, the token cache, the hub) finds either the old version or the
complete new one, never a file cut short by a full disk, a crash or a second Ctrl-C.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    except BaseException:
        remove(tmp)
        raise
    if into:
        final.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            f.replace(final / f.name)
        tmp.rmdir()
        return
    if folder:  # a folder cannot be renamed over a non-empty one
        remove(final)
    tmp.replace(final)
