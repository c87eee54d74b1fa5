"""Where training metrics go besides metrics.jsonl: the loss plot, TensorBoard, Weights & Biases.

The trainer (rank 0) builds the sinks once with `make_sinks`, hands each of them every record it appends to
metrics.jsonl (`log`), calls `on_eval` after each evaluation and at the end, and `close` when the run ends.

- `PlotSink` (always on when matplotlib is installed) redraws models/NAME/loss.png from metrics.jsonl at every
  evaluation, so the picture also covers the part of a resumed run done before the resume.
- `TensorBoardSink` (`--report-to tensorboard`) writes event files to models/NAME/tensorboard/
  (`tensorboard --logdir models`).
- `WandbSink` (`--report-to wandb`) logs to the W&B project $WANDB_PROJECT (default "talm"), one run per
  model directory: a resumed training run continues the same W&B run.

TensorBoard and W&B are optional extras; asking for one that is not installed is a one-line error naming the
package to install.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from talm.errors import TalmError
from talm.train import plots
from talm.train.metrics import Sink

# metrics.jsonl key -> scalar name in TensorBoard / W&B
SCALARS = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "tokens_per_s": "train/tokens_per_s",
    "tokens": "train/tokens",
    "val_loss": "val/loss",
    "val_ppl": "val/ppl",
    "val_bpb": "val/bpb",
}


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {
        name: float(record[key]) for key, name in SCALARS.items() if isinstance(record.get(key), (int, float))
    }


class PlotSink:
    """Redraws loss.png in the model directory at every evaluation. A plotting failure is reported once and
    never stops training."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.warned = False

    def log(self, record: dict[str, Any]) -> None:
        pass  # the plot is drawn from metrics.jsonl, the record of the whole run

    def on_eval(self, model_dir: Path) -> None:
        try:
            plots.plot_model(model_dir)
        except Exception as err:  # a picture is never worth losing a training run
            if not self.warned:
                print(f"warning: could not draw {Path(model_dir) / 'loss.png'}: {err}", file=sys.stderr)
                self.warned = True

    def close(self) -> None:
        pass


def samples_markdown(samples: list[dict[str, str]]) -> str:
    """--sample-every's samples of one evaluation as Markdown (TensorBoard's text panel)."""
    return "\n\n".join(
        f"**{s['prompt']!r}**\n\n- greedy: `{s['greedy']!r}`\n- sampled: `{s['sampled']!r}`" for s in samples
    )


class TensorBoardSink:
    """Scalars to TensorBoard event files in models/NAME/tensorboard/, against the optimizer step."""

    def __init__(self, model_dir: Path, run_config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TalmError(
                "--report-to tensorboard needs the tensorboard package, which is not installed: "
                "pip install 'talm[tensorboard]' (or leave out --report-to tensorboard)"
            ) from None
        self.writer = SummaryWriter(log_dir=str(Path(model_dir) / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(run_config, indent=2, default=str) + "\n```")

    def log(self, record: dict[str, Any]) -> None:
        for name, value in _scalars(record).items():
            self.writer.add_scalar(name, value, global_step=int(record["step"]))
        if record.get("samples"):  # --sample-every's continuations, as a text panel
            self.writer.add_text(
                "samples", samples_markdown(record["samples"]), global_step=int(record["step"])
            )

    def on_eval(self, model_dir: Path) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars to Weights & Biases. The run id is kept in models/NAME/wandb_run_id so that resuming the
    training resumes the W&B run."""

    def __init__(self, model_dir: Path, run_config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise TalmError(
                "--report-to wandb needs the wandb package, which is not installed: "
                "pip install 'talm[wandb]' (or leave out --report-to wandb)"
            ) from None
        model_dir = Path(model_dir)
        id_file = model_dir / "wandb_run_id"
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(8)
            model_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n", encoding="utf-8")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "talm"),
            name=model_dir.name,
            id=run_id,
            resume="allow",
            config=run_config,
            dir=str(model_dir),
        )

    def log(self, record: dict[str, Any]) -> None:
        values: dict[str, Any] = dict(_scalars(record))
        if record.get("samples"):  # --sample-every's continuations, as a table
            import wandb

            rows = [[s["prompt"], s["greedy"], s["sampled"]] for s in record["samples"]]
            values["samples"] = wandb.Table(columns=["prompt", "greedy", "sampled"], data=rows)
        self.run.log(values, step=int(record["step"]))

    def on_eval(self, model_dir: Path) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


def make_sinks(report_to: list[str], model_dir: Path, run_config: dict[str, Any]) -> list[Sink]:
    """The sinks for one run: the loss plot (when matplotlib is installed) plus those in `report_to`, a list
    TrainConfig.report_to has already checked (the one place that knows the trackers' names)."""
    sinks: list[Sink] = []
    if "tensorboard" in report_to:
        sinks.append(TensorBoardSink(model_dir, run_config))
    if "wandb" in report_to:
        sinks.append(WandbSink(model_dir, run_config))
    if plots.matplotlib_available():
        sinks.append(PlotSink(model_dir))
    else:
        print(
            "note: loss.png will not be drawn: matplotlib is not installed (pip install 'talm[plot]')",
            file=sys.stderr,
        )
    return sinks
