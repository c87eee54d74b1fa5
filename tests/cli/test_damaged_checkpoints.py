"""Damaged checkpoint files (truncated, garbled or missing weights or trainer state, bytes overwritten so that
they hold NaN, bad checkpoint.json; a sharded checkpoint's overwritten, truncated or missing files) are one line
naming the file, exit 2, no traceback and nothing changed on disk, in every command that loads a checkpoint:
train_model (resume) and the commands that use a model, each run through its console script, each naming the
way out in its own flags (train_model: --resume-from best / --restart; the others: --checkpoint best)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import one_line_error
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


def nan_weights(path: Path) -> None:
    """Overwrite the first 64 bytes of safetensors' tensor data with 0xFF: NaN in any float dtype."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))


def nan_optimizer_state(path: Path) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg"].view(-1)[0] = float("nan")
    torch.save(state, path)


def bad_json(path: Path) -> None:
    path.write_text('{"format": "talm.checkpoint/1", "step": ')


def json_without_fields(path: Path) -> None:
    path.write_text(json.dumps({"format": "talm.checkpoint/1", "step": 3}))


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated weights": ("model.safetensors", truncate),
    "garbled weights header": ("model.safetensors", garble_start),
    "garbled weights": ("model.safetensors", garble_all),
    "NaN weights": ("model.safetensors", nan_weights),
    "bad checkpoint.json": ("checkpoint.json", bad_json),
    "checkpoint.json without fields": ("checkpoint.json", json_without_fields),
    "truncated trainer state": ("trainer_state.pt", truncate),
    "garbled trainer state": ("trainer_state.pt", garble_start),
    "NaN optimizer state": ("trainer_state.pt", nan_optimizer_state),
}
TRAIN_FIX = ("--resume-from best", "--restart")  # train_model's flags
USE_FIX = ("--checkpoint best",)  # the flag of generate, chat, serve, evaluate and export_model


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


def check_refused(
    cmd: list[str], cwd: Path, model_dir: Path, case: str, damaged_file: str, fix: tuple[str, ...]
) -> str:
    before = snapshot(model_dir)
    done = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (case, done.stderr)
    assert "Traceback" not in done.stderr and len(lines) == 1, (case, done.stderr)
    assert f"models/m/latest/{damaged_file}" in lines[0], (case, lines[0])
    check_fix(lines[0], fix)
    assert snapshot(model_dir) == before, case
    return lines[0]


def check_fix(line: str, fix: tuple[str, ...]) -> None:
    """The line names the fix in the flags of its command, and no flag of the other kind of command."""
    assert all(flag in line for flag in fix), line
    other = USE_FIX if fix == TRAIN_FIX else TRAIN_FIX
    assert not any(flag in line for flag in other), line


@pytest.mark.parametrize("case", list(DAMAGE))
def test_train_model_resume_refuses_a_damaged_latest(
    trained: Path, tiny_data: Path, tmp_path: Path, case
) -> None:
    model_dir = damaged_copy(trained, tmp_path / "work", case)
    cmd = [str(BIN / "train_model"), "-n", "m", "-d", str(tiny_data), *FAST.split(), "--max-steps", "8"]
    check_refused(cmd, tmp_path / "work", model_dir, case, DAMAGE[case][0], TRAIN_FIX)


@pytest.mark.parametrize(
    "case", ["truncated weights", "garbled weights header", "NaN weights", "bad checkpoint.json"]
)
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
    check_refused(generate, work, model_dir, case, file, USE_FIX)
    export = [str(BIN / "export_model"), "-m", "models/m", "-o", "exported"]
    check_refused(export, work, model_dir, case, file, USE_FIX)
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
    assert "\n" not in message and str(latest / file) in message and "--checkpoint best" in message
    if file != "checkpoint.json":
        assert read_meta(latest)["step"] == 4  # the other files still load


