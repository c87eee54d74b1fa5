"""Writing files and directories so that a crash never leaves half of one behind.

A file is written to a hidden temporary beside it, flushed to disk and renamed over the target: readers see
the old content or the new, never a mix. A directory (a checkpoint, an export) is built as a hidden sibling and
swapped into place the same way. Every stage that writes uses these; like `config` and `errors`, this module is
a leaf (it imports only `talm.errors`).

Before any work, the commands check that what they will write can be written (`check_writable_dir`,
`check_output_file`), and a run that owns a directory holds a `RunLock` on it for its whole life.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from talm.errors import TalmError


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


def default_mode() -> int:
    """The mode a new file gets from the process's umask (0o644 under the usual 022): every file talm writes gets
    it, also those written by libraries through a private temporary (safetensors': 0o600)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:  # Linux: reads the umask without changing it
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)  # elsewhere only setting it reads it: set it back at once
        os.umask(umask)
    return 0o666 & ~umask


def give_default_mode(file: int | Path, mode: int | None = None) -> None:
    """Set a file's (path or descriptor) mode to `mode` (`default_mode()` if not given), where the filesystem has
    modes at all."""
    try:
        os.chmod(file, default_mode() if mode is None else mode)
    except OSError:  # e.g. FAT or SMB mounts, whose files have no mode of their own: nothing to fix
        pass


def write_atomically(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, overwrite: bool = True
) -> None:
    """Call `write(f)` on a temporary beside `path`, fsync it, then rename it to `path` (with `default_mode`).

    Without `overwrite` the last step is a hard link, which raises FileExistsError if `path` appeared meanwhile.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            give_default_mode(f.fileno())  # a temporary a crash left may have had another mode
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
    `talm.train.checkpoint.recover_interrupted_save`)."""
    mode = default_mode()
    for f in sorted(staged.rglob("*"), reverse=True):  # files before the directories holding them
        if f.is_file() and not f.is_symlink():  # a library's file written through a private temporary too
            give_default_mode(f, mode)
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


# ---------------------------------------------------------------------------------------------------------------
# Checking output paths before any work: one mechanism for every command.


PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
PLAIN_NAME_RULE = "use letters, digits, '.', '_', '+' and '-' (at most 100, starting with a letter or digit)"


