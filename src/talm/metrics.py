"""`models/NAME/metrics.jsonl`: one JSON object per line, appended as training goes, on rank 0 only.

Training lines: {"step", "tokens", "time", "train_loss", "lr", "tokens_per_s"}; evaluation lines: {"step",
"tokens", "time", "val_loss", "val_ppl", "val_bpb"}. Every record also goes to the sinks of `talm.report`
(loss plot, TensorBoard, W&B).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from talm.files import write_atomically
from talm.report import Sink

FILE = "metrics.jsonl"


def read_metrics(model_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a model's metrics.jsonl (empty if there is none)."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_after(model_dir: str | Path, step: int) -> None:
    """Drop the records after `step` (written by a run that died after its last checkpoint), atomically."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash
            continue
    if len(kept) == len(lines):
        return
    write_atomically(path, lambda f: f.write("".join(line + "\n" for line in kept).encode("utf-8")))


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
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
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
