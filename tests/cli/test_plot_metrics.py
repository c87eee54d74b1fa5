"""`plot_metrics` end to end on bad input: output paths it cannot or must not write, files that are not
metrics. Each is refused with exit status 2 and one line, before anything is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import is_png, one_line_error, write_metrics

from talm.cli.plot_metrics import main

pytest.importorskip("matplotlib")


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory): what 'nothing changed' compares."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    return one_line_error(capsys, main, *args)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("taken", "'taken' is a directory, not a file: pick another -o/--output"),
        ("afile/sub/x.png", "'afile' is a file, not a directory"),
        ("afile/x.png", "'afile' is a file, not a directory"),
        ("/proc/x.png", "cannot write to '/proc'"),
        ("models/a/metrics.jsonl", "is the metrics file being drawn"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], output: str, message: str
) -> None:
    write_metrics(in_tmp / "models" / "a")
    (in_tmp / "taken").mkdir()
    (in_tmp / "taken" / "keep.txt").write_text("mine")
    (in_tmp / "afile").write_text("a file")
    before = listing(in_tmp)
    assert message in fails(capsys, "models/a", "-o", output)
    assert listing(in_tmp) == before
    assert message in fails(capsys, "models/a", "models/a/metrics.jsonl", "-o", output)  # several runs
    assert listing(in_tmp) == before


def test_the_default_output_is_checked_too(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_metrics(in_tmp / "models" / "a")
    (in_tmp / "models" / "a" / "loss.png").mkdir()  # a directory where the picture goes
    before = listing(in_tmp)
    assert "is a directory, not a file" in fails(capsys, "models/a")
    assert listing(in_tmp) == before


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            os.urandom(4096).replace(b"\n", b"x").replace(b"{", b"x"),
            "line 1 of 'models/a/metrics.jsonl' is not",
        ),
        (
            b'{"step": 1, "tokens": 2, "time": 0.1, "train_loss": "abc"}\n',
            '"train_loss" is "abc", not a number',
        ),
        (
            b'{"step": [1, 2], "tokens": 2, "time": 0.1, "train_loss": 5.0}\n',
            '"step" is [1, 2], not an integer',
        ),
        (
            b'{"epoch": 1, "loss": 5.0}\n{"epoch": 2, "loss": 4.0}\n',
            '(no "step"): expected a JSON object with',
        ),
    ],
)
def test_a_file_that_is_not_metrics_gets_one_line_saying_what_was_expected(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], data: bytes, message: str
) -> None:
    run = in_tmp / "models" / "a"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_bytes(data)
    before = listing(in_tmp)
    err = fails(capsys, "models/a")
    assert message in err and "holds no metrics yet" not in err
    assert listing(in_tmp) == before


def test_the_line_at_fault_is_named(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = write_metrics(in_tmp / "models" / "a", steps=5, eval_every=100)
    path = in_tmp / "models" / "a" / "metrics.jsonl"
    path.write_text(path.read_text() + json.dumps({"step": 6, "val_loss": {"x": 1}}) + "\n")
    err = fails(capsys, "models/a", "-o", "out.png")
    assert f"line {len(records) + 1} of " in err and '"val_loss" is {"x": 1}, not a number' in err
    assert not (in_tmp / "out.png").exists()
    path.write_text(path.read_text().rsplit("\n", 2)[0] + "\n" + '{"step": 6, "tok')  # torn: skipped
    main(["models/a", "-o", "out.png"])
    assert is_png(in_tmp / "out.png")


def test_an_sft_runs_evaluations_are_drawn(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fixtures.conversations import conversation_data, tiny_run

    from talm.train.metrics import read_metrics
    from talm.train.plots import draw_runs

    run = tiny_run(conversation_data(in_tmp), in_tmp / "models" / "sft")
    evals = [r for r in read_metrics(run) if "val_loss" in r]
    assert evals and all(r["val_bpb"] is None for r in evals)  # conversation data: no bits per byte

    fig = draw_runs([("sft", run)])
    right = fig.axes[1]
    texts = [t.get_text() for t in right.texts]
    assert "no evaluation yet" not in texts
    (line,) = right.get_lines()
    assert list(line.get_ydata()) == pytest.approx([r["val_loss"] for r in evals])
    assert "validation loss" in right.get_title()
    main([str(run)])  # its loss.png, through the command
    assert is_png(run / "loss.png") and "wrote" in capsys.readouterr().err

    # beside a text run, the right panel stays bits per byte (one unit per panel), drawn for the text run
    text_run = in_tmp / "models" / "text"
    write_metrics(text_run)
    right = draw_runs([("sft", run), ("text", text_run)]).axes[1]
    assert "bits per byte" in right.get_title() and len(right.get_lines()) == 1


def test_no_evaluation_yet_only_when_no_run_evaluated(in_tmp: Path) -> None:
    from talm.train.plots import draw_runs

    write_metrics(in_tmp / "models" / "a", steps=5, eval_every=100)
    right = draw_runs([("a", in_tmp / "models" / "a")]).axes[1]
    assert [t.get_text() for t in right.texts] == ["no evaluation yet"] and not right.get_lines()