def is_plain_name(name: str) -> bool:
    """A name that is one safe path component (a tokenizer, dataset, sample, prefix or model name): never a
    path that could escape the folder it is joined to, never hidden."""
    return PLAIN_NAME.fullmatch(name) is not None


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def fix_for(err: OSError, instead: str | None = None) -> str:
    """What to do about a write that failed with `err`, by its cause, with another way out if given (`instead`,
    e.g. "pick another -o")."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free some disk space or {instead}" if instead else "free some disk space, then rerun"
    if err.errno == errno.EROFS:
        return f"the filesystem is mounted read-only: {instead or 'write somewhere else, or remount it writable'}"
    return f"fix its permissions or {instead}" if instead else "fix its permissions, then rerun"


def check_writable_dir(directory: str | os.PathLike[str], *, instead: str) -> None:
    """Fail with one line, before any work, if `directory` cannot be created and written; leave nothing behind.

    `instead` completes the fix, e.g. "pass another --data-root" or "pick another -o".
    """
    directory = Path(directory)
    created: list[Path] = []
    probe = directory / f".talm-write-probe-{os.getpid()}"
    try:
        chain = [directory, *directory.parents]
        blocker = next((p for p in chain if p.exists() or p.is_symlink()), None)
        if blocker is not None and not blocker.is_dir():
            raise TalmError(
                f"cannot create {str(directory)!r}: {str(blocker)!r} is a file, not a directory: move it away "
                f"or {instead}"
            )
        for p in reversed([p for p in chain if not p.exists()]):
            try:
                p.mkdir()
            except OSError as err:
                denied = err.errno in (errno.EACCES, errno.EPERM) and p.parent.exists()
                where = f"; {str(p.parent)!r} does not allow new folders" if denied else ""
                raise TalmError(
                    f"cannot write to {str(p)!r} ({_reason(err)}{where}): {fix_for(err, instead)}"
                ) from None
            created.append(p)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise TalmError(
            f"cannot write to {str(directory)!r} ({_reason(err)}): {fix_for(err, instead)}"
        ) from None
    finally:
        try:
            probe.unlink(missing_ok=True)  # a probe whose write failed midway
        except OSError:
            pass
        for p in reversed(created):
            p.rmdir()


def check_output_file(path: str | os.PathLike[str], *, overwrite: bool, instead: str) -> Path:
    """Check that file `path` can be written: its folder can be created and written, it is not a directory, and
    it does not exist unless `overwrite`. Returns `path` as a Path; writes nothing."""
    path = Path(path)
    if path.is_dir():
        raise TalmError(f"{str(path)!r} is a directory, not a file: {instead}")
    if path.exists() and not overwrite:
        raise TalmError(f"{str(path)!r} already exists: pass --overwrite to replace it, or {instead}")
    check_writable_dir(path.parent, instead=instead)
    return path


def write_file(path: str | os.PathLike[str], data: bytes, *, what: str = "") -> None:
    """`write_atomically` of bytes, with a failure (a full disk, say) said in one line naming the file."""
    try:
        write_atomically(path, lambda f: f.write(data))
    except OSError as err:
        raise TalmError(
            f"could not write {str(path)!r} ({_reason(err)}): free some disk space or fix its permissions{what}"
        ) from None


def sweep_stale_temps(directory: str | os.PathLike[str]) -> None:
    """Remove hidden temporaries (`.NAME.tmp`, `.NAME.tmp-PID/`) that crashed writers left in `directory`.

    Only call this while holding the directory's `RunLock`: then no live writer owns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob(".*.tmp*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Run locks: one process owns a directory (models/NAME, a data directory) at a time.

LOCK_FILE = ".talm.lock"
# The flock lock's retries: each is a holder that unlinked the file between our open and our flock (it left).
LOCK_TRIES = 100


