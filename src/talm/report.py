"""Where training metrics go besides metrics.jsonl: the loss plot, TensorBoard, Weights & Biases.

The trainer builds the sinks once with `make_sinks` and hands each of them every metrics record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Sink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def on_eval(self, model_dir: Path) -> None: ...
    def close(self) -> None: ...


def make_sinks(report_to: list[str], model_dir: Path, run_config: dict[str, Any]) -> list[Sink]:
    """The sinks for one run (none yet: the plot, TensorBoard and W&B sinks come with their issue)."""
    return []
