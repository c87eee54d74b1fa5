"""Running tasks on a model: the results table, `models/NAME/evals/<step>.json`, and the task scores a training
run records in metrics.jsonl.

evals/<step>.json (written atomically, one per evaluated checkpoint step; `format` says which layout):

    {"format": "talm.evals/1", "step", "checkpoint", "tasks": {TASK: {"repo", "config", "split", "examples",
     "seconds", "metrics": {METRIC: value}, "random": baseline, "centered": {METRIC: score}}},
     "data": {"dir", "tokens", "val_loss", "val_bpb"} (with --data-dir)}

In metrics.jsonl a task's headline metric is the evaluation line's field `TASK/METRIC` (`hellaswag/acc_norm`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from talm.errors import TalmError
from talm.eval.generative import pass_at_1
from talm.eval.scoring import TokenRequest, choice_metrics, encode_examples, last_word_metrics, score_tokens
from talm.eval.tasks import TASKS, Example, get_task, load_examples
from talm.files import write_atomically
from talm.tokenizer.api import Tokenizer

FORMAT = "talm.evals/1"
EVALS_DIR = "evals"


@dataclass
class TaskResult:
    """One task's numbers: metric -> value, the random-guessing baseline, and how many examples in how long."""

    task: str
    metrics: dict[str, float]
    random: float
    examples: int
    seconds: float
    centered: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        t = get_task(self.task)
        return {
            "repo": t.repo,
            "config": t.config,
            "split": t.split,
            "examples": self.examples,
            "seconds": round(self.seconds, 3),
            "metrics": self.metrics,
            "random": self.random,
            "centered": self.centered,
        }


@dataclass
class PreparedTask:
    """A task read and tokenized once: its examples and their token requests (for repeated scoring in training);
    a generative task's chat prompts instead, with the tokenizer that decodes the replies."""

    name: str
    examples: list[Example]
    requests: list[TokenRequest]
    prompts: list[list[int]] = field(default_factory=list)
    tokenizer: Tokenizer | None = None
    max_new_tokens: int = 256


def prepare(
    tokenizer: Tokenizer,
    name: str,
    *,
    tasks_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    flag: str = "--tasks-dir",
    max_new_tokens: int = 256,
) -> PreparedTask:
    """Task `name` read (every row checked) and tokenized; `flag` is the asking command's tasks-directory option;
    a generative task's replies are at most `max_new_tokens` long."""
    task = get_task(name)
    examples = load_examples(task.name, tasks_dir=tasks_dir, limit=limit, flag=flag)
    if not examples:
        raise TalmError(
            f"{task.name} has no examples in its {task.split!r} split: use a complete copy of {task.repo}"
        )
    if task.kind == "generative":
        from talm.tokenizer.chat import ChatFormat

        chat = ChatFormat(tokenizer)
        prompts = [chat.render_prompt([{"role": "user", "content": e.requests[0][0]}]) for e in examples]
        return PreparedTask(task.name, examples, [], prompts, tokenizer, max_new_tokens)
    return PreparedTask(task.name, examples, encode_examples(tokenizer, examples))


def score(
    model: torch.nn.Module,
    prepared: PreparedTask,
    *,
    batch_size: int = 32,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    progress: bool = False,
) -> TaskResult:
    """Score one prepared task on `model`."""
    start = time.perf_counter()
    if prepared.tokenizer is not None:  # generative: the greedy replies checked (talm.eval.generative)
        acc = pass_at_1(
            model, prepared.tokenizer, prepared.prompts, [e.choices[e.gold] for e in prepared.examples],
            max_new_tokens=prepared.max_new_tokens, batch_size=batch_size, autocast=autocast,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        return TaskResult(prepared.name, {"acc": acc}, 0.0, len(prepared.examples), seconds, {"acc": acc})
    scores = score_tokens(
        model,
        prepared.requests,
        batch_size=batch_size,
        autocast=autocast,
        progress=prepared.name if progress else None,
    )
    task = get_task(prepared.name)
    values = choice_metrics(prepared.examples, scores) if task.kind == "choice" else last_word_metrics(scores)
    random = values.pop("random")
    metrics = {m: values[m] for m in task.metrics}
    centered = {m: (v - random) / (1.0 - random) for m, v in metrics.items() if m.startswith("acc")}
    return TaskResult(
        task.name, metrics, random, len(prepared.examples), time.perf_counter() - start, centered
    )


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    names: Sequence[str],
    *,
    tasks_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    progress: bool = True,
) -> list[TaskResult]:
    """Read (all first, so a missing task fails before any scoring) and score each task."""
    prepared = [prepare(tokenizer, n, tasks_dir=tasks_dir, limit=limit) for n in dict.fromkeys(names)]
    return [score(model, p, batch_size=batch_size, autocast=autocast, progress=progress) for p in prepared]


