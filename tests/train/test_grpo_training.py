"""GRPO through the Trainer (train.objective grpo, --preset grpo): prompt data in, metrics.jsonl with the reward,
reply length, sampling and training speeds and val_pass@1 out; a run whose reward stays 0 says so; the sampler's
state makes a resumed run sample exactly what the uninterrupted one did; bad input is one line, nothing written;
and two gloo processes train together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BASE_TOKENIZER, save_model_dir
from test_resume import stop_after

import talm.train.loop as trainer_module
from talm.data.config import DownloadConfig
from talm.data.prompts import prepare_prompts
from talm.errors import TalmError
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.train.checkpoint import load_model, load_trainer_state
from talm.train.metrics import read_metrics
from talm.train.rewards import register_reward
from talm.train.run import train_model

OVERRIDES = {
    "train": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "save_every": 2, "log_every": 1,
              "device": "cpu", "deterministic": True, "seed": 5},
    "grpo": {"group_size": 4, "max_new_tokens": 6, "eval_prompts": 6},
}  # fmt: skip


@pytest.fixture(scope="module")
def sums(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompt data: 40 two-digit additions (6 held out)."""
    root = tmp_path_factory.mktemp("sums")
    rows = [{"prompt": f"What is {10 + i} + {20 + i}?", "answer": 30 + 2 * i} for i in range(40)]
    (root / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DownloadConfig(dataset="sums", data_files=[str(root / "sums.jsonl")], prompts=True,
                         tokenizer_path=BASE_TOKENIZER, data_root=root / "data", val_prompts=6)  # fmt: skip
    return prepare_prompts(cfg).out_dir


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with the base tokenizer (its random init: near-uniform replies, never right)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=1024, context_length=64, n_layer=2, n_head=2, d_model=32))
    return save_model_dir(tmp_path_factory.mktemp("chat") / "models" / "chat", model, step=1)


def grpo(name: str, sums: Path, chat_model: Path, **train: object) -> None:
    overrides = {**OVERRIDES, "train": {**OVERRIDES["train"], "init_from": str(chat_model), **train}}
    train_model(name, sums, preset_name="grpo", overrides=overrides)


def test_a_run_logs_rewards_speeds_and_pass_at_1(
    sums: Path, chat_model: Path, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grpo("g", sums, chat_model)
    records = read_metrics("models/g")
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_pass@1" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    for r in train:
        assert r["train_reward"] == 0.0 and 1 <= r["train_reply_tokens"] <= 6
        assert r["train_sampling_tokens_per_s"] > 0
    assert all(r["train_training_tokens_per_s"] > 0 for r in train[1:])  # measured from the step before
    assert all(r["val_pass@1"] == 0.0 for r in evals)
    err = capsys.readouterr().err
    assert "no sampled reply has earned a reward in 2 steps" in err  # said at each evaluation
    assert "nothing to learn from" in capsys.readouterr().out + err
    assert "could not draw" not in err and Path("models/g/loss.png").is_file()
    state = load_trainer_state("models/g/latest")
    assert state["loader"] == {"grpo_sampler": {"epoch": 0, "position": 8, "draws": 4}}
    assert (Path("models/g/best") / "checkpoint.json").is_file()


def test_a_resumed_run_samples_what_the_whole_run_did(
    sums: Path, chat_model: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_reward(
        "even_length", lambda reply, reference: float(len(reply) % 2 == 0)
    )  # rewards to learn from
    monkeypatch.setitem(OVERRIDES["grpo"], "reward", "even_length")
    grpo("whole", sums, chat_model)
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "StopRequest", stop_after(3))
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C in step 3: saved, then stopped
            grpo("cut", sums, chat_model)
    grpo("cut", sums, chat_model)  # the same command resumes

    def curve(name: str) -> dict[int, tuple[float, float]]:
        return {r["step"]: (r["train_loss"], r["train_reply_tokens"]) for r in read_metrics(f"models/{name}")
                if "train_loss" in r}  # fmt: skip

    assert curve("cut") == curve("whole") and any(loss != 0 for loss, _ in curve("whole").values())
    whole, _ = load_model("models/whole/latest")
    cut, _ = load_model("models/cut/latest")
    for a, b in zip(whole.parameters(), cut.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_input_is_refused_before_anything_is_written(
    sums: Path, chat_model: Path, in_tmp: Path, tiny_data: Path
) -> None:
    with pytest.raises(TalmError, match="pass --init-from models/CHAT"):
        train_model("x", sums, preset_name="grpo", overrides={"train": {"device": "cpu"}})
    with pytest.raises(TalmError, match="learns from prompts with reference answers, but .* holds text"):
        train_model("x", tiny_data, preset_name="grpo", overrides={"train": {"init_from": str(chat_model)}})
    with pytest.raises(TalmError, match="holds prompts with reference answers, not token shards"):
        train_model("x", sums, preset_name="tiny")
    with pytest.raises(TalmError, match="is not a multiple of grpo.group_size=4"):
        grpo("x", sums, chat_model, batch_size=6)
    with pytest.raises(TalmError, match="grpo.max_new_tokens=64 leaves no room"):
        overrides = {"train": {"init_from": str(chat_model), "device": "cpu"}, "grpo": {"max_new_tokens": 64}}
        train_model("x", sums, preset_name="grpo", overrides=overrides)
    with pytest.raises(TalmError, match="unknown reward 'typo'"):
        overrides = {"train": {"init_from": str(chat_model), "device": "cpu"}, "grpo": {"reward": "typo"}}
        train_model("x", sums, preset_name="grpo", overrides=overrides)
    assert not Path("models").exists()


@pytest.mark.slow
def test_two_gloo_processes_train_and_resume(sums: Path, chat_model: Path, in_tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "talm.cli.train_model", "-d", str(sums), "--preset", "grpo", "--init-from", str(chat_model),
            "--device", "cpu", "--batch-size", "4", "--grpo.group_size", "4", "--grpo.max_new_tokens", "6",
            "--grpo.eval_prompts", "5", "--eval-every", "2", "--save-every", "2", "--log-every", "1"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for steps in ("2", "4"):  # then resumed on two processes
        done = subprocess.run([*torchrun, *args, "-n", "ddp", "--max-steps", steps], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "2 process(es)" in done.stderr and "2 prompts x 4 replies per step" in done.stderr
    records = read_metrics("models/ddp")
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_pass@1" in r] == [2, 4]
    state = load_trainer_state("models/ddp/latest")
    assert state["loader"]["grpo_sampler"] == {"epoch": 0, "position": 8, "draws": 4}
    assert len(state["rng"]) == 2


@pytest.mark.slow
def test_two_fsdp_processes_sample_then_train(sums: Path, chat_model: Path, in_tmp: Path) -> None:
    """Under FSDP every sampling runs all max_new_tokens steps on every rank, and the weights gathered for it
    are ordinary tensors the training step can write into (not inference tensors)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "talm.cli.train_model", "-d", str(sums), "--preset", "grpo", "--init-from", str(chat_model),
            "--device", "cpu", "--batch-size", "4", "--grpo.group_size", "4", "--grpo.max_new_tokens", "6",
            "--grpo.eval_prompts", "5", "--eval-every", "2", "--save-every", "2", "--log-every", "1",
            "--train.parallel", "fsdp", "--max-steps", "3", "-n", "fsdp"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fsdp" in done.stderr
    records = read_metrics("models/fsdp")
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val_pass@1" in r] == [2, 3]
