"""talm.files' run lock: one holder at a time, and a lock that had to create its directory leaves no trace when
the run wrote nothing else there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from talm.errors import TalmError
from talm.files import LOCK_FILE, RunLock, same_file


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
