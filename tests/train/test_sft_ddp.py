"""Fine-tuning on conversations under torchrun (gloo, CPU): two processes train like one process accumulating
the same two micro-batches. Their micro-batches learn different numbers of targets, so this holds only if each
rank scales its loss by the step's global count of learned targets (the all-reduce in conversation_step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from talm.data.config import DownloadConfig
from talm.data.prepare import prepare
from talm.train.checkpoint import load_model
from talm.train.metrics import read_metrics

BASE = Path(__file__).resolve().parents[2] / "tokenizers" / "base.json"
ARGS = (
    "--device cpu --model.context_length 48 --model.n_layer 2 --model.d_model 64 --model.n_head 2 "
    "--batch-size 2 --train.tokens_per_step 192 --max-steps 6 --log-every 1 --eval-every 3 --save-every 3 "
    "--eval-tokens 256 --optim.warmup_steps 2"
).split()


@pytest.mark.slow
def test_two_process_sft_matches_one_process(in_tmp: Path) -> None:
    with open("c.jsonl", "w", encoding="utf-8") as f:
        for i in range(200):
            answer = " ".join(["yes"] * (1 + i % 7))  # varied numbers of learned targets per row
            messages = [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    cfg = DownloadConfig(
        dataset="c", data_files=["c.jsonl"], conversations=True, tokenizer_path=BASE, val_tokens=400
    )
    data = str(prepare(cfg, progress=False).out_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "talm.cli.train_model", "-d", data, *ARGS, "-n", "single"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    assert "2 micro-step(s)" in single.stderr and "conversation data:" in single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ddp = subprocess.run(
        [*torchrun, "-m", "talm.cli.train_model", "-d", data, *ARGS, "-n", "ddp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr
    assert "2 process(es)" in ddp.stderr and "1 micro-step(s)" in ddp.stderr
    curves = []
    for name in ("single", "ddp"):
        records = read_metrics(f"models/{name}")
        curves.append(
            (
                [r["train_loss"] for r in records if "train_loss" in r],
                [r["val_loss"] for r in records if "val_loss" in r],
            )
        )
    (train_1, val_1), (train_2, val_2) = curves
    assert len(train_1) == 6 and len(val_1) == 2
    assert train_2 == pytest.approx(train_1, rel=1e-4, abs=1e-5)
    assert val_2 == pytest.approx(val_1, rel=1e-4, abs=1e-5)
    m1, _ = load_model("models/single/latest")
    m2, _ = load_model("models/ddp/latest")
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert (a - b).abs().max().item() < 1e-4
