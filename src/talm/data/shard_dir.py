"""One worker's files in a data directory: opening it safely for a run, writing to it atomically, undoing it.

`ShardWriter` decides what goes into which shard; this module is the disk side it works through. Opening checks
what an earlier run left (another worker layout, other arguments, an unreadable manifest: refused with the way
out unless --overwrite), finds damaged shards, and removes stray files of an interrupted run. Every write is
atomic (`talm.files.write_atomically`) and a failed one says what to do. File names and the manifest's layout
come from `talm.data.manifest`.

This module imports no torch.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from talm.data.manifest import (
    MASK_DTYPE,
    layout,
    layout_files_re,
    manifest_bytes,
    manifest_name,
    manifest_paths,
    mask_name,
    read_previous,
    shard_problem,
    worker_files_re,
    worker_tag,
)
from talm.errors import TalmError
from talm.files import check_writable_dir, fsync, temp_path, write_atomically


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet (deepest first): what creating it would create."""
    return [p for p in [path, *path.parents] if not p.exists()]


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove directories a run created, deepest first, stopping at the first that is not empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


def _cannot_write(path: Path, err: OSError) -> TalmError:
    """A failed write (a full disk, say) said as what to do about it."""
    return TalmError(
        f"could not write {str(path)!r} ({err.strerror or err}): free some disk space or fix the directory, "
        "then rerun the same command to resume after the last complete shard"
    )


def _write_atomically(path: Path, write: Callable[[Any], object]) -> None:
    """`talm.files.write_atomically`, with a failure said as what to do about it."""
    try:
        write_atomically(path, write)
    except OSError as err:
        raise _cannot_write(path, err) from None


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """The .npy header `np.save` writes for a 1-D array of `length` items of `dtype`."""
    buf = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(dtype)
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": (length,)})
    return buf.getvalue()


