"""`models/NAME/metrics.jsonl`: the one definition of the format, used by its writer (`MetricsLog`, rank 0 of
`train_model`) and by every reader (`talm.train.plots`, `plot_metrics`, the loss-plot sink, tests).

One JSON object per line, appended as training goes:

    training lines    {"step", "tokens", "time", "train_loss", "lr", "tokens_per_s"[, "mfu"]}
    evaluation lines  {"step", "tokens", "time", "val_loss", "val_ppl", "val_bpb"}
                      (preference tuning, talm.train.dpo: {"step", "tokens", "time", "val_loss",
                      "val_chosen_reward", "val_rejected_reward", "val_reward_margin", "val_pref_accuracy"},
                      and its training lines add the same four as "train_chosen_reward", ...)
                      (+ "samples": [{"prompt", "greedy", "sampled"}] with --sample-every, talm.train.samples)
                      (+ "TASK/METRIC": a number per benchmark task, with --eval-tasks: talm.eval.runner)
                      another objective's evaluation has its own "val_*" numbers instead (GRPO: "val_pass@1")

"step" is an integer >= 0 and every other field a number ("val_bpb" may be null: a tokenizer without byte
counts). "mfu" (model FLOPs utilisation, 0..1) is there only on devices whose peak talm knows
(`talm.train.precision.GPU_PEAK_TFLOPS`). A reader needs "step" and one of "train_loss"/"val_loss"; the other fields, when present, must be
numbers; fields it does not know are ignored. A last line cut short by a crash mid-write (no newline at its
end) is skipped; any other line that is not such a record is refused with one line naming the file, the line
and what was expected. Every record also goes to the sinks of `talm.train.report` (loss plot, TensorBoard, W&B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

from talm.errors import TalmError
from talm.files import write_atomically


class Sink(Protocol):
    """Where records go besides metrics.jsonl (talm.train.report's loss plot, TensorBoard, W&B)."""

    def log(self, record: dict[str, Any]) -> None: ...
    def on_eval(self, model_dir: Path) -> None: ...
    def close(self) -> None: ...


FILE = "metrics.jsonl"
TRAIN_FIELDS = ("step", "tokens", "time", "train_loss", "lr", "tokens_per_s")
EVAL_FIELDS = ("step", "tokens", "time", "val_loss")
OPTIONAL = (
    "mfu",
    "val_ppl",
    "val_bpb",
)  # numbers where present (perplexity and bits/byte: language modelling)
NULLABLE = ("val_bpb",)
EXPECTED = (
    'a JSON object with "step" (an integer >= 0) and "train_loss" or "val_loss" (a number), its other fields ('
    + ", ".join(
        f
        for f in dict.fromkeys(TRAIN_FIELDS + EVAL_FIELDS + OPTIONAL)
        if f not in ("step", "train_loss", "val_loss")
    )
    + ") numbers too"
)


def metrics_path(run: str | Path) -> Path:
    """A run's metrics file: `run` is a model directory (models/NAME) or the metrics.jsonl itself."""
    run = Path(run)
    return run / FILE if run.is_dir() else run


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record: Any) -> str | None:
    """What makes `record` not a metrics record (None if it is one)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    step = record.get("step")
    if "step" not in record:
        return 'no "step"'
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f'"step" is {json.dumps(step)}, not an integer >= 0'
    if "train_loss" not in record and not is_eval(record):
        return 'neither "train_loss" nor "val_loss"'
    for field in dict.fromkeys(TRAIN_FIELDS + EVAL_FIELDS + OPTIONAL):
        if field in record and field != "step" and not _is_number(record[field]):
            if record[field] is None and field in NULLABLE:
                continue
            return f"{json.dumps(field)} is {json.dumps(record[field])[:40]}, not a number"
    return None


def is_eval(record: dict[str, Any]) -> bool:
    """An evaluation line: "val_loss", or another objective's numeric "val_*" metric (GRPO's "val_pass@1")."""
    return "val_loss" in record or any(k.startswith("val_") and _is_number(v) for k, v in record.items())


def check_record(record: dict[str, Any]) -> None:
    """The writer's side of the format: a record it is about to append must be one a reader accepts."""
    fields = TRAIN_FIELDS if "train_loss" in record else EVAL_FIELDS if "val_loss" in record else ("step",)
    problem = record_problem(record) or (
        f"missing {', '.join(f for f in fields if f not in record)}"
        if any(f not in record for f in fields)
        else None
    )
    if problem:
        raise ValueError(f"not a metrics.jsonl record ({problem}): {record!r}")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, in file order. Raises TalmError naming the line that is not a record
    (a torn last line is skipped) or the file if it is missing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TalmError(
            f"{str(path)!r} not found: pass a model directory that `train_model` has written metrics to "
            "(models/NAME) or the path of a metrics.jsonl"
        ) from None
    except OSError as err:
        raise TalmError(f"cannot read {str(path)!r} ({err.strerror or err}): pass a metrics.jsonl") from None
    lines = data.split(b"\n")
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        torn = number == len(lines) and raw.lstrip().startswith(b"{")  # the last line, without its newline
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if torn:
                continue
            what = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else "not JSON"
            raise TalmError(
                f"line {number} of {str(path)!r} is {what}: expected {EXPECTED}, one a line, as train_model "
                "writes them (is this a metrics.jsonl?)"
            ) from None
        problem = record_problem(record)
        if problem:
            raise TalmError(
                f"line {number} of {str(path)!r} is not a metrics record ({problem}): expected {EXPECTED}, as "
                "train_model writes them"
            )
        records.append(record)
    return records


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl (`run`: models/NAME or the file; empty if there is none)."""
    path = metrics_path(run)
    if not path.is_file():
        return []
    return read_records(path)


def timelines(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training records and the evaluation records, each in step order.

    A resumed run may log a step again (the steps after its last checkpoint are redone): the later record
    replaces the earlier ones, so each timeline is one run's history.
    """
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for record in records:
        timeline = evals if is_eval(record) else train
        while timeline and timeline[-1]["step"] >= record["step"]:
            timeline.pop()
        timeline.append(record)
    return train, evals


