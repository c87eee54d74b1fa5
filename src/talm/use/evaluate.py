"""`evaluate` as a function: a trained model directory -> benchmark scores, bits per byte on a data directory, and
`models/NAME/evals/<step>.json`.

The tasks are scored by `talm.eval`; `--data-dir` reuses training's validation code (`talm.train.evaluate`: the
slice `val_slice` picks with the run's recorded settings, then `evaluate`), so on the run's own data it gives the
run's val_loss and val_bpb: over the learned (assistant) tokens of conversation data, all tokens of text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from talm.errors import TalmError
from talm.eval.config import EvalConfig
from talm.eval.runner import TaskResult, prepare, read_results, results_path, score, write_results
from talm.files import check_writable_dir
from talm.train.checkpoint import resolve_checkpoint
from talm.train.config import TrainConfig
from talm.train.dist import DistContext
from talm.train.evaluate import val_loss_and_bpb, val_slice
from talm.train.precision import Precision
from talm.use.load import load_checkpoint


@dataclass
class Evaluation:
    step: int
    results: list[TaskResult]
    data: dict[str, Any] | None
    path: Path
    seconds: float


def data_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    data_dir: str,
    run: dict[str, Any],
    precision: Precision,
    tokens: int | None = None,
) -> dict[str, Any]:
    """Val loss and bits per byte of `model` on `data_dir`'s val split, measured as the run whose recorded config
    is `run` measured its val_loss (its eval_tokens unless `tokens`, batch size, conversation isolation)."""
    from talm.data.manifest import read_data

    data = read_data(data_dir, splits=("val",))
    if data.tokenizer.get("fingerprint") not in (None, tokenizer.fingerprint):
        raise TalmError(
            f"{data_dir!r} was made with another tokenizer than the model's: prepare the data with the model's "
            "tokenizer (models/NAME/tokenizer.json)"
        )
    device = next(model.parameters()).device
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    val = val_slice(
        data, run_train_config(run), model.config.context_length, ctx, vocab_size=model.config.vocab_size,
        eval_tokens=tokens,
    )  # fmt: skip
    assert val is not None  # read_data refused a val split without tokens
    val_loss, bpb = val_loss_and_bpb(model, val, ctx, precision.autocast)
    model.eval()  # evaluate leaves the model in train mode (what training wants)
    return {"dir": str(data_dir), "tokens": val.tokens, "val_loss": val_loss, "val_bpb": bpb}


def run_train_config(run: dict[str, Any]) -> TrainConfig:
    """The validation settings of the run's recorded config (checkpoint.json's config.train); defaults for any it
    lacks."""
    recorded = run.get("train") if isinstance(run.get("train"), dict) else {}
    fields = ("eval_tokens", "batch_size", "isolate_conversations")
    try:
        return TrainConfig.model_validate({k: recorded[k] for k in fields if k in recorded})
    except ValueError:  # a hand-edited checkpoint.json: the defaults, as a run without those settings
        return TrainConfig()


def evaluate_model(
    model_dir: str | Path,
    config: EvalConfig,
    *,
    checkpoint: str = "latest",
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> Evaluation:
    """Score a trained model on `config.tasks` (and `config.data_dir`'s bits per byte); write evals/<step>.json
    beside its checkpoints. Every task is read before any scoring, so a missing one fails first."""
    if not config.tasks and config.data_dir is None:
        raise TalmError("nothing to evaluate: name --tasks (e.g. hellaswag) and/or a --data-dir")
    start = time.perf_counter()
    checkpoint_dir = resolve_checkpoint(model_dir, checkpoint)
    model, tokenizer, meta = load_checkpoint(model_dir, checkpoint, device, for_generation=True)
    step = int(meta.get("step", 0))
    # where the results go, checked now rather than after minutes of scoring
    check_writable_dir(
        checkpoint_dir.parent, instead="evaluate a copy of the model directory you can write to"
    )
    if results_path(checkpoint_dir.parent, step).is_file():
        read_results(results_path(checkpoint_dir.parent, step))  # a damaged one is refused before any work
    precision = Precision(dtype, next(model.parameters()).device)
    tasks = [
        prepare(
            tokenizer, n, tasks_dir=config.tasks_dir, limit=config.limit, max_new_tokens=config.max_new_tokens
        )
        for n in dict.fromkeys(config.tasks)
    ]
    data = None
    if config.data_dir is not None:
        run = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        data = data_scores(model, tokenizer, config.data_dir, run, precision, config.data_tokens)
    results = [
        score(model, p, batch_size=config.batch_size, autocast=precision.autocast, progress=progress)
        for p in tasks
    ]
    path = write_results(checkpoint_dir.parent, step, results, checkpoint=str(checkpoint_dir), data=data)
    return Evaluation(step, results, data, path, time.perf_counter() - start)
