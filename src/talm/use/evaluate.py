"""`evaluate` as a function: a trained model directory -> benchmark scores, bits per byte on a data directory, and
`models/NAME/evals/<step>.json`.

The tasks are scored by `talm.eval`; bits per byte reuses training's validation code (`talm.train.evaluate` on a
`talm.train.loader.EvalSlice`), so `--data-dir` measures exactly what a run's val_bpb measures.
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
from talm.train.dist import DistContext
from talm.train.evaluate import evaluate
from talm.train.loader import EvalSlice
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
    model: torch.nn.Module, tokenizer: Any, data_dir: str, tokens: int, batch_size: int, precision: Precision
) -> dict[str, Any]:
    """Val loss and bits per byte of `model` on the first `tokens` tokens of `data_dir`'s val split."""
    from talm.data.manifest import read_data

    data = read_data(data_dir, splits=("val",))
    if data.tokenizer.get("fingerprint") not in (None, tokenizer.fingerprint):
        raise TalmError(
            f"{data_dir!r} was made with another tokenizer than the model's: prepare the data with the model's "
            "tokenizer (models/NAME/tokenizer.json)"
        )
    device = next(model.parameters()).device
    val = EvalSlice(
        data,
        eval_tokens=tokens,
        context_length=model.config.context_length,
        batch_size=batch_size,
        device=device,
        vocab_size=tokenizer.vocab_size,
    )
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    val_loss, bpb = evaluate(model, val, ctx, precision.autocast)
    model.eval()  # evaluate leaves the model in train mode (what training wants)
    return {"dir": str(data_dir), "tokens": val.tokens, "val_loss": val_loss, "val_bpb": bpb}


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
    model, tokenizer, meta = load_checkpoint(model_dir, checkpoint, device)
    step = int(meta.get("step", 0))
    # where the results go, checked now rather than after minutes of scoring
    check_writable_dir(
        checkpoint_dir.parent, instead="evaluate a copy of the model directory you can write to"
    )
    if results_path(checkpoint_dir.parent, step).is_file():
        read_results(results_path(checkpoint_dir.parent, step))  # a damaged one is refused before any work
    precision = Precision(dtype, next(model.parameters()).device)
    tasks = [
        prepare(tokenizer, n, tasks_dir=config.tasks_dir, limit=config.limit)
        for n in dict.fromkeys(config.tasks)
    ]
    data = None
    if config.data_dir is not None:
        data = data_scores(
            model, tokenizer, config.data_dir, config.data_tokens, config.batch_size, precision
        )
    results = [
        score(model, p, batch_size=config.batch_size, autocast=precision.autocast, progress=progress)
        for p in tasks
    ]
    path = write_results(checkpoint_dir.parent, step, results, checkpoint=str(checkpoint_dir), data=data)
    return Evaluation(step, results, data, path, time.perf_counter() - start)
