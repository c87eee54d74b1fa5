"""Benchmark tasks scored during training (--eval-tasks): in metrics.jsonl and in the loss plot."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import is_png, write_metrics
from fixtures.task_copies import write_all_tasks

from talm.errors import TalmError
from talm.eval.runner import prepare, score
from talm.train.config import RunConfig
from talm.train.loop import Trainer
from talm.train.metrics import read_metrics
from talm.train.plots import plot_model
from talm.use.load import load


def run_config(data: Path, **train) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"n_layer": 2, "n_head": 2, "d_model": 64, "context_length": 64},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {"max_steps": 4, "batch_size": 4, "eval_every": 1, "save_every": 2, "log_every": 1}
            | {"eval_tokens": 256, "device": "cpu", "dtype": "float32"}
            | train,
            "data": {"dir": str(data)},
        }
    )


def test_task_scores_are_recorded_at_their_steps(tiny_data: Path, in_tmp: Path) -> None:
    tasks_dir = write_all_tasks(in_tmp / "tasks")
    cfg = run_config(
        tiny_data, max_steps=3, eval_tasks=["arc_easy", "winogrande"], eval_tasks_every=3, eval_tasks_limit=2,
        eval_tasks_dir=str(tasks_dir),
    )  # fmt: skip
    Trainer(cfg, "models/m").run()
    evals = [r for r in read_metrics("models/m") if "val_loss" in r]
    scored = {r["step"]: r for r in evals if "arc_easy/acc" in r}
    assert [r["step"] for r in evals] == [1, 2, 3]
    assert sorted(scored) == [1, 3]  # the first evaluation, then the first one at or after each multiple of 3
    assert set(scored[3]) - set(evals[1]) == {"arc_easy/acc", "winogrande/acc"}

    # the number recorded is what the scorer says of the model at that step (the last one, saved in latest/)
    model, tokenizer = load("models/m/latest", device="cpu")
    for name in ("arc_easy", "winogrande"):
        rescored = score(model, prepare(tokenizer, name, tasks_dir=tasks_dir, limit=2))
        assert scored[3][f"{name}/acc"] == pytest.approx(rescored.metrics["acc"])


def test_a_missing_task_fails_before_the_run_writes_anything(tiny_data: Path, in_tmp: Path) -> None:
    cfg = run_config(tiny_data, eval_tasks=["piqa"], eval_tasks_dir=str(in_tmp / "nowhere"))
    with pytest.raises(TalmError, match="no local copy of piqa.* or drop --eval-tasks-dir$"):
        Trainer(cfg, "models/m")
    assert not Path("models/m").exists()


def test_an_unreachable_hub_names_train_models_flag(
    tiny_data: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    with pytest.raises(TalmError) as err:
        Trainer(run_config(tiny_data, eval_tasks=["piqa"]), "models/m")
    message = str(err.value)
    assert "cannot read piqa from the Hub" in message and "pass --eval-tasks-dir DIR" in message
    assert "--tasks-dir" not in message.replace("--eval-tasks-dir", "")  # evaluate's flag, not train_model's
    assert not Path("models/m").exists()


def test_task_config_is_checked() -> None:
    with pytest.raises(ValueError, match="eval_tasks"):
        RunConfig.model_validate({"train": {"eval_tasks": ["mmlu"]}})


def test_loss_plot_draws_the_task_scores(in_tmp: Path) -> None:
    write_metrics(in_tmp / "plain")
    records = write_metrics(in_tmp / "run")
    lines = []
    for r in records:
        if "val_loss" in r:
            r = r | {"hellaswag/acc_norm": 0.25 + r["step"] / 1000, "arc_easy/acc": 0.3}
        lines.append(r)
    import json

    (in_tmp / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    plain = plot_model(in_tmp / "plain")
    with_tasks = plot_model(in_tmp / "run")
    assert is_png(with_tasks)
    from PIL import Image

    assert Image.open(with_tasks).width > Image.open(plain).width  # the third panel


def test_train_model_takes_the_task_flags() -> None:
    from talm.cli.common import collect_config_flags
    from talm.cli.train_model import build_parser
    from talm.train.config import TrainConfig

    parser, names = build_parser()
    argv = [
        "-n",
        "m",
        "-d",
        "data",
        "--eval-tasks",
        "hellaswag",
        "piqa",
        "--eval-tasks-every",
        "500",
        "--eval-tasks-limit",
        "200",
    ]
    given = collect_config_flags(parser.parse_args([*argv, "--eval-tasks-dir", "tasks"]), TrainConfig)
    assert given == {
        "eval_tasks": ["hellaswag", "piqa"], "eval_tasks_every": 500, "eval_tasks_limit": 200, "eval_tasks_dir": "tasks"
    }  # fmt: skip
    assert names["train.eval_tasks"] == "--eval-tasks"
    with pytest.raises(SystemExit):
        parser.parse_args(["-n", "m", "-d", "data", "--eval-tasks", "mmlu"])
