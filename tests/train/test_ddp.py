"""Two processes under torchrun (gloo, CPU) train like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from talm.train.checkpoint import load_model, load_trainer_state
from talm.train.metrics import read_metrics

ARGS = (
    "--device cpu --model.context_length 32 --model.n_layer 2 --model.d_model 64 --model.n_head 2 "
    "--batch-size 4 --train.tokens_per_step 256 --max-steps 8 --log-every 1 --eval-every 4 --save-every 4 "
    "--eval-tokens 512 --optim.warmup_steps 2"
).split()


def curve(model_dir: str) -> tuple[list[float], list[float]]:
    records = read_metrics(model_dir)
    return [r["train_loss"] for r in records if "train_loss" in r], [
        r["val_loss"] for r in records if "val_loss" in r
    ]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_data: Path, in_tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "talm.cli.train_model", "-d", str(tiny_data), *ARGS]
    # One process: 256 tokens/step = 2 micro-batches of 4 x 32, accumulated.
    single = subprocess.run([*train, "-n", "single"], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    assert "2 micro-step(s)" in single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ddp = subprocess.run(
        [*torchrun, "-m", "talm.cli.train_model", "-d", str(tiny_data), *ARGS, "-n", "ddp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr
    assert "2 process(es)" in ddp.stderr and "1 micro-step(s)" in ddp.stderr
    assert ddp.stderr.count("training models/ddp from scratch") == 1  # rank 0 alone prints
    (train_1, val_1), (train_2, val_2) = curve("models/single"), curve("models/ddp")
    assert len(train_1) == len(train_2) == 8 and len(val_1) == len(val_2) == 2
    assert train_2 == pytest.approx(train_1, rel=1e-4, abs=1e-5)
    assert val_2 == pytest.approx(val_1, rel=1e-4, abs=1e-5)
    assert train_1[-1] < train_1[0]
    m1, _ = load_model("models/single/latest")
    m2, _ = load_model("models/ddp/latest")
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert (a - b).abs().max().item() < 1e-4
    assert len(load_trainer_state("models/ddp/latest")["rng"]) == 2  # every rank's RNG state

    # Resume under torchrun after a save interrupted between its renames, with a stale temporary: rank 0 alone
    # recovers them, after the process group exists, while the other rank waits.
    model_dir = Path("models/ddp")
    os.replace(model_dir / "latest", model_dir / ".latest.old")
    (model_dir / ".best.tmp-999999").mkdir()
    resumed = subprocess.run(
        [
            *torchrun,
            "-m",
            "talm.cli.train_model",
            "-d",
            str(tiny_data),
            *ARGS,
            "-n",
            "ddp",
            "--max-steps",
            "10",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("resuming models/ddp from step 8") == 1
    assert sorted(p.name for p in model_dir.glob(".*")) == []
    assert load_model("models/ddp/latest")[1]["step"] == 10
    # and on one process (the data order is kept, dropout reseeded)
    single = subprocess.run(
        [*train, "-n", "ddp", "--max-steps", "12"], env=env, capture_output=True, text=True
    )
    assert single.returncode == 0 and "resuming models/ddp from step 10" in single.stderr, single.stderr
    assert len(load_trainer_state("models/ddp/latest")["rng"]) == 1