class RunLock:
    """An exclusive lock on a directory for one run, refused with one line naming the holder.

    The lock is the kernel's (`flock` on `DIR/.talm.lock`), so it is released on any exit, a crash or kill -9
    included: a stale lock cannot outlive its process. The file records who holds it (pid, host, command, start
    time) for the message a second run gets, and is removed on release (while still locked: a run that opened
    it meanwhile finds, once it holds the flock, that the path no longer names the file it locked, and retries).
    On filesystems without flock (some network mounts) the lock is the file itself, created whole (its record
    written to a temporary first, then hard-linked into place); such a file is stale only if its record names a
    pid that is dead on this host. Directories the lock had to create go again on release when the run left
    nothing else in them (a run refused before its first write leaves no trace).

        with RunLock(model_dir, "train_model"):
            ...
    """

    def __init__(
        self, directory: str | os.PathLike[str], command: str, *, instead: str = "", name: str = LOCK_FILE
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / name  # `name`: several locks in one directory (download_data's workers)
        self.command = command
        self.instead = instead or "wait for it to finish or stop it (Ctrl-C), then rerun"
        self._fd: int | None = None
        self._exclusive: tuple[int, int] | None = None  # the lock file's (device, inode) without flock
        self._created: list[Path] = []  # the directories acquire made, deepest first

    # -- the record --------------------------------------------------------------------------------------------

    def _record(self) -> bytes:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": time.time(),
        }
        return (json.dumps(info) + "\n").encode()

    def holder(self) -> dict[str, Any]:
        try:
            found = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _refuse(self) -> TalmError:
        h = self.holder()
        # flock refused, or (without flock) a lock file without a record that talm could have written
        if not h:
            return TalmError(
                f"{str(self.directory)!r} is locked ({str(self.path)!r} is held by another process): {self.instead}"
            )
        who = f"{h.get('command', 'another talm run')} (pid {h.get('pid', '?')} on {h.get('host', '?')}"
        if isinstance(h.get("since"), (int, float)):
            who += ", since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
        who += ")"
        return TalmError(f"{str(self.directory)!r} is in use by {who}: {self.instead}")

    def _cannot_write(self, err: OSError) -> TalmError:
        return TalmError(f"cannot write the run lock {str(self.path)!r} ({_reason(err)}): {fix_for(err)}")

    # -- acquire / release -------------------------------------------------------------------------------------

    def acquire(self) -> RunLock:
        """Take the lock, or raise TalmError (held by another run, or the directory cannot be written: a full
        disk, a read-only filesystem), leaving no lock file and no directory behind."""
        self._created = missing_dirs(self.directory)
        try:
            if not self._acquire_flock():
                self._acquire_exclusive_file()
        except OSError as err:
            self._remove_created()
            raise self._cannot_write(err) from None
        except TalmError:
            self._remove_created()
            raise
        return self

    def _acquire_flock(self) -> bool:
        """Take the flock on the lock file; False if this filesystem (or platform) has no flock."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            return False
        for _ in range(LOCK_TRIES):
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                fd, made = self._open_lock_file()
            except FileNotFoundError:  # a releasing holder removed the file or the directory it had made
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._refuse() from None
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                if made:  # no flock on this filesystem: the file this made would read as another's lock
                    self.path.unlink(missing_ok=True)
                return False
            if not same_file(fd, self.path):
                os.close(fd)  # its holder unlinked this file as it left: lock the one at the path now
                continue
            self._fd = fd
            try:
                os.ftruncate(fd, 0)
                os.write(fd, self._record())
            except OSError:
                self._release_flock()  # a full disk: the file we made goes, under the lock
                raise
            return True
        raise self._refuse()

    def _open_lock_file(self) -> tuple[int, bool]:
        """The lock file's descriptor, and whether this call created it."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, default_mode()), True
        except FileExistsError:
            return os.open(self.path, os.O_RDWR), False

    def _acquire_exclusive_file(self) -> None:
        """Without flock: the lock is the file at the path, linked there complete with its record (never seen
        empty or half-written), so only a record of a dead pid on this host is ever taken as stale."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, default_mode())
            try:
                os.write(fd, self._record())
                os.fsync(fd)
            finally:
                os.close(fd)
            for _ in range(LOCK_TRIES):
                try:
                    os.link(record, self.path)
                except FileExistsError:
                    if not self._break_if_stale():
                        raise self._refuse() from None
                    continue
                st = os.stat(self.path)
                self._exclusive = (st.st_dev, st.st_ino)
                return
            raise self._refuse()
        finally:
            record.unlink(missing_ok=True)

    def _break_if_stale(self) -> bool:
        """Remove the lock file if its record names a pid dead on this host; whether the path may be free now."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True  # its holder released it meanwhile
        h = self.holder()
        if h.get("host") != socket.gethostname() or _pid_alive(h.get("pid")):
            return False  # a live holder, another host's, or no record talm wrote: never taken
        # Compare and remove: move it aside, and if what moved was not the stale file (another run broke it and
        # took the lock meanwhile), link that run's file back.
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{threading.get_ident()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        moved = os.stat(aside)
        try:
            if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self._fd is not None:
            self._release_flock()
        if self._exclusive is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._exclusive:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            self._exclusive = None
        self._remove_created()

    def _release_flock(self) -> None:
        """Remove the lock file while the flock is held (a new holder checks it locked the file at the path),
        then close it, which drops the flock."""
        assert self._fd is not None
        try:
            if same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def _remove_created(self) -> None:
        """Remove the directories acquire made, if the run left nothing in them (something else stays)."""
        for d in self._created:
            try:
                d.rmdir()
            except OSError:  # not empty (the run wrote there, or another run holds it now), or gone
                break
        self._created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def missing_dirs(directory: Path) -> list[Path]:
    """The directories that creating `directory` (with its parents) would make, deepest first."""
    missing = []
    d = Path(os.path.abspath(directory))
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    return missing


def same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path` (not unlinked or replaced since it was opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