def test_a_checkpoint_that_lost_a_file_is_named_by_the_commands_that_use_it(
    trained: Path,
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from talm.cli import evaluate, generate

    work = tmp_path / "work"
    shutil.copytree(trained, work / "models" / "m")
    monkeypatch.chdir(work)
    for file in ("model.safetensors", "checkpoint.json"):
        gone = Path("models/m/latest") / file
        kept = gone.read_bytes()
        gone.unlink()
        line = one_line_error(capsys, generate.main, "-m", "models/m", "-p", "A", "--device", "cpu")
        assert f"cannot load '{gone}' (missing)" in line, line
        check_fix(line, USE_FIX)
        line = one_line_error(capsys, evaluate.main, "-m", "models/m", "--data-dir", str(tiny_data))
        assert f"'{gone}' (missing)" in line, line
        gone.write_bytes(kept)


@pytest.fixture(scope="module")
def sharded(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory an FSDP run (one process) wrote: latest/ and best/ hold sharded/ (DCP's files)."""
    root = tmp_path_factory.mktemp("sharded")
    cmd = [
        str(BIN / "train_model"),
        "-n",
        "m",
        "-d",
        str(tiny_data),
        *FAST.split(),
        "--train.parallel",
        "fsdp",
    ]
    done = subprocess.run(
        cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr
    assert (root / "models/m/latest/sharded/__0_0.distcp").is_file()
    return root / "models" / "m"


def nan_in_shard(latest: Path) -> None:
    """Overwrite the bytes of the first 64 weights of a block in the shard file with 0xFF (NaN)."""
    from safetensors.torch import load_file

    weights = load_file(str(latest / "model.safetensors"))["blocks.0.mlp.down.weight"].view(-1)[:64]
    shard = latest / "sharded" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    at = raw.find(weights.numpy().tobytes())
    assert at > 0
    raw[at : at + 256] = b"\xff" * 256
    shard.write_bytes(bytes(raw))


SHARD_DAMAGE: dict[str, tuple[str, str, Callable[[Path], None]]] = {
    "NaN in a shard": (
        "sharded/__0_0.distcp",
        "non-finite values in model.blocks.0.mlp.down.weight",
        nan_in_shard,
    ),
    "truncated shard": (
        "sharded/__0_0.distcp",
        "RuntimeError",
        lambda d: truncate(d / "sharded/__0_0.distcp"),
    ),
    "no .metadata": ("sharded/.metadata", "missing", lambda d: (d / "sharded/.metadata").unlink()),
    "no sharded/": ("sharded", "missing", lambda d: shutil.rmtree(d / "sharded")),
}


@pytest.mark.parametrize("case", list(SHARD_DAMAGE))
def test_train_model_names_the_damaged_file_of_a_sharded_checkpoint(
    sharded: Path,
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    """Not a divergence (NaN weights), an optimizer mismatch (no sharded/) nor DCP's tracebacks (no .metadata)."""
    from talm.cli import train_model

    file, reason, damage = SHARD_DAMAGE[case]
    model_dir = tmp_path / "models" / "m"
    shutil.copytree(sharded, model_dir)
    damage(model_dir / "latest")
    monkeypatch.chdir(tmp_path)
    before = snapshot(model_dir)
    args = ["-n", "m", "-d", str(tiny_data), *FAST.split(), "--max-steps", "6"]
    line = one_line_error(capsys, train_model.main, *args)
    assert f"cannot load 'models/m/latest/{file}' ({reason}" in line, line
    check_fix(line, TRAIN_FIX)
    assert snapshot(model_dir) == before
    if case == "NaN in a shard":  # the way out it names works
        train_model.main([*args, "--resume-from", "best"])
        assert read_meta(model_dir / "latest")["step"] == 6


@pytest.mark.parametrize("case", ["NaN weights", "bad checkpoint.json"])
def test_a_damaged_init_from_source_is_named_with_train_models_flag(
    trained: Path,
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    from talm.cli import train_model

    model_dir = damaged_copy(trained, tmp_path / "work", case)
    monkeypatch.chdir(tmp_path / "work")
    args = ["-n", "x", "-d", str(tiny_data), "--init-from", "models/m/latest", *FAST.split()]
    line = one_line_error(capsys, train_model.main, *args)
    assert f"cannot load '{model_dir.relative_to(Path.cwd())}/latest/{DAMAGE[case][0]}'" in line, line
    assert "pass an intact checkpoint to --init-from" in line and "--checkpoint" not in line
    assert not Path("models/x").exists()
