"""What a run leaves on disk around its work, through the console scripts: no `.talm.lock` once a run ends or is
refused; a disk that is full (or read-only) when a run starts is one line naming the path, with nothing left
behind; every file talm writes (checkpoints, exports, data shards) has the mode the umask gives a new file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import one_line_error
from test_train_model import FAST

from talm.cli import download_data, export_model, train_model


def locks(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".talm*.lock*"))


def train(tiny_data: Path, *extra: str) -> None:
    train_model.main(["-n", "m", "-d", str(tiny_data), *FAST.split(), *extra])


def test_no_lock_file_stays_after_a_run_ends_or_is_refused(
    project: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    download_data.main(["tinyshakespeare", "--shard-size", "100000"])
    train(tiny_data)
    assert Path("data/tinyshakespeare/default/meta.json").is_file() and Path("models/m/latest").is_dir()
    assert locks(project) == []
    capsys.readouterr()
    Path("models/m/latest/trainer_state.pt").write_bytes(b"garbled")  # refused under the lock, as it resumes
    line = one_line_error(capsys, train_model.main, "-n", "m", "-d", str(tiny_data), *FAST.split())
    assert "trainer_state.pt" in line
    one_line_error(capsys, download_data.main, "tinyshakespeare", "--shard-size", "0")
    assert locks(project) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["full disk", "read-only"])
@pytest.mark.parametrize("fails", ["lock", "folder"])
def test_a_disk_that_cannot_be_written_at_the_start_is_one_line_and_leaves_nothing(
    project: Path,
    tiny_data: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    fails: str,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    if fails == "lock":
        monkeypatch.setattr(os, "write", refuse)  # the lock's record is the first write of a run
    else:
        monkeypatch.setattr(Path, "mkdir", refuse)
    line = one_line_error(capsys, train_model.main, "-n", "m", "-d", str(tiny_data), *FAST.split())
    assert os.strerror(code) in line and (
        "models/m/.talm.lock" in line if fails == "lock" else "'models" in line
    )
    assert ("free some disk space" in line) == (code == errno.ENOSPC), line
    assert ("mounted read-only" in line) == (code == errno.EROFS), line
    line = one_line_error(capsys, download_data.main, "tinyshakespeare")
    assert os.strerror(code) in line and "data" in line, line
    assert sorted(p.name for p in project.iterdir()) == ["tiny-shakespeare.txt", "tokenizers"]


def test_every_file_written_has_the_umask_mode(
    project: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.safetensors included: safetensors writes through a private temporary of mode 0600."""
    download_data.main(["tinyshakespeare", "--shard-size", "100000"])
    train(tiny_data)
    export_model.main(["-m", "models/m", "-o", "exported"])
    umask = os.umask(0o022)
    os.umask(umask)
    for root in ("data/tinyshakespeare/default", "models/m", "exported"):
        files = [p for p in Path(root).rglob("*") if p.is_file()]
        assert files and {str(p): oct(p.stat().st_mode & 0o777) for p in files} == {
            str(p): oct(0o666 & ~umask) for p in files
        }
