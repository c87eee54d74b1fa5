"""Training curves and metric sinks: loss.png, plot_metrics, TensorBoard and W&B (with fake modules)."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
from conftest import is_png, write_metrics

from talm.cli.plot_metrics import main as plot_metrics_main
from talm.config import validate
from talm.errors import TalmError
from talm.train.config import RunConfig
from talm.train.metrics import MetricsLog, read_metrics, read_timelines
from talm.train.plots import plot_model, plot_runs
from talm.train.report import PlotSink, TensorBoardSink, WandbSink, make_sinks


def hide_module(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make `import name` (and its submodules) fail, as when the package is not installed."""
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, name, None)


# ------------------------------------------------------------------------------------------------ reading


def test_read_metrics_splits_train_and_eval_and_keeps_one_timeline(tmp_path: Path) -> None:
    lines = [
        {"step": 1, "tokens": 10, "train_loss": 5.0},
        {"step": 2, "tokens": 20, "train_loss": 4.0},
        {"step": 2, "tokens": 20, "val_loss": 4.5, "val_bpb": 2.0},
        {"step": 3, "tokens": 30, "train_loss": 3.9},  # the run died here and resumed from step 2
        {"step": 3, "tokens": 30, "train_loss": 3.5},
        {"step": 4, "tokens": 40, "train_loss": 3.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "tok')  # torn last line
    train, evals = read_timelines(path)
    assert [(r["step"], r["train_loss"]) for r in train] == [(1, 5.0), (2, 4.0), (3, 3.5), (4, 3.0)]
    assert [r["val_loss"] for r in evals] == [4.5]
    assert read_timelines(tmp_path) == (train, evals)  # the model directory or the file
    assert len(read_metrics(tmp_path)) == len(lines)  # every record, in file order


def test_read_metrics_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TalmError, match="not found"):
        read_timelines(tmp_path / "metrics.jsonl")
    assert read_metrics(tmp_path) == []  # the trainer's view: no metrics yet


def test_what_the_writer_writes_the_reader_reads(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, [])
    for r in RECORDS:
        log.log(r)
    log.close()
    assert read_metrics(tmp_path) == RECORDS
    with pytest.raises(ValueError, match="not a metrics.jsonl record"):  # a bug in the writer, not user input
        MetricsLog(tmp_path, []).log({"step": 3, "tokens": 1, "time": 1.0, "train_loss": "abc"})
    assert read_metrics(tmp_path) == RECORDS


GOOD_LINE = json.dumps({"step": 1, "tokens": 10, "time": 0.1, "train_loss": 5.0})
BAD_METRICS = [
    (b"\x89\xfe\x00garbage\xff" * 50 + b"\n", "line 1 .* is not UTF-8 text: expected a JSON object"),
    (bytes(range(256)) * 4, "line 1 .* is not JSON"),  # its first line, up to byte 10, is ASCII
    ((GOOD_LINE + "\nnot json at all\n" + GOOD_LINE + "\n").encode(), "line 2 .* is not JSON"),
    (b'{"step": 1, "tokens": 10, "train_loss": "abc"}\n', 'line 1 .*"train_loss" is "abc", not a number'),
    (b'{"step": [1], "tokens": 10, "train_loss": 5.0}\n', 'line 1 .*"step" is \\[1\\], not an integer'),
    (b'{"step": true, "train_loss": 5.0}\n', '"step" is true, not an integer'),
    (b'{"step": 1.5, "train_loss": 5.0}\n', '"step" is 1.5, not an integer'),
    (b'{"step": 1, "lr": null, "train_loss": 5.0}\n', '"lr" is null, not a number'),
    (b'{"epoch": 1, "loss": 2.5}\n', r'line 1 .*\(no "step"\): expected a JSON object with "step"'),
    (
        (GOOD_LINE + '\n{"step": 2, "accuracy": 0.5}\n').encode(),
        'line 2 .*neither "train_loss" nor "val_loss"',
    ),
    (b"[1, 2, 3]\n", "a JSON list, not an object"),
]


@pytest.mark.parametrize(("data", "match"), BAD_METRICS)
def test_a_file_that_is_not_metrics_is_refused_naming_the_line_and_what_was_expected(
    tmp_path: Path, data: bytes, match: str
) -> None:
    (tmp_path / "metrics.jsonl").write_bytes(data)
    with pytest.raises(TalmError, match=match) as info:
        read_timelines(tmp_path)
    assert "metrics.jsonl" in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ pictures


def test_plot_model_writes_loss_png(tmp_path: Path) -> None:
    run = tmp_path / "models" / "a"
    write_metrics(run)
    out = plot_model(run)
    assert out == run / "loss.png" and is_png(out)
    assert sorted(p.name for p in run.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temporary file left


def test_plot_before_any_evaluation_and_with_other_x_axes(tmp_path: Path) -> None:
    run = tmp_path / "models" / "a"
    write_metrics(run, steps=10, eval_every=100)
    for x in ("tokens", "step", "time"):
        assert is_png(plot_runs([("a", run)], tmp_path / f"{x}.png", x=x))
    with pytest.raises(TalmError, match="unknown x axis"):
        plot_runs([("a", run)], tmp_path / "x.png", x="epochs")


def test_plot_of_a_run_without_records(tmp_path: Path) -> None:
    for data in ("", "\n\n", '{"step": 1, "tok'):  # empty, blank, only a line torn by a crash
        (tmp_path / "metrics.jsonl").write_text(data)
        with pytest.raises(TalmError, match="holds no metrics yet"):
            plot_runs([("a", tmp_path)], tmp_path / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_metrics(tmp_path)
    hide_module(monkeypatch, "matplotlib")
    with pytest.raises(TalmError, match=r"pip install 'talm\[plot\]'"):
        plot_model(tmp_path)
    assert not (tmp_path / "loss.png").exists()


def test_plot_metrics_cli_compares_runs(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_metrics(in_tmp / "models" / "a")
    write_metrics(in_tmp / "models" / "b", scale=1.5)
    plot_metrics_main(["models/a", "models/b/metrics.jsonl", "-o", "charts/compare.png"])
    assert is_png(in_tmp / "charts" / "compare.png")
    assert "wrote charts/compare.png" in capsys.readouterr().err
    plot_metrics_main(["models/a", "models/b"])  # several runs: compare.png here by default
    assert is_png(in_tmp / "compare.png")
    plot_metrics_main(["models/a"])  # one run: its loss.png
    assert is_png(in_tmp / "models" / "a" / "loss.png")


def test_plot_metrics_cli_bad_input(in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    with pytest.raises(SystemExit) as exit_info:
        plot_metrics_main(["models/nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not found" in err and len(err.strip().splitlines()) == 1
    write_metrics(in_tmp / "models" / "a")
    hide_module(monkeypatch, "matplotlib")
    with pytest.raises(SystemExit):
        plot_metrics_main(["models/a"])
    assert "pip install 'talm[plot]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ sinks


def test_make_sinks_draws_the_plot_at_every_evaluation(tmp_path: Path) -> None:
    sinks = make_sinks([], tmp_path, {})
    assert [type(s) for s in sinks] == [PlotSink]
    write_metrics(tmp_path)
    for s in sinks:
        s.log({"step": 1, "tokens": 1, "train_loss": 1.0})
        s.on_eval(tmp_path)
        s.close()
    assert is_png(tmp_path / "loss.png")


def test_a_plot_failure_never_stops_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sink = PlotSink(tmp_path)
    sink.on_eval(tmp_path)  # no metrics.jsonl yet
    sink.on_eval(tmp_path)
    err = capsys.readouterr().err
    assert err.count("warning: could not draw") == 1


def test_make_sinks_without_matplotlib(tmp_path: Path, monkeypatch, capsys) -> None:
    hide_module(monkeypatch, "matplotlib")
    assert make_sinks([], tmp_path, {}) == []
    assert "pip install 'talm[plot]'" in capsys.readouterr().err


def test_make_sinks_bad_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the trackers' names are checked in one place, the config, before a run touches anything
    with pytest.raises(TalmError, match=r"report_to.*'mlflow'.*'tensorboard' or 'wandb'"):
        validate(RunConfig, {"train": {"report_to": ["mlflow"]}})
    hide_module(monkeypatch, "torch.utils.tensorboard")
    hide_module(monkeypatch, "tensorboard")
    with pytest.raises(TalmError, match=r"pip install 'talm\[tensorboard\]'"):
        make_sinks(["tensorboard"], tmp_path, {})
    hide_module(monkeypatch, "wandb")
    with pytest.raises(TalmError, match=r"pip install 'talm\[wandb\]'"):
        make_sinks(["wandb"], tmp_path, {})


RECORDS = [
    {"step": 1, "tokens": 4096, "time": 0.5, "train_loss": 6.0, "lr": 1e-4, "tokens_per_s": 8192.0},
    {"step": 2, "tokens": 8192, "time": 1.0, "train_loss": 5.0, "lr": 2e-4, "tokens_per_s": 8192.0},
    {"step": 2, "tokens": 8192, "time": 1.2, "val_loss": 5.5, "val_ppl": math.exp(5.5), "val_bpb": 2.5},
]


def test_tensorboard_sink_logs_scalars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writers = []

    class SummaryWriter:
        def __init__(self, log_dir: str) -> None:
            self.log_dir, self.scalars, self.texts, self.closed = log_dir, [], [], False
            writers.append(self)

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            self.scalars.append((tag, value, global_step))

        def add_text(self, tag: str, text: str) -> None:
            self.texts.append(tag)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    sinks = make_sinks(["tensorboard"], tmp_path, {"model": {"n_layer": 2}})
    tb = next(s for s in sinks if isinstance(s, TensorBoardSink))
    for r in RECORDS:
        tb.log(r)
    tb.on_eval(tmp_path)
    tb.close()
    (w,) = writers
    assert w.log_dir == str(tmp_path / "tensorboard") and w.texts == ["config"] and w.closed
    assert ("train/loss", 6.0, 1) in w.scalars and ("train/lr", 2e-4, 2) in w.scalars
    assert ("val/loss", 5.5, 2) in w.scalars and ("val/bpb", 2.5, 2) in w.scalars
    assert not any(tag.startswith("val/") for tag, _, step in w.scalars if step == 1)


def test_wandb_sink_logs_scalars_and_resumes_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inits, logged, finished = [], [], []

    class Run:
        def log(self, data: dict, step: int) -> None:
            logged.append((step, data))

        def finish(self) -> None:
            finished.append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    model_dir = tmp_path / "models" / "run1"
    model_dir.mkdir(parents=True)
    config = {"train": {"lr": 1e-3}}
    sink = next(s for s in make_sinks(["wandb"], model_dir, config) if isinstance(s, WandbSink))
    for r in RECORDS:
        sink.log(r)
    sink.close()
    assert inits[0]["project"] == "talm" and inits[0]["name"] == "run1" and inits[0]["config"] == config
    assert logged[0] == (
        1,
        {"train/loss": 6.0, "train/lr": 1e-4, "train/tokens_per_s": 8192.0, "train/tokens": 4096.0},
    )
    assert logged[2][1]["val/bpb"] == 2.5 and finished == [True]
    make_sinks(["wandb"], model_dir, config)  # the run resumed: the same W&B run id
    assert inits[1]["id"] == inits[0]["id"] and inits[1]["resume"] == "allow"


def test_a_full_disk_while_appending_metrics_is_one_line(tmp_path: Path) -> None:
    import errno

    class FullDisk:
        def write(self, _: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None: ...

        def close(self) -> None: ...

    log = MetricsLog(tmp_path, [])
    log.log({"step": 1, "tokens": 1, "time": 1.0, "train_loss": 2.0, "lr": 0.1, "tokens_per_s": 5.0})
    log._file = FullDisk()
    with pytest.raises(TalmError, match="No space left on device.*free disk space, then rerun"):
        log.log({"step": 2, "tokens": 2, "time": 2.0, "train_loss": 1.5, "lr": 0.1, "tokens_per_s": 5.0})
    assert len(read_metrics(tmp_path)) == 1


def test_samples_go_to_tensorboard_as_text_and_to_wandb_as_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts, logged = [], []

    class SummaryWriter:
        def __init__(self, log_dir: str) -> None:
            pass

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            pass

        def add_text(self, tag: str, text: str, global_step: int | None = None) -> None:
            texts.append((tag, text, global_step))

    class Table:
        def __init__(self, columns: list[str], data: list[list[str]]) -> None:
            self.columns, self.data = columns, data

    class Run:
        def log(self, data: dict, step: int) -> None:
            logged.append((step, data))

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter)
    )
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run(), Table=Table))
    record = RECORDS[2] | {"samples": [{"prompt": "ROMEO:", "greedy": " I am", "sampled": " O thou"}]}
    for sink in make_sinks(["tensorboard", "wandb"], tmp_path, {}):
        sink.log(record)
    (tag, text, step), *_ = [t for t in texts if t[0] == "samples"]
    assert step == 2 and "'ROMEO:'" in text and "' I am'" in text and "' O thou'" in text
    table = logged[0][1]["samples"]
    assert table.columns == ["prompt", "greedy", "sampled"] and table.data == [["ROMEO:", " I am", " O thou"]]
