"""Writing files and directories so that a crash never leaves half of one behind.

A file is written to a hidden temporary beside it, flushed to disk and renamed over the target: readers see
the old content or the new, never a mix. A directory (a checkpoint, an export) is built as a hidden sibling and
swapped into place the same way. Every stage that writes uses these; like `config` and `errors`, this module is
a leaf that imports nothing else from talm.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync(path: Path) -> None:
    """Flush a file's or a directory's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is atomic all the same
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The hidden temporary a write of `path` goes through (a crash may leave it; the next write reuses it)."""
    return path.with_name(f".{path.name}.tmp")


def write_atomically(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, overwrite: bool = True
) -> None:
    """Call `write(f)` on a temporary beside `path`, fsync it, then rename it to `path`.

    Without `overwrite` the last step is a hard link, which raises FileExistsError if `path` appeared meanwhile.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def staging_dir(target: Path) -> Path:
    """An empty hidden directory beside `target` to build its new content in (see `replace_dir`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def aside_path(target: Path) -> Path:
    """Where the previous `target` waits while the new one is renamed into place."""
    return target.with_name(f".{target.name}.old")


def replace_dir(staged: Path, target: Path) -> None:
    """Make the directory built in `staged` the new `target`: fsync it, move the old one aside, rename, and
    only then delete the old one. A crash in between leaves either directory complete (see
    `talm.checkpoint.recover_interrupted_save`)."""
    for f in staged.iterdir():
        fsync(f)
    fsync(staged)
    old = aside_path(target)
    if old.exists() and target.exists():  # an earlier swap crashed after its first rename: the old is stale
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    fsync(target.parent)
    if old.exists():
        shutil.rmtree(old)
