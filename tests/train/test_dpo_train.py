"""train_model --preset dpo end to end: a tiny chat model tuned on preference pairs through the real data stage
and Trainer (metrics.jsonl's pair stats, loss.png), exact resume with either reference, two DDP processes like
one, and the refusals (no --init-from, an objective on the other kind of data), each one line with nothing
written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from talm.data.config import DownloadConfig
from talm.data.prepare import prepare
from talm.train.checkpoint import load_model, load_trainer_state
from talm.train.metrics import read_metrics
from talm.train.run import train_model

BASE = Path(__file__).resolve().parents[2] / "tokenizers" / "base.json"
STATS = ("chosen_reward", "rejected_reward", "reward_margin", "pref_accuracy")


def pair_rows(n: int) -> list[dict]:
    """Chosen replies agree ("yes, N"), rejected ones refuse ("no.")."""
    return [{"prompt": f"Can you count to {i}?", "chosen": f"yes, {i}", "rejected": "no."} for i in range(n)]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows(160)))
    cfg = DownloadConfig(
        dataset="pairs", data_files=[str(root / "pairs.jsonl")], preferences=True, tokenizer_path=BASE,
        data_root=root / "data", val_tokens=500,
    )  # fmt: skip
    return prepare(cfg, progress=False).out_dir


def overrides(**train) -> dict:
    return {
        "optim": {"lr": 2e-3, "warmup_steps": 0},
        "train": {"max_steps": 8, "batch_size": 4, "eval_every": 4, "save_every": 4, "log_every": 1}
        | {"eval_tokens": 2048, "device": "cpu", "dtype": "float32", "deterministic": True}
        | train,
    }


def dpo(pairs_dir: Path, tiny_model_dir: Path, name: str, **kw) -> None:
    settings = {"reference": kw.pop("reference", "model"), "loss": kw.pop("loss", "dpo")}
    layers = overrides(init_from=str(tiny_model_dir), **kw) | {"dpo": settings}
    train_model(name, pairs_dir, preset_name="dpo", overrides=layers)


def test_dpo_logs_pair_stats_for_train_and_val_and_plots_them(
    pairs_dir: Path, tiny_model_dir: Path, in_tmp: Path
) -> None:
    dpo(pairs_dir, tiny_model_dir, "tuned")
    records = read_metrics("models/tuned")
    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert len(train) == 8 and len(val) == 2
    assert all(f"train_{k}" in r for r in train for k in STATS)
    assert all(f"val_{k}" in r for r in val for k in STATS)
    assert train[0]["train_pref_accuracy"] == pytest.approx(0.5)  # step 1: policy = reference, rewards 0
    assert val[-1]["val_pref_accuracy"] >= 0.9 and val[-1]["val_reward_margin"] > 0
    assert Path("models/tuned/loss.png").read_bytes().startswith(b"\x89PNG")
    from talm.train.plots import draw_runs

    _, accuracy_ax, reward_ax = draw_runs([("tuned", Path("models/tuned"))]).axes
    assert "preference accuracy" in accuracy_ax.get_title() and "rewards" in reward_ax.get_title()
    val_line = next(line for line in accuracy_ax.get_lines() if line.get_label() == "val pref_accuracy")
    assert list(val_line.get_ydata()) == pytest.approx([r["val_pref_accuracy"] for r in val])
    labels = {line.get_label() for line in reward_ax.get_lines()}
    assert {"val chosen_reward", "val rejected_reward", "val reward_margin", "train reward_margin"} <= labels
    meta = json.loads(Path("models/tuned/best/checkpoint.json").read_text())
    assert meta["scores"]["val_pref_accuracy"] >= 0.9


@pytest.mark.parametrize("reference", ["model", "stored"])
def test_an_interrupted_dpo_run_resumes_exactly(
    pairs_dir: Path, tiny_model_dir: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch, reference: str
) -> None:
    """Ctrl-C in step 3, then the same command again, give the metrics and weights of 8 steps in one."""
    from test_resume import stop_after

    import talm.train.loop as trainer_module

    dpo(pairs_dir, tiny_model_dir, "straight", reference=reference)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(trainer_module, "StopRequest", stop_after(3))
        dpo(pairs_dir, tiny_model_dir, "resumed", reference=reference)
    assert load_trainer_state("models/resumed/latest")["step"] == 3
    dpo(pairs_dir, tiny_model_dir, "resumed", reference=reference)
    keys = ["train_loss", *(f"train_{k}" for k in STATS)]
    curve = lambda name: [[r[k] for k in keys] for r in read_metrics(f"models/{name}") if "train_loss" in r]  # noqa: E731
    assert curve("resumed") == curve("straight")
    a, _ = load_model("models/straight/latest")
    b, _ = load_model("models/resumed/latest")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    saved = load_trainer_state("models/resumed/latest")["loader"]
    assert (saved["reference"] is None) == (reference == "model")  # stored log-probs travel in the checkpoint


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_ipo_and_reference_free_simpo_train_through_the_same_objective(
    pairs_dir: Path, tiny_model_dir: Path, in_tmp: Path, loss: str
) -> None:
    dpo(pairs_dir, tiny_model_dir, loss, loss=loss)
    val = [r for r in read_metrics(f"models/{loss}") if "val_loss" in r]
    assert val[-1]["val_pref_accuracy"] >= 0.9 and val[-1]["val_reward_margin"] > 0


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from talm.cli.train_model import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code), capsys.readouterr().err


def test_preset_dpo_without_init_from_is_refused_in_one_line(
    pairs_dir: Path, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(["-n", "x", "-d", str(pairs_dir), "--preset", "dpo", "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        "--preset dpo (train.objective dpo) tunes a chat model on preference pairs: pass --init-from" in err
    )
    assert not Path("models").exists()


def test_dpo_on_conversations_and_lm_on_pairs_are_refused_in_one_line(
    pairs_dir: Path, tiny_model_dir: Path, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fixtures.conversations import conversation_data

    chats = conversation_data(in_tmp / "chats", conversations=60)
    init = ["--init-from", str(tiny_model_dir), "--device", "cpu"]
    code, err = run_cli(["-n", "x", "-d", str(chats), "--preset", "dpo", *init], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        "tunes on preference pairs, but" in err
        and "holds conversations: make pairs with download_data" in err
    )
    for preset in ("sft", "finetune"):
        code, err = run_cli(["-n", "x", "-d", str(pairs_dir), "--preset", preset, *init], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "holds preference pairs, which train.objective lm would learn both replies of" in err
    assert not Path("models/x").exists()


@pytest.mark.slow
def test_two_processes_ddp_and_fsdp_dpo_match_one_process(
    pairs_dir: Path, tiny_model_dir: Path, in_tmp: Path
) -> None:
    """DDP with the frozen reference, and FSDP with stored reference log-probs (computed by the sharded model,
    every rank as many forwards), give one process's metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    args = ["-d", str(pairs_dir), "--preset", "dpo", "--init-from", str(tiny_model_dir), "--device", "cpu"]
    args += "--dtype float32 --batch-size 2 --train.tokens_per_step 256 --max-steps 4 --log-every 1".split()
    args += "--eval-every 4 --eval-tokens 2048 --optim.warmup_steps 0 --optim.lr 2e-3".split()
    single = subprocess.run(
        [sys.executable, "-m", "talm.cli.train_model", *args, "-n", "single"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    assert "2 micro-step(s)" in single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for name, extra in (("ddp", []), ("fsdp", ["--train.parallel", "fsdp", "--dpo.reference", "stored"])):
        run = subprocess.run(
            [*torchrun, "-m", "talm.cli.train_model", *args, *extra, "-n", name],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "2 process(es)" in run.stderr and "1 micro-step(s)" in run.stderr
        assert f"parallel: {name}" in run.stderr
        keys = ["train_loss", "train_pref_accuracy", "train_reward_margin"]
        for key in [*keys, "val_loss", "val_pref_accuracy", "val_reward_margin"]:
            one = [r[key] for r in read_metrics("models/single") if key in r]
            two = [r[key] for r in read_metrics(f"models/{name}") if key in r]
            assert len(one) == len(two) > 0 and two == pytest.approx(one, rel=1e-4, abs=1e-5), (name, key)


def test_evaluate_data_dir_on_preference_pairs_is_refused_in_one_line(
    pairs_dir: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from talm.cli.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["-m", str(tiny_model_dir), "--data-dir", str(pairs_dir), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "holds preference pairs, which have no language-model val loss" in err
