"""`train_model` end to end on tiny data, and every bad input: one line, exit 2, nothing overwritten."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ORIGINAL_TOKENIZER, SHAKESPEARE, write_token_shards

from talm.cli import train_model
from talm.train.checkpoint import read_meta
from talm.train.metrics import read_metrics

FAST = "--device cpu --model.context_length 32 --model.n_layer 2 --model.d_model 64 --model.n_head 2 --batch-size 4 "
FAST += "--eval-every 3 --save-every 3 --log-every 1 --eval-tokens 256 --optim.warmup_steps 2 --max-steps 4"


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["train_model", *args])
    code = 0
    try:
        train_model.main()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(model_dir: Path) -> dict[str, bytes]:
    """Every file of a model directory and its bytes (but the lock file, which records each run's pid)."""
    return {
        str(p.relative_to(model_dir)): p.read_bytes()
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.name != ".talm.lock"
    }


@pytest.mark.slow
def test_console_script_trains_resumes_and_restarts(tiny_data: Path, in_tmp: Path) -> None:
    exe = Path(sys.executable).with_name("train_model")
    base = [str(exe), "-n", "shakes", "-d", str(tiny_data), "--preset", "tiny"]
    base += "--batch-size 4 --eval-every 3 --save-every 3 --eval-tokens 1024 --device cpu".split()
    first = subprocess.run([*base, "--max-steps", "4"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "training models/shakes from scratch" in first.stderr and "parameters" in first.stderr
    assert "model: vocab_size=1024 context_length=128 n_layer=4" in first.stderr  # the resolved config
    summary = first.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: 4 steps") and "val bits/byte" in summary
    for name in ("tokenizer.json", "metrics.jsonl", "latest/model.safetensors", "best/checkpoint.json"):
        assert (Path("models/shakes") / name).is_file()
    again = subprocess.run([*base, "--max-steps", "6"], capture_output=True, text=True)
    assert again.returncode == 0 and "resuming models/shakes from step 4" in again.stderr
    assert read_meta("models/shakes/latest")["step"] == 6
    done = subprocess.run([*base, "--max-steps", "6"], capture_output=True, text=True)
    assert done.returncode == 0 and "already trained to step 6 (val loss" in done.stdout
    (Path("models/shakes") / "tensorboard").mkdir()  # what an earlier --report-to tensorboard left
    fresh = subprocess.run([*base, "--max-steps", "2", "--restart"], capture_output=True, text=True)
    assert fresh.returncode == 0 and "from scratch" in fresh.stderr
    assert not (Path("models/shakes") / "tensorboard").exists()  # nothing of the old run survives a restart
    assert read_meta("models/shakes/latest")["step"] == 2
    assert max(r["step"] for r in read_metrics("models/shakes")) == 2


def test_precedence_preset_then_toml_then_flags(tiny_data, in_tmp, capsys, monkeypatch) -> None:
    Path("run.toml").write_text("[model]\nn_layer = 1\n[optim]\nlr = 1e-3\nwarmup_steps = 1\n")
    code, out, err = run(
        capsys, monkeypatch, "-n", "p", "-d", str(tiny_data), "--preset", "tiny", "--config", "run.toml",
        "--optim.lr", "2e-3", "--max-steps", "1", "--batch-size", "2", "--eval-tokens", "128", "-s", "5",
    )  # fmt: skip
    assert code == 0, err
    cfg = read_meta("models/p/latest")["config"]
    assert cfg["model"]["n_layer"] == 1 and cfg["model"]["d_model"] == 128  # toml over preset
    assert cfg["optim"]["lr"] == 2e-3 and cfg["optim"]["warmup_steps"] == 1  # flag over toml
    assert cfg["train"]["seed"] == 5 and cfg["train"]["max_steps"] == 1


def test_help_lists_every_config_field(capsys, monkeypatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "--help")
    assert code == 0
    for flag in (
        "--model.n_layer",
        "--optim.lr",
        "--train.tokens_per_step",
        "--max-steps",
        "--preset",
        "--restart",
    ):
        assert flag in out


@pytest.fixture
def trained(tiny_data: Path, in_tmp: Path, capsys, monkeypatch) -> Path:
    code, _, err = run(capsys, monkeypatch, "-n", "m", "-d", str(tiny_data), *FAST.split())
    assert code == 0, err
    return Path("models/m")


def bad_data_dirs(tiny_data: Path) -> dict[str, Path]:
    dirs = {}
    Path("empty").mkdir()
    dirs["empty"] = Path("empty")
    meta = json.loads((tiny_data / "meta.json").read_text())
    for name, keep in (("noval", "train"), ("notrain", "val")):
        d = Path(name)
        shutil.copytree(tiny_data, d)
        (d / "meta.json").write_text(
            json.dumps({**meta, "shards": [s for s in meta["shards"] if s["split"] == keep]})
        )
        dirs[name] = d
    return dirs


def test_bad_inputs_fail_in_one_line_and_overwrite_nothing(
    trained: Path, tiny_data: Path, capsys, monkeypatch
) -> None:
    before = snapshot(trained)
    dirs = bad_data_dirs(tiny_data)
    Path("bad.toml").write_text("[model]\nn_layr = 3\n")
    Path("broken.toml").write_text("[model\n")
    d = str(tiny_data)
    other = write_token_shards(
        Path("other"), SHAKESPEARE.read_text(encoding="utf-8")[:20_000], ORIGINAL_TOKENIZER
    )
    cases = {
        "data of another tokenizer": (["-d", str(other)], "trained with another tokenizer"),
        "no manifest": (["-d", str(dirs["empty"])], "no manifest"),
        "missing data dir": (["-d", "nowhere"], "not found"),
        "no train shards": (["-d", str(dirs["notrain"])], "no train shards"),
        "tokenizer mismatch": (["-d", d, "-t", str(ORIGINAL_TOKENIZER)], "is not the one"),
        "missing tokenizer": (["-d", d, "-t", "nope.json"], "not found"),
        "context too long": (
            ["-d", d, "--restart", "--model.context_length", "100000"],
            "context_length+1=100001",
        ),
        "heads": (["-d", d, "--model.d_model", "100", "--model.n_head", "3"], "not divisible by n_head"),
        "unknown key": (["-d", d, "--config", "bad.toml"], "unknown setting 'model.n_layr'"),
        "bad toml": (["-d", d, "--config", "broken.toml"], "not valid TOML"),
        "ill-typed": (
            ["-d", d, "--model.n_layer", "two"],
            "argument --model.n_layer: 'two' is not a whole number",
        ),
        "negative": (["-d", d, "--batch-size", "0"], "--batch-size=0"),
        "architecture": (["-d", d, "--model.n_layer", "3"], "another architecture (n_layer 2 -> 3)"),
        "accumulation": (
            ["-d", d, "--restart", "--train.tokens_per_step", "100"],
            "not a multiple of batch_size",
        ),
        "global batch": (["-d", d, "--train.tokens_per_step", "256"], "would change the run's global batch"),
        "float16 on cpu": (["-d", d, "--dtype", "float16", "--max-steps", "9"], "float16 needs a CUDA GPU"),
    }
    for case, (args, expected) in cases.items():
        code, out, err = run(capsys, monkeypatch, "-n", "m", *args)
        assert code == 2, case
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("train_model: error: "), (case, err)
        assert expected in lines[0], (case, lines[0])
        assert snapshot(trained) == before, case
    code, _, err = run(capsys, monkeypatch, "-n", "../escape", "-d", d)
    assert code == 2 and "not a plain name" in err


def test_unknown_flag_is_a_usage_error(capsys, monkeypatch) -> None:
    code, _, err = run(capsys, monkeypatch, "-n", "m", "-d", "x", "--model.n_layr", "3")
    assert code == 2 and "unrecognized arguments: --model.n_layr" in err
