"""train_model never loses a run: the lock on models/NAME, resume-or-refuse instead of wiping, --restart deleting
only after every input is validated, damaged shards and unusable model directories in one line before any
work, failed saves, stale temporaries, and training without a val split."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_train_model import FAST, run, snapshot

from talm.errors import TalmError
from talm.train.checkpoint import read_meta
from talm.train.metrics import read_metrics

TRAIN_MODEL = str(Path(sys.executable).with_name("train_model"))


def one_line_error(code: int, err: str, *expected: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("train_model: error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def trained(tiny_data: Path, in_tmp: Path, capsys, monkeypatch) -> Path:
    """models/m trained 4 steps (latest/ and best/ at step 3 or 4, metrics.jsonl)."""
    code, _, err = run(capsys, monkeypatch, "-n", "m", "-d", str(tiny_data), *FAST.split())
    assert code == 0, err
    return Path("models/m")


def copy_data(tiny_data: Path, name: str) -> Path:
    d = Path(name)
    shutil.copytree(tiny_data, d)
    return d


def train_shards(data: Path) -> list[Path]:
    return sorted(data.glob("train_*.npy"))


# ------------------------------------------------------------------------------------------------ the lock


def test_a_second_run_on_the_same_model_dir_is_refused_while_the_first_keeps_its_run(
    tiny_data: Path, in_tmp: Path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [TRAIN_MODEL, "-n", "c", "-d", str(tiny_data), *FAST.split()]
    first = subprocess.Popen(
        [*args, "--max-steps", "12"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = Path("models/c/.talm.lock")
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run, lock taken, so the second surely meets it
    try:
        second = subprocess.run(
            [*args, "--max-steps", "12", "--optim.lr", "1e-4"], env=env, capture_output=True, text=True
        )
    finally:
        first.send_signal(signal.SIGCONT)
    line = one_line_error(second.returncode, second.stderr, "'models/c' is in use by train_model")
    assert f"pid {first.pid} on " in line and "Traceback" not in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert out.strip().splitlines()[-1].startswith("done: 12 steps")
    meta = read_meta("models/c/latest")  # the first run's own checkpoints, not the second's
    assert meta["step"] == 12 and meta["config"]["optim"]["lr"] != 1e-4
    steps = [r["step"] for r in read_metrics("models/c") if "train_loss" in r]
    assert steps == list(range(1, 13))
    # The lock went with the first run: a third run is not refused.
    third = subprocess.run([*args, "--max-steps", "12"], env=env, capture_output=True, text=True)
    assert third.returncode == 0 and "already trained to step 12" in third.stdout, third.stderr


# ------------------------------------------------------------------------------------------------ never wipe a run


def test_a_missing_latest_resumes_from_best_instead_of_deleting_the_run(
    trained: Path, tiny_data: Path, capsys, monkeypatch
) -> None:
    for latest, max_steps in (("gone", 6), ("empty", 8)):
        best_step = read_meta(trained / "best")["step"]
        records = read_metrics(trained)
        shutil.rmtree(trained / "latest", ignore_errors=True)
        if latest == "empty":
            (trained / "latest").mkdir()
        code, out, err = run(
            capsys, monkeypatch, "-n", "m", "-d", str(tiny_data), *FAST.split(), "--max-steps", str(max_steps)
        )
        assert code == 0, err
        assert f"resuming from models/m/best (step {best_step})" in err and "from scratch" not in err
        assert f"resuming models/m from step {best_step}" in err
        assert read_meta(trained / "best")["val_loss"] <= min(r.get("val_loss", 99) for r in records)
        assert read_meta(trained / "latest")["step"] == max_steps
        kept = [r for r in read_metrics(trained) if r["step"] <= best_step]
        assert kept == [r for r in records if r["step"] <= best_step]  # the history before best is intact


def test_traces_of_a_run_without_a_checkpoint_are_refused_not_wiped(
    trained: Path, tiny_data: Path, capsys, monkeypatch
) -> None:
    shutil.rmtree(trained / "latest")
    (trained / "best" / "trainer_state.pt").unlink()  # best/ holds weights only: nothing to resume
    before = snapshot(trained)
    code, _, err = run(capsys, monkeypatch, "-n", "m", "-d", str(tiny_data), *FAST.split())
    line = one_line_error(
        code, err, "holds an earlier run (best/, metrics.jsonl, loss.png)", "--restart", "--model-name"
    )
    assert "latest/ is missing or incomplete" in line
    assert snapshot(trained) == before
    shutil.rmtree(trained / "best")  # metrics alone are a trace too
    before = snapshot(trained)
    code, _, err = run(capsys, monkeypatch, "-n", "m", "-d", str(tiny_data), *FAST.split())
    one_line_error(code, err, "holds an earlier run (metrics.jsonl, loss.png)")
    assert snapshot(trained) == before
    code, _, err = run(capsys, monkeypatch, "-n", "m", "-d", str(tiny_data), *FAST.split(), "--restart")
    assert code == 0 and "from scratch" in err  # the user asked: it starts over


def test_restart_deletes_nothing_until_every_input_is_validated(
    trained: Path, tiny_data: Path, capsys, monkeypatch
) -> None:
    truncated = copy_data(tiny_data, "truncated")
    shard = train_shards(truncated)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    before = snapshot(trained)
    cases = {
        "truncated shard": (["-d", str(truncated)], f"shard '{shard}' is "),
        "seed out of range": (["-d", str(tiny_data), "--seed", "-1"], "-1"),
        "invalid config": (["-d", str(tiny_data), "--model.d_model", "100", "--model.n_head", "3"], "n_head"),
        "batch too big": (["-d", str(tiny_data), "--batch-size", "100000"], "fewer than one batch"),
        "missing tokenizer": (["-d", str(tiny_data), "-t", "nope.json"], "nope.json"),
        "device": (["-d", str(tiny_data), "--dtype", "float16"], "float16 needs a CUDA GPU"),
    }
    for case, (args, expected) in cases.items():
        code, _, err = run(capsys, monkeypatch, "-n", "m", *FAST.split(), *args, "--restart")
        one_line_error(code, err, expected)
        assert snapshot(trained) == before, case  # the old run is byte-identical


# ------------------------------------------------------------------------------------------------ damaged data


def damaged_data(tiny_data: Path) -> dict[str, tuple[Path, str]]:
    cases = {}
    d = copy_data(tiny_data, "truncated")
    shard = train_shards(d)[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    cases["truncated"] = (d, f"shard '{shard}' is ")
    d = copy_data(tiny_data, "header")
    shard = train_shards(d)[0]
    raw = bytearray(shard.read_bytes())
    raw[:64] = b"\x80\x04garbage!" * 6 + b"\x00" * 4  # a pickle opcode where the .npy magic was
    shard.write_bytes(bytes(raw))
    cases["overwritten header"] = (d, f"shard '{shard}' has no valid .npy header")
    d = copy_data(tiny_data, "ids")
    for shard in train_shards(d):  # every train shard, so whichever comes first is out of range
        mm = np.load(shard, mmap_mode="r+")
        mm[5] = 5000
        mm.flush()
        del mm
    cases["id >= vocab"] = (d, "holds token id 5000, outside the vocabulary of 1024")
    return cases


def test_damaged_shards_fail_in_one_line_before_anything_is_written(
    tiny_data: Path, in_tmp: Path, capsys, monkeypatch
) -> None:
    for case, (data, expected) in damaged_data(tiny_data).items():
        code, _, err = run(capsys, monkeypatch, "-n", "new", "-d", str(data), *FAST.split())
        one_line_error(code, err, expected)
        assert "Traceback" not in err, case
        # No checkpoint, metrics or tokenizer: not even the directory.
        assert not Path("models").exists(), case


def test_an_out_of_range_id_in_a_later_shard_is_one_line_naming_it(
    tiny_data: Path, in_tmp: Path, capsys, monkeypatch
) -> None:
    from talm.data.manifest import read_data
    from talm.train.loader import TokenLoader

    d = copy_data(tiny_data, "ids")
    shards = train_shards(d)
    mm = np.load(shards[-1], mmap_mode="r+")
    mm[-1] = 1024
    mm.flush()
    del mm
    loader = TokenLoader(read_data(d), batch_size=64, context_length=32, seed=0, vocab_size=1024)
    with pytest.raises(TalmError, match=f"shard '{shards[-1]}' holds token id 1024"):
        for _ in range(100):  # an epoch and more: every shard gets mapped
            loader.next_batch()


# ------------------------------------------------------------------------------------------------ unusable model dirs


def test_an_unusable_model_directory_is_one_line_before_any_work(
    trained: Path, tiny_data: Path, capsys, monkeypatch
) -> None:
    args = ["-d", str(tiny_data), *FAST.split(), "--max-steps", "6"]
    Path("models/file").write_text("not a directory\n")
    code, _, err = run(capsys, monkeypatch, "-n", "file", *args)
    one_line_error(code, err, "'models/file' is a file, not a directory", "--model-name")
    assert Path("models/file").read_text() == "not a directory\n"
    # resume: latest/ replaced by a file
    shutil.rmtree(trained / "latest")
    (trained / "latest").write_text("x")
    before = snapshot(trained)
    code, _, err = run(capsys, monkeypatch, "-n", "m", *args)
    one_line_error(code, err, "'models/m/latest' is a file, not a directory")
    assert snapshot(trained) == before
    code, _, err = run(capsys, monkeypatch, "-n", "m", *args, "--restart")
    one_line_error(code, err, "'models/m/latest' is a file, not a directory")
    assert snapshot(trained) == before
    # a new run where models/ itself is a file
    monkeypatch.chdir(Path("models/m").resolve())
    Path("models").write_text("x")
    code, _, err = run(capsys, monkeypatch, "-n", "n", *args)
    one_line_error(code, err, "'models' is a file, not a directory")


# ------------------------------------------------------------------------------------------------ saves


def test_a_failed_save_is_one_line_keeps_the_last_checkpoint_and_leaves_no_temporary(
    trained: Path, tiny_data: Path, capsys, monkeypatch
) -> None:
    import errno

    import talm.train.checkpoint

    before, best = snapshot(trained / "latest"), snapshot(trained / "best")

    def disk_full(model, filename):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    original = talm.train.checkpoint.save_safetensors_from
    monkeypatch.setattr(talm.train.checkpoint, "save_safetensors_from", disk_full)
    code, _, err = run(
        capsys, monkeypatch, "-n", "m", "-d", str(tiny_data), *FAST.split(), "--max-steps", "8"
    )
    last = err.strip().splitlines()[-1]  # the run had started: its progress lines come first
    assert code == 2 and "Traceback" not in err
    assert last.startswith(
        "train_model: error: could not save checkpoint 'models/m/best' (OSError: [Errno 28]"
    )
    assert last.endswith("rerun the same command to resume; the previous checkpoint is kept")
    assert snapshot(trained / "latest") == before and snapshot(trained / "best") == best
    assert not list(trained.glob(".*.tmp*")) and not list(trained.glob(".*.old"))
    # after the disk is freed, the same command resumes and finishes
    monkeypatch.setattr(talm.train.checkpoint, "save_safetensors_from", original)
    code, _, err = run(
        capsys, monkeypatch, "-n", "m", "-d", str(tiny_data), *FAST.split(), "--max-steps", "8"
    )
    assert code == 0 and "resuming models/m from step 4" in err, err


def test_stale_temporaries_are_swept_when_a_run_starts(
    trained: Path, tiny_data: Path, capsys, monkeypatch
) -> None:
    (trained / ".best.tmp-999999").mkdir()
    (trained / ".best.tmp-999999" / "model.safetensors").write_bytes(b"half")
    (trained / ".metrics.jsonl.tmp").write_text("half")
    code, _, err = run(
        capsys, monkeypatch, "-n", "m", "-d", str(tiny_data), *FAST.split(), "--max-steps", "5"
    )
    assert code == 0, err
    assert sorted(p.name for p in trained.glob(".*")) == []


def test_an_interrupted_save_is_recovered_at_start(
    trained: Path, tiny_data: Path, capsys, monkeypatch
) -> None:
    os.replace(trained / "latest", trained / ".latest.old")  # as if killed between the two renames
    code, _, err = run(
        capsys, monkeypatch, "-n", "m", "-d", str(tiny_data), *FAST.split(), "--max-steps", "5"
    )
    assert code == 0 and "resuming models/m from step 4" in err, err
    assert read_meta(trained / "latest")["step"] == 5 and not (trained / ".latest.old").exists()


# ------------------------------------------------------------------------------------------------ no val split


def test_data_without_a_val_split_trains_without_evaluation(
    tiny_data: Path, in_tmp: Path, capsys, monkeypatch
) -> None:
    d = copy_data(tiny_data, "noval")
    meta = json.loads((d / "meta.json").read_text())
    for shard in meta["shards"]:
        if shard["split"] == "val":
            (d / shard["file"]).unlink()
    meta["shards"] = [s for s in meta["shards"] if s["split"] != "val"]
    (d / "meta.json").write_text(json.dumps(meta))
    code, out, err = run(capsys, monkeypatch, "-n", "nv", "-d", str(d), *FAST.split())
    assert code == 0, err
    note = "no val split in noval: training without evaluation, so no best/ checkpoint"
    assert err.count(note) == 1
    assert out.strip().splitlines()[-1].startswith("done: 4 steps") and "not evaluated" in out
    assert not Path("models/nv/best").exists() and read_meta("models/nv/latest")["val_loss"] is None
    records = read_metrics("models/nv")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and not any("val_loss" in r for r in records)
    code, out, err = run(capsys, monkeypatch, "-n", "nv", "-d", str(d), *FAST.split())
    assert code == 0 and "already trained to step 4 (not evaluated)" in out, err