def read_timelines(run: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`timelines` of a run's metrics.jsonl (`run`: models/NAME or the file itself; missing: TalmError)."""
    return timelines(read_records(metrics_path(run)))


def finite_points(records: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    """(x, value) of every record whose `key` is a finite number (a diverged run logs NaN or inf)."""
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if _is_number(value) and math.isfinite(value) and _is_number(r.get(x)):
            xs.append(float(r[x]))
            ys.append(float(value))
    return xs, ys


def truncate_after(model_dir: str | Path, step: int) -> None:
    """Drop the records after `step` (written by a run that died after its last checkpoint), atomically.
    Lines that are not records (one cut short by a crash) go too."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")
    kept = []
    for raw in lines:
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if record_problem(record) is None and record["step"] <= step:
            kept.append(raw.decode("utf-8"))
    if len(kept) == len([raw for raw in lines if raw]) and data_ends_cleanly(lines):
        return
    write_atomically(path, lambda f: f.write("".join(line + "\n" for line in kept).encode("utf-8")))


def data_ends_cleanly(lines: list[bytes]) -> bool:
    """Whether the file ended with a newline (its split ends with an empty piece) or was empty."""
    return not lines or lines[-1] == b""


class MetricsLog:
    """Appends records to metrics.jsonl and hands them to the sinks. Does nothing on ranks other than 0."""

    def __init__(self, model_dir: Path, sinks: list[Sink], enabled: bool = True) -> None:
        self.model_dir = model_dir
        self.sinks = sinks if enabled else []
        self.enabled = enabled
        self._file = open(model_dir / FILE, "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._unseen = False  # records logged since the sinks' last on_eval

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        check_record(record)
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:  # disk full: the checkpoints so far are intact, a rerun resumes from them
            raise TalmError(
                f"cannot append to {str(self.model_dir / FILE)!r} ({err.strerror or err}): free disk space, then "
                "rerun the same command to resume from the last checkpoint"
            ) from None
        for sink in self.sinks:
            sink.log(record)
        self._unseen = True

    def on_eval(self) -> None:
        """After an evaluation (and at the end): sinks refresh what they draw from the records so far."""
        for sink in self.sinks:
            sink.on_eval(self.model_dir)
        self._unseen = False

    def close(self) -> None:
        if self._unseen:  # the run ended after its last evaluation (e.g. Ctrl-C): refresh once more
            self.on_eval()
        if self._file is not None:
            self._file.close()
            self._file = None
        for sink in self.sinks:
            sink.close()