class ShardFile:
    """A shard being written: its tokens go to the hidden temp file as they come (so memory does not grow with
    the shard size); `commit` puts the header for the final length in front, fsyncs and renames it into place,
    giving the same bytes as `np.save` of the whole array. Until then the shard does not exist; a temp file an
    interrupted run leaves is a stray that the next run's `remove_strays` deletes."""

    def __init__(self, path: Path, dtype: np.dtype, capacity: int) -> None:
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self._tmp = temp_path(path)
        self._header = npy_header(self.dtype, capacity)  # replaced at commit; 1-D headers keep their length
        try:
            self._file = open(self._tmp, "wb")
            self._file.write(self._header)
        except OSError as err:
            raise _cannot_write(path, err) from None

    def write(self, tokens: np.ndarray) -> None:
        try:
            self._file.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)))
        except OSError as err:
            self.abandon()
            raise _cannot_write(self.path, err) from None
        self.length += len(tokens)

    def commit(self) -> None:
        header = npy_header(self.dtype, self.length)
        try:
            if len(header) == len(self._header):
                self._file.seek(0)
                self._file.write(header)
            else:  # not seen for 1-D arrays; kept correct anyway
                self._rewrite(header)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
            fsync(self.path.parent)
        except OSError as err:
            self.abandon()
            raise _cannot_write(self.path, err) from None

    def _rewrite(self, header: bytes) -> None:
        self._file.close()
        with open(self._tmp, "rb") as old, open(self._tmp.with_name(self._tmp.name + "2"), "wb") as new:
            old.seek(len(self._header))
            new.write(header)
            shutil.copyfileobj(old, new, 1 << 20)
        os.replace(new.name, self._tmp)
        self._file = open(self._tmp, "r+b")
        self._file.seek(0, os.SEEK_END)

    def abandon(self) -> None:
        """Close and remove the temp file (a failed write, or a run that ends without this shard)."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """ "shard_size 1000 -> 2000, ..." for the arguments that changed ("" when none did)."""
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


class ShardDir:
    """The files of worker `worker_index` of `num_workers` in `path`: its shards and its manifest."""

    def __init__(self, path: str | os.PathLike[str], *, worker_index: int = 0, num_workers: int = 1) -> None:
        self.path = Path(path)
        self.num_workers = num_workers
        self.tag = worker_tag(worker_index, num_workers)
        self.manifest_path = self.path / manifest_name(self.tag)
        self._created: list[
            Path
        ] = []  # directories the first shard's write created (removed again by discard)

    def open(self, arguments: dict[str, Any], *, overwrite: bool) -> dict[str, Any] | None:
        """The manifest of an earlier run with the same `arguments` to resume, or None to start afresh.

        Refuses (TalmError) a directory made with other arguments, or by a different worker layout, unless
        `overwrite`, which deletes those files first."""
        check_writable_dir(self.path, instead="pass another --data-root")
        if not self.path.is_dir():
            return None
        manifests = [p.name for p in manifest_paths(self.path)]
        others = [
            name for name in manifests if name != self.manifest_path.name and layout(name) != self.num_workers
        ]
        if others:
            if not overwrite:
                raise TalmError(
                    f"{str(self.path)!r} was prepared with a different number of workers ({', '.join(sorted(others))}): "
                    "pass --overwrite to delete it and start afresh, or use another --dir-prefix"
                )
            for name in others:
                self._delete(layout_files_re(name))
        if self.manifest_path.name not in manifests:
            return None
        old = read_previous(self.manifest_path)
        changed = _differences(old.get("arguments", {}), arguments)
        if changed and not overwrite:
            raise TalmError(
                f"{str(self.path)!r} was made with other arguments ({changed}): pass --overwrite to delete it "
                "and start afresh, or use another --dir-prefix"
            )
        if overwrite:
            self.manifest_path.unlink()
            return None
        return old

    def cut_at_damage(
        self, manifest: dict[str, Any], dtype: np.dtype, *, fresh: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        """Check every listed shard's header and size against the manifest (cheap: no token is read).

        A damaged shard (deleted, truncated, header overwritten) is repaired by resuming from the last good shard
        before it, with the stream position the manifest recorded after that shard (`fresh`, an empty
        directory's state, before the first): returns the manifest cut back to it (later shards are made again,
        identically) and what was damaged, or the manifest unchanged and None. TalmError naming the shard and
        --overwrite when the position was not recorded (a manifest written before positions were per shard)."""
        shards = manifest["shards"]
        for i, shard in enumerate(shards):
            path = self.path / shard["file"]
            problem = shard_problem(path, int(shard["tokens"]), dtype)
            if problem is None and manifest.get("loss_mask"):  # conversation data: its loss mask too
                path = self.path / mask_name(shard["file"])
                problem = shard_problem(path, int(shard["tokens"]), MASK_DTYPE)
            if problem is None:
                continue
            if i == 0:
                return fresh, f"shard {path.name!r} {problem}"
            if not shards[i - 1].get("resume"):
                raise TalmError(
                    f"shard {str(path)!r} {problem}, and {str(self.manifest_path)!r} does not record where the "
                    "stream stood before it: pass --overwrite to delete the data directory and make it afresh"
                )
            cut = {"shards": shards[:i], "complete": False, "resume": shards[i - 1]["resume"]}
            return cut, f"shard {path.name!r} {problem}"
        return manifest, None

    def remove_strays(self, listed: set[str]) -> None:
        """Remove this worker's files the manifest does not list (temp files, shards of an interrupted run), so
        the directory again holds only what the manifest lists."""
        if not self.path.is_dir():
            return
        own = worker_files_re(self.tag)
        listed = listed | {mask_name(name) for name in listed}  # and their loss masks (conversation data)
        for path in self.path.iterdir():
            if own.fullmatch(path.name) and path.name not in listed and path != self.manifest_path:
                path.unlink()

    def open_shard(self, name: str, dtype: np.dtype, capacity: int) -> ShardFile:
        """Start writing shard `name` (at most `capacity` tokens); see `ShardFile`."""
        if not self.path.is_dir():
            self._created = missing_dirs(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
        return ShardFile(self.path / name, dtype, capacity)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        data = manifest_bytes(manifest)
        _write_atomically(self.manifest_path, lambda f: f.write(data))

    def discard(self, files: list[str]) -> None:
        """Remove the listed shards, the manifest, and the directories the first write created if empty (other
        workers' files stay)."""
        for name in files:
            (self.path / name).unlink(missing_ok=True)
            (self.path / mask_name(name)).unlink(missing_ok=True)
        self.manifest_path.unlink(missing_ok=True)
        remove_empty_dirs(self._created)

    def _delete(self, files: Any) -> None:
        for path in self.path.iterdir():
            if files.fullmatch(path.name):
                path.unlink()
