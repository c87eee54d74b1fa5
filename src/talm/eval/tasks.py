"""The benchmark tasks: where each lives on the Hub, its columns, and how a row becomes scoring requests.

Each task is read with `datasets.load_dataset` from its real repository, config and split (the ones
lm-evaluation-harness 0.4 uses: its task yamls name them), or from a local copy laid out like that repository
(`tasks_dir/OWNER/NAME/`, e.g. a `huggingface-cli download --repo-type dataset` of it). A row becomes the same
(context, continuation) strings the harness builds, so the two score the same text:

- multiple choice (hellaswag, arc_easy, arc_challenge, piqa): one context, one continuation per choice (" " +
  the choice); winogrande: "partial scoring", one context per option (the sentence up to the blank, with the
  option in it) and one shared continuation (the rest of the sentence).
- lambada_openai: the passage without its last word as context, " " + that word as the continuation.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from talm.data.streaming import hub_unreachable
from talm.errors import TalmError


@dataclass(frozen=True)
class Example:
    """One scored item: a (context, continuation) request per choice and the index of the right one.

    `choices` are the choice texts whose character lengths normalise acc_norm (as the harness: the choice
    without the space before it). A LAMBADA item has one request and gold 0.
    """

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    """A benchmark: its Hub repository, config and split, the columns it reads, and how a row becomes an Example."""

    name: str
    repo: str
    config: str | None
    split: str
    columns: tuple[str, ...]
    build: Callable[[dict[str, Any]], Example]
    metrics: tuple[str, ...]  # what the runner reports, the first one being the task's headline number
    kind: str = "choice"  # "choice" (multiple choice) or "last_word" (LAMBADA)


def _hellaswag_text(text: str) -> str:
    """HellaSwag's cleanup in the harness: WikiHow's "[title]" marks become sentence ends, other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> Example:
    # str.capitalize also lowercases the rest of ctx_b: the harness does exactly this, so we do too.
    context = _hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    endings = tuple(_hellaswag_text(e) for e in row["endings"])
    return Example(tuple((context, " " + e) for e in endings), endings, int(row["label"]))


def _arc(row: dict[str, Any]) -> Example:
    texts, labels = tuple(row["choices"]["text"]), list(row["choices"]["label"])
    context = f"Question: {row['question']}\nAnswer:"
    return Example(tuple((context, " " + t) for t in texts), texts, labels.index(row["answerKey"]))


def _piqa(row: dict[str, Any]) -> Example:
    texts = (row["sol1"], row["sol2"])
    context = f"Question: {row['goal']}\nAnswer:"
    return Example(tuple((context, " " + t) for t in texts), texts, int(row["label"]))


def _winogrande(row: dict[str, Any]) -> Example:
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in (row["option1"], row["option2"]))
    rest = " " + sentence[blank + 1 :].strip()
    return Example(tuple((c, rest) for c in contexts), contexts, int(row["answer"]) - 1)


def _lambada(row: dict[str, Any]) -> Example:
    words = row["text"].split(" ")
    return Example(((" ".join(words[:-1]), " " + words[-1]),), (words[-1],), 0)


ARC_COLUMNS = ("question", "choices", "answerKey")
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "hellaswag",
            "Rowan/hellaswag",
            None,
            "validation",
            ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
            _hellaswag,
            ("acc_norm", "acc"),
        ),
        Task("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", ARC_COLUMNS, _arc, ("acc", "acc_norm")),
        Task(
            "arc_challenge",
            "allenai/ai2_arc",
            "ARC-Challenge",
            "test",
            ARC_COLUMNS,
            _arc,
            ("acc_norm", "acc"),
        ),
        Task(
            "piqa",
            "baber/piqa",
            None,
            "validation",
            ("goal", "sol1", "sol2", "label"),
            _piqa,
            ("acc_norm", "acc"),
        ),
        Task(
            "winogrande",
            "allenai/winogrande",
            "winogrande_xl",
            "validation",
            ("sentence", "option1", "option2", "answer"),
            _winogrande,
            ("acc",),
        ),
        Task(
            "lambada_openai",
            "EleutherAI/lambada_openai",
            "default",
            "test",
            ("text",),
            _lambada,
            ("acc", "ppl"),
            kind="last_word",
        ),
    )
}
ALIASES = {"lambada": "lambada_openai", "arc_e": "arc_easy", "arc_c": "arc_challenge"}
TASK_NAMES = tuple(TASKS) + tuple(ALIASES)


