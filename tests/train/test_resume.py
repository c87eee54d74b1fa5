"""A resumed run continues the run it resumes: the learning-rate schedule picks up at the step it stopped, and a
run started on 2 processes and resumed on 1 keeps the global batch and the data order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import talm.train.loop as trainer_module  # the module whose loop looks up StopRequest
from talm.config import validate
from talm.data.manifest import read_data
from talm.train.checkpoint import load_model, load_trainer_state, read_meta
from talm.train.config import RunConfig
from talm.train.loader import TokenLoader
from talm.train.loop import Trainer
from talm.train.metrics import read_metrics
from talm.train.optim import schedule
from talm.train.run import resolve_run, train


def layer(data: Path, **train: Any) -> dict[str, Any]:
    return {
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_length": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "min_lr_ratio": 0.1},
        "train": {"max_steps": 10, "batch_size": 4, "eval_every": 100, "save_every": 100, "log_every": 1}
        | {"eval_tokens": 256, "device": "cpu", "deterministic": True}
        | train,
        "data": {"dir": str(data)},
    }


def stop_after(steps: int) -> type:
    """A StopRequest whose Ctrl-C arrives during optimizer step `steps` (the trainer asks once per step)."""

    class StopAfter(trainer_module.StopRequest):
        asked = 0

        @property
        def requested(self) -> bool:
            type(self).asked += 1
            return type(self).asked >= steps

        @requested.setter
        def requested(self, value: bool) -> None:
            pass

    return StopAfter


def steps_of(model_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(model_dir) if key in r}


def test_lr_schedule_continues_across_a_resume(
    tiny_data: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = validate(RunConfig, layer(tiny_data))
    train(whole, in_tmp / "whole")

    monkeypatch.setattr(trainer_module, "StopRequest", stop_after(4))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in step 4: saved, then stopped
        Trainer(validate(RunConfig, layer(tiny_data)), in_tmp / "cut").run()
    monkeypatch.undo()
    assert read_meta(in_tmp / "cut" / "latest")["step"] == 4
    cfg, resume_from = resolve_run(in_tmp / "cut", [layer(tiny_data)])  # rerunning the same command
    assert resume_from == in_tmp / "cut" / "latest"
    train(cfg, in_tmp / "cut", resume_from=resume_from)

    lr_whole, lr_cut = steps_of(in_tmp / "whole", "lr"), steps_of(in_tmp / "cut", "lr")
    expected = schedule(whole.optim, 10)
    assert sorted(lr_cut) == list(range(1, 11))  # each step logged once: nothing lost or repeated
    for step in range(1, 11):  # step k's record holds the lr of optimizer step k-1 (0-based)
        assert lr_cut[step] == lr_whole[step] == pytest.approx(expected(step - 1), rel=1e-12)
    assert lr_cut[5] < lr_cut[4]  # past warmup: the cosine, not a restarted warmup
    # deterministic CPU run: the resumed steps repeat the uninterrupted run's losses
    loss_whole, loss_cut = steps_of(in_tmp / "whole", "train_loss"), steps_of(in_tmp / "cut", "train_loss")
    assert [loss_cut[s] for s in range(5, 11)] == pytest.approx(
        [loss_whole[s] for s in range(5, 11)], rel=1e-6
    )


# ------------------------------------------------------------------------------------------------ 2 -> 1 process

ARGS = (
    "--device cpu --model.context_length 32 --model.n_layer 2 --model.d_model 64 --model.n_head 2 "
    "--batch-size 4 --log-every 1 --eval-every 4 --save-every 4 "
    "--eval-tokens 512 --optim.warmup_steps 2 --optim.min_lr_ratio 1"
).split()


@pytest.mark.slow
def test_run_started_on_two_processes_resumes_on_one(tiny_data: Path, in_tmp: Path) -> None:
    """Steps 1-4 on 2 processes (gloo), steps 5-8 resumed on 1 process, against steps 1-8 on 1 process. The
    2-process run leaves tokens_per_step unset (256: one micro-batch of 4 x 32 per process): the resume keeps it
    with 2 micro-steps (resume.py), where 1 process would otherwise train on half the batch.

    The lr schedule is flat after warmup (min_lr_ratio 1) so raising --max-steps on resume leaves it unchanged.
    Tolerance: 2 processes average their gradients by an all-reduce where 1 process accumulates 2 micro-batches,
    so the sums are done in another order: float32 rounding, ~1e-7 relative per step, grows over 8 steps of
    AdamW to well under 1e-4 (tests/test_ddp.py holds 2 processes to 1 at the same tolerance). A different
    global batch or data order changes the loss at the first resumed step by far more (~1e-2).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train_cmd = [sys.executable, "-m", "talm.cli.train_model", "-d", str(tiny_data), *ARGS]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    first = subprocess.run(
        [*torchrun, "-m", "talm.cli.train_model", "-d", str(tiny_data), *ARGS, "-n", "r", "--max-steps", "4"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "2 process(es)" in first.stderr and "1 micro-step(s)" in first.stderr
    resumed = subprocess.run(
        [*train_cmd, "-n", "r", "--max-steps", "8"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming models/r from step 4 (1,024 tokens seen)" in resumed.stderr
    assert "1 process(es), 256 tokens/step (2 micro-step(s)" in resumed.stderr  # the same global batch
    assert "2 micro-step(s) per step keep its 256 tokens per step" in resumed.stderr
    whole = subprocess.run(
        [*train_cmd, "-n", "whole", "--max-steps", "8", "--train.tokens_per_step", "256"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert whole.returncode == 0, whole.stderr

    loss_r, loss_w = steps_of(Path("models/r"), "train_loss"), steps_of(Path("models/whole"), "train_loss")
    assert sorted(loss_r) == sorted(loss_w) == list(range(1, 9))
    tokens_r = steps_of(Path("models/r"), "tokens")
    assert [tokens_r[s] for s in range(1, 9)] == [256 * s for s in range(1, 9)]
    assert [loss_r[s] for s in range(1, 9)] == pytest.approx(
        [loss_w[s] for s in range(1, 9)], rel=1e-4, abs=1e-5
    )
    assert steps_of(Path("models/r"), "val_loss")[8] == pytest.approx(
        steps_of(Path("models/whole"), "val_loss")[8], rel=1e-4, abs=1e-5
    )
    # the data order: the loader is at the same place of the same epoch
    assert (
        load_trainer_state("models/r/latest")["loader"] == load_trainer_state("models/whole/latest")["loader"]
    )
    m_r, _ = load_model("models/r/latest")
    m_w, _ = load_model("models/whole/latest")
    for a, b in zip(m_r.parameters(), m_w.parameters(), strict=True):
        assert (a - b).abs().max().item() < 1e-4


def windows_per_step(loaders: list[TokenLoader], micro_steps: int, steps: int) -> list[list[bytes]]:
    """The training windows of each optimizer step, over all ranks and micro-steps (as comparable bytes)."""
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(micro_steps):
            for loader in loaders:
                x, _ = loader.next_batch()
                rows += [bytes(r.numpy().astype("int64").tobytes()) for r in x]
        out.append(sorted(rows))
    return out


def test_resume_at_another_process_count_keeps_the_data_order_across_an_epoch_end(tiny_data: Path) -> None:
    """The trainer's loaders for 2 processes (1 micro-step each) and for 1 process (2 micro-steps), from the
    state a 2-process checkpoint saves, over an epoch end that leaves between 1 and 2 micro-batches over."""
    data = read_data(tiny_data)
    T = 32
    total = TokenLoader(data, batch_size=1, context_length=T, seed=0).total_windows
    B = next(b for b in range(2, 64) if b <= total % (2 * b) < 2 * b)  # the epoch's last step is partial
    two = [TokenLoader(data, batch_size=B, context_length=T, seed=1, rank=r, world_size=2) for r in range(2)]
    steps_to_end = total // (2 * B)
    windows_per_step(two, 1, steps_to_end - 1)  # the original run, up to its checkpoint
    one = TokenLoader(data, batch_size=B, context_length=T, seed=1, accum_steps=2)
    one.load_state_dict(two[0].state_dict())  # the resumed run on 1 process
    expected = windows_per_step(two, 1, 3)
    assert windows_per_step([one], 2, 3) == expected


def test_resume_at_another_process_count_keeps_the_data_order_within_an_epoch(tiny_data: Path) -> None:
    """The same comparison away from an epoch end."""
    data = read_data(tiny_data)
    two = [TokenLoader(data, batch_size=4, context_length=32, seed=1, rank=r, world_size=2) for r in range(2)]
    windows_per_step(two, 1, 2)
    one = TokenLoader(data, batch_size=4, context_length=32, seed=1, accum_steps=2)
    one.load_state_dict(two[0].state_dict())
    assert windows_per_step([one], 2, 3) == windows_per_step(two, 1, 3)
