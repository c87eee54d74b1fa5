"""Damaged checkpoint files (truncated or garbled weights or trainer state, bad checkpoint.json) are one line,
exit 2, no traceback and nothing changed on disk, in every command that loads a checkpoint: train_model (resume),
generate and export_model, each run through its console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_train_model import FAST, snapshot

from talm.errors import TalmError
from talm.train.checkpoint import load_model, load_trainer_state, read_meta

BIN = Path(sys.executable).parent


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_start(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8:200] = bytes((i * 37 + 11) % 256 for i in range(192))
    path.write_bytes(bytes(raw))


def garble_all(path: Path) -> None:
    path.write_bytes(bytes((i * 97 + 3) % 256 for i in range(path.stat().st_size)))


def bad_json(path: Path) -> None:
    path.write_text('{"format": "talm.checkpoint/1", "step": ')


def json_without_fields(path: Path) -> None:
    path.write_text(json.dumps({"format": "talm.checkpoint/1", "step": 3}))


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated weights": ("model.safetensors", truncate),
    "garbled weights header": ("model.safetensors", garble_start),
    "garbled weights": ("model.safetensors", garble_all),
    "bad checkpoint.json": ("checkpoint.json", bad_json),
    "checkpoint.json without fields": ("checkpoint.json", json_without_fields),
    "truncated trainer state": ("trainer_state.pt", truncate),
    "garbled trainer state": ("trainer_state.pt", garble_start),
}


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory train_model wrote (latest/ and best/ with trainer state), to copy and damage."""
    root = tmp_path_factory.mktemp("trained")
    cmd = [str(BIN / "train_model"), "-n", "m", "-d", str(tiny_data), *FAST.split()]
    done = subprocess.run(
        cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr
    return root / "models" / "m"


def damaged_copy(trained: Path, work: Path, case: str) -> Path:
    file, damage = DAMAGE[case]
    model_dir = work / "models" / "m"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(trained, model_dir)
    damage(model_dir / "latest" / file)
    return model_dir


def check_refused(cmd: list[str], cwd: Path, model_dir: Path, case: str, damaged_file: str) -> str:
    before = snapshot(model_dir)
    done = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (case, done.stderr)
    assert "Traceback" not in done.stderr and len(lines) == 1, (case, done.stderr)
    assert f"models/m/latest/{damaged_file}" in lines[0], (case, lines[0])
    assert "--checkpoint best" in lines[0] and "--restart" in lines[0], (case, lines[0])
    assert snapshot(model_dir) == before, case
    return lines[0]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_train_model_resume_refuses_a_damaged_latest(
    trained: Path, tiny_data: Path, tmp_path: Path, case
) -> None:
    model_dir = damaged_copy(trained, tmp_path / "work", case)
    cmd = [str(BIN / "train_model"), "-n", "m", "-d", str(tiny_data), *FAST.split(), "--max-steps", "8"]
    check_refused(cmd, tmp_path / "work", model_dir, case, DAMAGE[case][0])


@pytest.mark.parametrize("case", ["truncated weights", "garbled weights header", "bad checkpoint.json"])
def test_generate_and_export_refuse_a_damaged_checkpoint(trained: Path, tmp_path: Path, case) -> None:
    work = tmp_path / "work"
    model_dir = damaged_copy(trained, work, case)
    file = DAMAGE[case][0]
    generate = [
        str(BIN / "generate"),
        "-m",
        "models/m",
        "-p",
        "ROMEO:",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]
    check_refused(generate, work, model_dir, case, file)
    export = [str(BIN / "export_model"), "-m", "models/m", "-o", "exported"]
    check_refused(export, work, model_dir, case, file)
    assert not (work / "exported").exists()
    if case == "truncated weights":  # the fix the message names works: best/ is intact
        ok = subprocess.run([*generate, "--checkpoint", "best"], cwd=work, capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("case", list(DAMAGE))
def test_checkpoint_loaders_raise_one_line_naming_the_file(trained: Path, tmp_path: Path, case) -> None:
    model_dir = damaged_copy(trained, tmp_path / "work", case)
    latest = model_dir / "latest"
    file = DAMAGE[case][0]
    load = load_trainer_state if file == "trainer_state.pt" else load_model
    with pytest.raises(TalmError) as info:
        load(latest)
    message = str(info.value)
    assert "\n" not in message and str(latest / file) in message and "--restart" in message
    if file != "checkpoint.json":
        assert read_meta(latest)["step"] == 4  # the other files still load
