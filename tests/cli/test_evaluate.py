"""`evaluate` end to end through its console-script entry point: the table, evals/<step>.json, bits per byte on
a data directory, and one-line errors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import one_line_error
from fixtures.conversations import conversation_data, tiny_run
from fixtures.task_copies import (
    HELLASWAG_ROWS,
    hellaswag_table,
    parquet_file,
    with_column,
    write_all_tasks,
    write_task_repo,
)

from talm.cli.evaluate import main
from talm.data.manifest import read_data
from talm.eval.runner import FORMAT, read_results
from talm.train.dist import DistContext
from talm.train.evaluate import val_loss_and_bpb
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
    loss, bpb = val_loss_and_bpb(
        model, val, DistContext(0, 0, 1, torch.device("cpu")), contextlib.nullcontext
    )
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


def _labels(*labels: str) -> Callable[[Path], None]:
    def damage(repo: Path) -> None:
        table = hellaswag_table(HELLASWAG_ROWS)
        write_task_repo(
            repo.parents[1], "Rowan/hellaswag", {"default": with_column(table, "label", pa.array(labels))}
        )

    return damage


def _endings(values: pa.Array) -> Callable[[Path], None]:
    def damage(repo: Path) -> None:
        table = with_column(hellaswag_table(HELLASWAG_ROWS), "endings", values)
        write_task_repo(repo.parents[1], "Rowan/hellaswag", {"default": table})

    return damage


def _cut(keep: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(repo: Path) -> None:
        file = parquet_file(repo)
        file.write_bytes(keep(file.read_bytes()))

    return damage


ENDINGS = [e for row in HELLASWAG_ROWS for e in row["endings"][:1]]
BAD_COPIES = {
    "label out of range": (_labels("3", "7", "0"), "row 1 of ", "has label '7', not one of 0..3"),
    "empty label": (_labels("3", "0", ""), "row 2 of ", "has label '', not one of 0..3"),
    "no endings": (
        _endings(pa.array([["a", "b", "c", "d"], [], ["c"]], pa.list_(pa.string()))),
        "row 1 of ",
        "has endings [], not a non-empty list of strings",
    ),
    "endings as a string": (
        _endings(pa.array(ENDINGS, pa.string())),
        "row 0 of ",
        "not a non-empty list of strings",
    ),
    "truncated parquet": (_cut(lambda b: b[: len(b) // 2]), "cannot read ", "Parquet magic bytes not found"),
    "empty file": (_cut(lambda b: b""), "cannot read ", "Parquet file size is 0 bytes"),
    "not parquet": (_cut(lambda b: b"id,label\n1,2\n" * 40), "cannot read ", "Parquet magic bytes not found"),
    "parquet without rows": (
        lambda repo: write_task_repo(
            repo.parents[1], "Rowan/hellaswag", {"default": hellaswag_table(HELLASWAG_ROWS).slice(0, 0)}
        ),
        "hellaswag has no rows in ",
        "",
    ),
}


@pytest.mark.parametrize("case", BAD_COPIES)
def test_a_damaged_task_copy_is_refused_naming_the_file_and_row_and_keeps_earlier_results(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    good = write_all_tasks(tmp_path / "good")
    model = str(tiny_model_dir)
    main(["-m", model, "--tasks", "hellaswag", "--tasks-dir", str(good), "--device", "cpu"])
    results = tiny_model_dir / "evals" / "10.json"
    before = results.read_bytes()
    capsys.readouterr()

    damage, where, problem = BAD_COPIES[case]
    repo = write_all_tasks(tmp_path / "bad") / "Rowan" / "hellaswag"
    damage(repo)
    err = one_line_error(
        capsys, main, "-m", model, "--tasks", "hellaswag", "--tasks-dir", str(tmp_path / "bad")
    )
    assert where in err and problem in err
    assert str(parquet_file(repo)) in err  # the file at fault
    assert "hf download Rowan/hellaswag --repo-type dataset --local-dir " in err
    assert results.read_bytes() == before  # the earlier valid result is not overwritten


def test_a_python_file_in_a_task_copy_is_never_run(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = write_all_tasks(tmp_path / "tasks") / "Rowan" / "hellaswag"
    marker = tmp_path / "ran"
    # what datasets before 4.0 would have run as the dataset's loading script, and a module beside it
    for script in (repo / "hellaswag.py", repo / "data" / "__init__.py"):
        script.write_text(f"open({str(marker)!r}, 'w').write('ran')\n", encoding="utf-8")
    main(
        [
            "-m",
            str(tiny_model_dir),
            "--tasks",
            "hellaswag",
            "--tasks-dir",
            str(tmp_path / "tasks"),
            "--device",
            "cpu",
        ]
    )
    assert "hellaswag" in capsys.readouterr().out
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["text", "conversations"])
def test_data_dir_gives_the_runs_own_val_figures(
    tiny_data: Path, in_tmp: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    from talm.train.metrics import read_metrics

    data = tiny_data if kind == "text" else conversation_data(in_tmp)
    tiny_run(data, Path("models/m"))
    last = [r for r in read_metrics("models/m") if "val_loss" in r][-1]
    assert last["step"] == 4
    main(["-m", "models/m", "--data-dir", str(data), "--device", "cpu", "--dtype", "float32"])
    measured = read_results(Path("models/m/evals/4.json"))["data"]
    assert measured["val_loss"] == pytest.approx(last["val_loss"], abs=1e-4)
    if kind == "text":
        assert measured["val_bpb"] == pytest.approx(last["val_bpb"], abs=1e-4)
    else:  # the loss over the assistant's tokens: bits per byte of all the text would not be that loss's
        assert measured["val_bpb"] is None and last["val_bpb"] is None
    assert f"val loss {last['val_loss']:.4f}" in capsys.readouterr().out