def get_task(name: str) -> Task:
    """The task called `name` (or one of its short aliases)."""
    task = TASKS.get(ALIASES.get(name, name))
    if task is None:
        raise TalmError(f"unknown task {name!r}: pick from {', '.join(TASKS)}")
    return task


def local_copy(task: Task, tasks_dir: str | os.PathLike[str]) -> Path:
    """Where a local copy of the task's repository must be: `tasks_dir/OWNER/NAME`."""
    path = Path(tasks_dir) / task.repo
    if not path.is_dir():
        raise TalmError(
            f"no local copy of {task.name} at {str(path)!r}: download the dataset repository {task.repo} there "
            f"(huggingface-cli download --repo-type dataset {task.repo} --local-dir {path}) or drop --tasks-dir"
        )
    return path


def load_examples(
    name: str, *, tasks_dir: str | os.PathLike[str] | None = None, limit: int | None = None
) -> list[Example]:
    """The first `limit` (all if None) examples of task `name`, from the Hub or from `tasks_dir`'s local copy."""
    import datasets  # slow to import: only when a task is read
    from huggingface_hub.utils import logging as hub_logging

    # the libraries' own warnings (a retried request, a progress bar) would come before talm's one-line error
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    hub_logging.set_verbosity_error()
    task = get_task(name)
    source = str(local_copy(task, tasks_dir)) if tasks_dir is not None else task.repo
    # in seconds, where datasets would retry for half a minute or more
    unreachable = hub_unreachable(task.repo) if tasks_dir is None else None
    try:
        if unreachable is not None:
            raise ConnectionError(f"unreachable: {unreachable}")
        if tasks_dir is None:
            rows = datasets.load_dataset(source, name=task.config, split=task.split)
        else:
            # A local copy is read into memory with a cache of its own: datasets' cache names a local folder by
            # its name and config only, so another copy of that name (or this one, changed) would be read with
            # the first one's columns.
            with tempfile.TemporaryDirectory(prefix="talm-task-") as cache:
                rows = datasets.load_dataset(
                    source, name=task.config, split=task.split, cache_dir=cache, keep_in_memory=True
                )
    except (OSError, datasets.exceptions.DatasetNotFoundError) as err:
        where = f"the local copy {source!r}" if tasks_dir is not None else f"the Hub ({task.repo})"
        raise TalmError(
            f"cannot read {task.name} from {where} ({type(err).__name__}{': ' + str(err) if unreachable else ''}): "
            "download the dataset repository "
            f"{task.repo} into DIR/{task.repo} and pass --tasks-dir DIR, or set HF_DATASETS_OFFLINE=1 to use a "
            "copy already in the Hugging Face cache"
        ) from None
    except ValueError as err:  # a config or split the copy does not have
        raise TalmError(
            f"{source!r} has no {task.config or 'default'} config with a {task.split!r} split ({err}): "
            f"use a copy of {task.repo} laid out as on the Hub"
        ) from None
    missing = [c for c in task.columns if c not in rows.column_names]
    if missing:
        raise TalmError(
            f"{task.name} from {source!r} lacks the column(s) {', '.join(missing)} (it has "
            f"{', '.join(rows.column_names)}): use a copy of {task.repo} with its real columns"
        )
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return [task.build(row) for row in rows.select_columns(list(task.columns))]
