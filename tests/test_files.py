"""talm.files: the run lock (one holder at a time, with flock and without; nothing left behind when it is
released or refused; a full disk is one line), and the mode of every file written atomically."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest

from talm.errors import TalmError
from talm.files import LOCK_FILE, RunLock, replace_dir, same_file, staging_dir, write_atomically


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run", "train_model"):
        with pytest.raises(TalmError, match=r"is in use by train_model \(pid \d+ on "):
            RunLock(tmp_path / "run", "train_model").acquire()
    with RunLock(tmp_path / "run", "train_model"):  # released: a new holder is not refused
        pass


def test_directories_the_lock_made_go_when_the_run_wrote_nothing(tmp_path: Path) -> None:
    target = tmp_path / "models" / "new"
    with RunLock(target, "train_model"):
        assert (target / LOCK_FILE).is_file()
    assert not (tmp_path / "models").exists()  # both levels it created, none of what was there before
    assert tmp_path.is_dir()


def test_a_directory_the_run_wrote_to_or_that_was_there_stays(tmp_path: Path) -> None:
    wrote = tmp_path / "models" / "wrote"
    with RunLock(wrote, "train_model"):
        (wrote / "metrics.jsonl").write_text("{}\n")
    assert (wrote / "metrics.jsonl").is_file()
    existing = tmp_path / "existing"
    existing.mkdir()
    with RunLock(existing, "train_model"):
        pass
    assert existing.is_dir()  # the user's (empty) directory is not the lock's to remove


def test_a_waiter_on_a_removed_lock_file_locks_the_new_one(tmp_path: Path) -> None:
    target = tmp_path / "new"
    first = RunLock(target, "train_model").acquire()
    stale = os.open(target / LOCK_FILE, os.O_RDWR)  # a second run opened the file before the first released
    try:
        first.release()
        assert not same_file(stale, target / LOCK_FILE)  # so it must not trust a flock on that file
        second = RunLock(target, "train_model").acquire()
        try:
            assert same_file(second._fd, target / LOCK_FILE)  # type: ignore[arg-type]
            with pytest.raises(TalmError, match="is in use"):
                RunLock(target, "train_model").acquire()
        finally:
            second.release()
    finally:
        os.close(stale)


def test_a_released_lock_leaves_no_file_in_a_directory_that_was_there(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("{}")
    with RunLock(tmp_path / "data", "download_data"):
        assert (tmp_path / "data" / LOCK_FILE).is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["meta.json"]


def test_a_refused_lock_leaves_the_holders_file_and_nothing_of_its_own(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    with RunLock(target, "train_model"):
        before = (target / LOCK_FILE).read_bytes()
        with pytest.raises(TalmError, match="is in use"):
            RunLock(target, "train_model").acquire()
        assert (target / LOCK_FILE).read_bytes() == before
    assert not (tmp_path / "models").exists()


@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without flock (some network mounts): every flock fails with ENOLCK."""
    import fcntl

    def refuse(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_flock_a_lock_file_without_a_record_is_not_taken_as_stale(tmp_path: Path, no_flock) -> None:
    """An empty lock file is what a locker that has created the file but not yet written its record leaves."""
    (tmp_path / LOCK_FILE).write_bytes(b"")
    with pytest.raises(TalmError, match="is locked"):
        RunLock(tmp_path, "train_model").acquire()
    assert (tmp_path / LOCK_FILE).read_bytes() == b""


def test_without_flock_a_dead_pid_on_this_host_is_stale_and_a_live_one_is_not(
    tmp_path: Path, no_flock
) -> None:
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record = json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "command": "train_model"})
    (tmp_path / LOCK_FILE).write_text(record)
    with RunLock(tmp_path, "train_model"):
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text(record.replace(dead.stdout.strip(), str(os.getppid())))
    with pytest.raises(TalmError, match="is in use by train_model"):
        RunLock(tmp_path, "train_model").acquire()


def test_without_flock_concurrent_lockers_never_both_hold_it(tmp_path: Path, no_flock) -> None:
    holders, most, errors = [0], [0], []
    guard = threading.Lock()
    deadline = time.monotonic() + 2.0

    def contend() -> None:
        while time.monotonic() < deadline:
            lock = RunLock(tmp_path / "run", "train_model")
            try:
                lock.acquire()
            except TalmError:
                continue
            except Exception as err:  # noqa: BLE001 -- reported below
                errors.append(err)
                return
            with guard:
                holders[0] += 1
                most[0] = max(most[0], holders[0])
            time.sleep(0.001)
            with guard:
                holders[0] -= 1
            lock.release()

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and most[0] == 1
    # every release removed its file, and no record or aside file is left
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no flock"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_lock_that_cannot_be_written_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, flock: bool
) -> None:
    if not flock:
        import fcntl

        monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no")))

    def full(fd: int, data: bytes) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", full)
    target = tmp_path / "models" / "m"
    with pytest.raises(TalmError) as info:
        RunLock(target, "train_model").acquire()
    message = str(info.value)
    assert "\n" not in message and str(target / LOCK_FILE) in message and os.strerror(code) in message
    assert ("free some disk space" in message) == (code == errno.ENOSPC)
    assert not (tmp_path / "models").exists()


def test_every_file_written_atomically_gets_the_umask_mode(tmp_path: Path) -> None:
    """Also a file a library wrote through a private temporary (safetensors: 0600) into a staged directory."""
    import torch
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    (tmp_path / ".f.tmp").write_bytes(b"")
    os.chmod(tmp_path / ".f.tmp", 0o600)  # a temporary a crash left, with another mode
    write_atomically(tmp_path / "f", lambda f: f.write(b"x"))
    staged = staging_dir(tmp_path / "out")
    save_file({"w": torch.zeros(2)}, str(staged / "model.safetensors"))
    (staged / "sub").mkdir()
    (staged / "sub" / "part").write_bytes(b"")
    os.chmod(staged / "sub" / "part", 0o600)
    replace_dir(staged, tmp_path / "out")
    for f in [tmp_path / "f", *(p for p in (tmp_path / "out").rglob("*") if p.is_file())]:
        assert f.stat().st_mode & 0o777 == expected, f