def format_table(results: Sequence[TaskResult]) -> str:
    """task | metric | value | random | centered | examples, one line per metric."""
    lines = [f"{'task':<16}{'metric':<10}{'value':>10}{'random':>10}{'centered':>10}{'examples':>10}"]
    for r in results:
        for metric, value in r.metrics.items():
            rand = f"{r.random:.4f}" if metric.startswith("acc") else "-"
            cent = f"{r.centered[metric]:.4f}" if metric in r.centered else "-"
            shown = f"{value:.4f}" if metric.startswith("acc") else f"{value:.4g}"
            lines.append(f"{r.task:<16}{metric:<10}{shown:>10}{rand:>10}{cent:>10}{r.examples:>10,}")
    return "\n".join(lines)


def results_path(model_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(model_dir) / EVALS_DIR / f"{step}.json"


def write_results(
    model_dir: str | os.PathLike[str],
    step: int,
    results: Sequence[TaskResult],
    *,
    checkpoint: str = "",
    data: dict[str, Any] | None = None,
) -> Path:
    """Write (atomically) models/NAME/evals/<step>.json; tasks evaluated before at this step and not now are kept."""
    path = results_path(model_dir, step)
    previous = read_results(path) if path.is_file() else {}
    payload = {
        "format": FORMAT,
        "step": step,
        "checkpoint": checkpoint,
        "tasks": {**previous.get("tasks", {}), **{r.task: r.to_json() for r in results}},
    }
    if data is not None or "data" in previous:
        payload["data"] = data if data is not None else previous["data"]
    path.parent.mkdir(parents=True, exist_ok=True)
    body = (json.dumps(payload, indent=2) + "\n").encode()
    write_atomically(path, lambda f: f.write(body))
    return path


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An evals/<step>.json, checked to be talm's format."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TalmError(f"cannot read {str(path)!r} ({err}): move it away and evaluate again") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TalmError(f"{str(path)!r} is not a talm evals file ({FORMAT}): move it away and evaluate again")
    return payload


def record_key(task: str, metric: str) -> str:
    """The metrics.jsonl field of a task's metric: `hellaswag/acc_norm`."""
    return f"{task}/{metric}"


def is_task_field(key: str) -> bool:
    """Whether a metrics.jsonl field is a task score (`TASK/METRIC`)."""
    task, _, metric = key.partition("/")
    return bool(metric) and task in TASKS


class TrainingTasks:
    """The tasks a training run scores every `every` steps on the first `limit` examples (read and tokenized once,
    when the run is set up, so a missing task fails before training starts)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        names: Sequence[str],
        *,
        every: int | None,
        limit: int,
        tasks_dir: str | None,
        batch_size: int,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.tasks = [
            prepare(tokenizer, n, tasks_dir=tasks_dir, limit=limit, flag="--eval-tasks-dir")
            for n in dict.fromkeys(names)
        ]
        self.every, self.batch_size, self.autocast = every, batch_size, autocast
        self.last_step: int | None = None

    @classmethod
    def of_run(
        cls, tokenizer: Tokenizer, train: Any, autocast: Callable[[], AbstractContextManager]
    ) -> TrainingTasks:
        """The tasks of a run's train config (`talm.train.config.TrainConfig`: eval_tasks, eval_tasks_every,
        eval_tasks_limit, eval_tasks_dir; its batch_size), scored under the run's autocast."""
        return cls(
            tokenizer,
            train.eval_tasks,
            every=train.eval_tasks_every,
            limit=train.eval_tasks_limit,
            tasks_dir=train.eval_tasks_dir,
            batch_size=train.batch_size,
            autocast=autocast,
        )

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """metrics.jsonl fields of each task's headline metric, when a multiple of `every` steps was reached since
        the last time (every evaluation if `every` is None); else nothing."""
        if not self.tasks:
            return {}
        due = (
            self.every is None or self.last_step is None or step // self.every > self.last_step // self.every
        )
        if not due:
            return {}
        self.last_step = step
        fields = {}
        for prepared in self.tasks:
            result = score(model, prepared, batch_size=self.batch_size, autocast=self.autocast)
            metric = get_task(prepared.name).metrics[0]
            fields[record_key(prepared.name, metric)] = round(result.metrics[metric], 6)
        return fields
