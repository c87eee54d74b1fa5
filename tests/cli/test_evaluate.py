"""`evaluate` end to end through its console-script entry point: the table, evals/<step>.json, bits per byte on
a data directory, and one-line errors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from conftest import one_line_error
from fixtures.task_copies import write_all_tasks

from talm.cli.evaluate import main
from talm.data.manifest import read_data
from talm.eval.runner import FORMAT, read_results
from talm.train.dist import DistContext
from talm.train.evaluate import evaluate
from talm.train.loader import EvalSlice
from talm.use.load import load


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_all_tasks(tmp_path_factory.mktemp("tasks"))


def test_tasks_table_and_results_file(
    tiny_model_dir: Path, tasks_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(
        ["-m", str(tiny_model_dir), "--tasks", "hellaswag", "arc_easy", "winogrande", "lambada",
         "--tasks-dir", str(tasks_dir), "--device", "cpu"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "random", "centered", "examples"]
    assert any(
        line.split()[:2] == ["hellaswag", "acc_norm"] and line.split()[3] == "0.2500" for line in lines
    )
    assert any(line.split()[:2] == ["lambada_openai", "ppl"] for line in lines)
    assert "evaluated step 10: 12 examples in " in err and "evals/10.json" in err

    saved = read_results(tiny_model_dir / "evals" / "10.json")
    assert saved["format"] == FORMAT and saved["step"] == 10 and saved["checkpoint"].endswith("latest")
    assert set(saved["tasks"]) == {"hellaswag", "arc_easy", "winogrande", "lambada_openai"}
    arc = saved["tasks"]["arc_easy"]
    assert arc["repo"] == "allenai/ai2_arc" and arc["config"] == "ARC-Easy" and arc["split"] == "test"
    assert arc["random"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 5) / 3)
    assert arc["centered"]["acc"] == pytest.approx(
        (arc["metrics"]["acc"] - arc["random"]) / (1 - arc["random"])
    )

    # a second run at the same step adds its tasks to the file and keeps the others
    main(["-m", str(tiny_model_dir), "--tasks", "piqa", "--tasks-dir", str(tasks_dir), "--device", "cpu"])
    assert set(read_results(tiny_model_dir / "evals" / "10.json")["tasks"]) == {
        "hellaswag", "arc_easy", "winogrande", "lambada_openai", "piqa"
    }  # fmt: skip


def test_bits_per_byte_on_a_data_dir(
    tiny_model_dir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["-m", str(tiny_model_dir), "--checkpoint", "best", "--data-dir", str(tiny_data),
          "--data-tokens", "2048", "--device", "cpu", "--dtype", "float32"])  # fmt: skip
    out = capsys.readouterr().out
    data = json.loads((tiny_model_dir / "evals" / "10.json").read_text())["data"]
    assert data["tokens"] == 2048 and f"bits/byte {data['val_bpb']:.4f} over 2,048 tokens" in out
    # what a training run's val_bpb would say on the same slice
    model, _ = load(tiny_model_dir, "best", device="cpu")
    val = EvalSlice(read_data(tiny_data, splits=("val",)), eval_tokens=2048, context_length=64, batch_size=32)
    loss, bpb = evaluate(model, val, DistContext(0, 0, 1, torch.device("cpu")), contextlib.nullcontext)
    assert data["val_loss"] == pytest.approx(loss) and data["val_bpb"] == pytest.approx(bpb)


def test_user_errors_are_one_line(
    tiny_model_dir: Path, tasks_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    model = str(tiny_model_dir)
    assert "invalid choice: 'hellaswagg'" in one_line_error(
        capsys, main, "-m", model, "--tasks", "hellaswagg"
    )
    assert "nothing to evaluate" in one_line_error(capsys, main, "-m", model)
    err = one_line_error(capsys, main, "-m", model, "--tasks", "piqa", "--tasks-dir", str(tmp_path))
    assert "no local copy of piqa" in err and "baber/piqa" in err
    err = one_line_error(capsys, main, "-m", str(tmp_path / "nope"), "--tasks", "piqa")
    assert "model directory" in err and "not found" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    err = one_line_error(capsys, main, "-m", model, "--tasks", "hellaswag")
    assert "cannot read hellaswag from the Hub (Rowan/hellaswag)" in err and "--tasks-dir DIR" in err
    assert not (tiny_model_dir / "evals").exists()  # nothing written when a task cannot be read


def test_a_damaged_results_file_is_refused_before_scoring(
    tiny_model_dir: Path, tasks_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tiny_model_dir / "evals").mkdir()
    (tiny_model_dir / "evals" / "10.json").write_text('{"tasks": {}}')
    err = one_line_error(
        capsys, main, "-m", str(tiny_model_dir), "--tasks", "piqa", "--tasks-dir", str(tasks_dir)
    )
    assert "is not a talm evals file (talm.evals/1): move it away" in err
    assert (tiny_model_dir / "evals" / "10.json").read_text() == '{"tasks": {}}'  # left as it was
