"""The benchmark tasks: where each lives on the Hub, its columns, and how a row becomes scoring requests.

Each task is read with `datasets.load_dataset` from its real repository, config and split (the ones
lm-evaluation-harness 0.4 uses: its task yamls name them), or from a local copy laid out like that repository
(`tasks_dir/OWNER/NAME/`, e.g. an `hf download OWNER/NAME --repo-type dataset --local-dir DIR/OWNER/NAME` of it).
A local copy's data files (parquet or JSON lines) are found from its README's `configs:` block or datasets' file
naming, and read as data only: a loading script in the folder is never run. Every row is checked against its
task's schema (`Task.check`: the Hub's column types, a label in range, a non-empty list of choices) before any
scoring, so a damaged copy is refused with the file and row at fault instead of being scored. A row becomes the
same (context, continuation) strings the harness builds, so the two score the same text:

- multiple choice (hellaswag, arc_easy, arc_challenge, piqa): one context, one continuation per choice (" " +
  the choice); winogrande: "partial scoring", one context per option (the sentence up to the blank, with the
  option in it) and one shared continuation (the rest of the sentence).
- lambada_openai: the passage without its last word as context, " " + that word as the continuation.
- gsm8k (generative): the question is the prompt (a user turn of the chat format) and the reference answer
  (what follows "#### ") the one choice; the model's greedy reply is checked by talm.eval.generative.
"""

from __future__ import annotations

import os
import re
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
    check: Callable[[dict[str, Any]], str | None]  # what is wrong with a row (None: nothing), before `build`
    kind: str = "choice"  # "choice" (multiple choice), "last_word" (LAMBADA) or "generative" (GSM8K)


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


def _gsm8k(row: dict[str, Any]) -> Example:
    from talm.data.prompts import reference_answer

    return Example(((row["question"], ""),), (reference_answer(row["answer"]),), 0)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _not_text(row: dict[str, Any], *columns: str) -> str | None:
    """The first of `columns` whose value is not a string, said as a problem."""
    for c in columns:
        if not isinstance(row[c], str):
            return f"has {c} {_shown(row[c])}, not a string"
    return None


def _not_texts(row: dict[str, Any], column: str, value: Any) -> str | None:
    """A problem unless `value` is a non-empty list of strings (a string is not: its letters would be choices)."""
    if not isinstance(value, (list, tuple)) or not value:
        return f"has {column} {_shown(value)}, not a non-empty list of strings"
    if not all(isinstance(v, str) for v in value):
        return f"has {column} {_shown(value)} holding something that is not a string"
    return None


def _not_index(row: dict[str, Any], column: str, count: int, base: int = 0) -> str | None:
    """A problem unless the column is an integer (or its decimal string, as the Hub stores some labels) in
    base..base+count-1."""
    value = row[column]
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, str) and value.strip().isdigit():
        value, ok = int(value), True
    if not ok or not base <= value < base + count:
        return f"has {column} {_shown(row[column])}, not one of {base}..{base + count - 1}"
    return None


def _check_hellaswag(row: dict[str, Any]) -> str | None:
    return (
        _not_text(row, "activity_label", "ctx_a", "ctx_b")
        or _not_texts(row, "endings", row["endings"])
        or _not_index(row, "label", len(row["endings"]))
    )


def _check_arc(row: dict[str, Any]) -> str | None:
    choices = row["choices"]
    if not isinstance(choices, dict) or not {"text", "label"} <= choices.keys():
        return f"has choices {_shown(choices)}, not a {{text, label}} pair of lists"
    problem = (
        _not_text(row, "question", "answerKey")
        or _not_texts(row, "choices.text", choices["text"])
        or _not_texts(row, "choices.label", choices["label"])
    )
    if problem is None and len(choices["text"]) != len(choices["label"]):
        problem = f"has {len(choices['text'])} choices.text but {len(choices['label'])} choices.label"
    if problem is None and row["answerKey"] not in choices["label"]:
        problem = f"has answerKey {_shown(row['answerKey'])}, not one of its choices.label {choices['label']}"
    return problem


def _check_piqa(row: dict[str, Any]) -> str | None:
    return _not_text(row, "goal", "sol1", "sol2") or _not_index(row, "label", 2)


def _check_winogrande(row: dict[str, Any]) -> str | None:
    problem = _not_text(row, "sentence", "option1", "option2") or _not_index(row, "answer", 2, base=1)
    if problem is None and "_" not in row["sentence"]:
        problem = "has a sentence without the blank _ the options fill"
    return problem


def _check_lambada(row: dict[str, Any]) -> str | None:
    problem = _not_text(row, "text")
    if problem is None and " " not in row["text"].strip():
        problem = f"has text {_shown(row['text'])}, not a passage followed by its last word"
    return problem


def _check_gsm8k(row: dict[str, Any]) -> str | None:
    problem = _not_text(row, "question", "answer")
    if problem is None and "####" not in row["answer"]:
        problem = f"has answer {_shown(row['answer'])}, without the '#### N' that ends GSM8K's answers"
    return problem


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
            _check_hellaswag,
        ),
        Task(
            "arc_easy",
            "allenai/ai2_arc",
            "ARC-Easy",
            "test",
            ARC_COLUMNS,
            _arc,
            ("acc", "acc_norm"),
            _check_arc,
        ),
        Task(
            "arc_challenge",
            "allenai/ai2_arc",
            "ARC-Challenge",
            "test",
            ARC_COLUMNS,
            _arc,
            ("acc_norm", "acc"),
            _check_arc,
        ),
        Task(
            "piqa",
            "baber/piqa",
            None,
            "validation",
            ("goal", "sol1", "sol2", "label"),
            _piqa,
            ("acc_norm", "acc"),
            _check_piqa,
        ),
        Task(
            "winogrande",
            "allenai/winogrande",
            "winogrande_xl",
            "validation",
            ("sentence", "option1", "option2", "answer"),
            _winogrande,
            ("acc",),
            _check_winogrande,
        ),
        Task(
            "lambada_openai",
            "EleutherAI/lambada_openai",
            "default",
            "test",
            ("text",),
            _lambada,
            ("acc", "ppl"),
            _check_lambada,
            kind="last_word",
        ),
        Task(
            "gsm8k",
            "openai/gsm8k",
            "main",
            "test",
            ("question", "answer"),
            _gsm8k,
            ("acc",),
            _check_gsm8k,
            kind="generative",
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


def download_hint(task: Task, path: str | os.PathLike[str]) -> str:
    """The command that makes a good local copy of `task` at `path`."""
    return f"hf download {task.repo} --repo-type dataset --local-dir {path}"


def local_copy(task: Task, tasks_dir: str | os.PathLike[str], flag: str = "--tasks-dir") -> Path:
    """Where a local copy of the task's repository must be: `tasks_dir/OWNER/NAME`."""
    path = Path(tasks_dir) / task.repo
    if not path.is_dir():
        raise TalmError(
            f"no local copy of {task.name} at {str(path)!r}: download the dataset repository {task.repo} there "
            f"({download_hint(task, path)}), or drop {flag}"
        )
    return path


@dataclass
class RowSource:
    """Rows as read from one place (a data file of a local copy, or the Hub's split): what a bad row is named by."""

    where: str
    rows: list[dict[str, Any]]


def load_examples(
    name: str,
    *,
    tasks_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    flag: str = "--tasks-dir",
) -> list[Example]:
    """The first `limit` (all if None) examples of task `name`, from the Hub or from `tasks_dir`'s local copy,
    every row checked against the task's schema first. `flag` is the option that names a tasks directory in the
    command that asks (its messages name it)."""
    task = get_task(name)
    if tasks_dir is not None:
        path = local_copy(task, tasks_dir, flag)
        sources = read_local_copy(task, path)
        fix = f"download a good copy ({download_hint(task, path)}), or point {flag} at one"
    else:
        sources = [RowSource(f"the {task.split!r} split of {task.repo} on the Hub", read_hub(task, flag))]
        fix = f"download a good copy into DIR/{task.repo} and pass {flag} DIR"
    if not any(source.rows for source in sources):
        raise TalmError(f"{task.name} has no rows in {', '.join(s.where for s in sources)}: {fix}")
    chosen = []
    for source in sources:
        for i, row in enumerate(source.rows):
            if limit is not None and len(chosen) >= limit:
                break
            problem = task.check(row)
            if problem is not None:
                raise TalmError(f"{task.name}: row {i} of {source.where} {problem}: {fix}")
            chosen.append(row)
    return [task.build(row) for row in chosen]


def read_hub(task: Task, flag: str) -> list[dict[str, Any]]:
    """The task's split from the Hub (or the Hugging Face cache), its columns checked."""
    import datasets  # slow to import: only when a task is read
    from huggingface_hub.utils import logging as hub_logging

    # the libraries' own warnings (a retried request, a progress bar) would come before talm's one-line error
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    hub_logging.set_verbosity_error()
    unreachable = hub_unreachable(
        task.repo
    )  # in seconds, where datasets would retry for half a minute or more
    try:
        if unreachable is not None:
            raise ConnectionError(f"unreachable: {unreachable}")
        rows = datasets.load_dataset(task.repo, name=task.config, split=task.split)
    except (OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise TalmError(
            f"cannot read {task.name} from the Hub ({task.repo}) ({type(err).__name__}"
            f"{': ' + str(err) if unreachable else ''}): pass {flag} DIR with the dataset repository {task.repo} "
            f"downloaded into DIR/{task.repo} (hf download {task.repo} --repo-type dataset --local-dir "
            f"DIR/{task.repo}), or set HF_DATASETS_OFFLINE=1 to use a copy already in the Hugging Face cache"
        ) from None
    except ValueError as err:  # a config or split the repository does not have
        raise TalmError(
            f"{task.repo} has no {task.config or 'default'} config with a {task.split!r} split ({err}): "
            f"download a copy of it into DIR/{task.repo} and pass {flag} DIR"
        ) from None
    check_columns(task, rows.column_names, f"{task.repo} on the Hub", "use the repository's real columns")
    return list(rows.select_columns(list(task.columns)))


def check_columns(task: Task, names: list[str], where: str, fix: str) -> None:
    missing = [c for c in task.columns if c not in names]
    if missing:
        raise TalmError(
            f"{task.name} from {where} lacks the column(s) {', '.join(missing)} (it has {', '.join(names)}): {fix}"
        )


def read_local_copy(task: Task, path: Path) -> list[RowSource]:
    """The rows of the task's split in a local copy, file by file (a file that cannot be read is named)."""
    fix = f"download a good copy ({download_hint(task, path)})"
    sources = []
    for file in split_files(task, path):
        where = repr(str(file))
        rows = read_data_file(file, fix)
        check_columns(
            task, list(rows[0]) if rows else list(task.columns), where, f"use a copy of {task.repo}"
        )
        sources.append(RowSource(where, [{c: r.get(c) for c in task.columns} for r in rows]))
    return sources


def split_files(task: Task, path: Path) -> list[Path]:
    """The data files of the task's config and split in a local copy, as datasets finds them: the README's
    `configs:` block if it has one, else datasets' file naming (data/validation-00000-of-00001.parquet)."""
    from datasets.data_files import get_data_patterns, resolve_pattern
    from huggingface_hub.repocard import metadata_load

    config = task.config or "default"
    fix = f"use a copy of {task.repo} laid out as on the Hub ({download_hint(task, path)})"
    try:
        configs = (
            (metadata_load(path / "README.md") or {}).get("configs")
            if (path / "README.md").is_file()
            else None
        )
    except (OSError, ValueError) as err:
        raise TalmError(f"cannot read {str(path / 'README.md')!r} ({err}): {fix}") from None
    if configs:
        found = [c for c in configs if isinstance(c, dict) and c.get("config_name", "default") == config]
        patterns = split_patterns(found[0].get("data_files")) if found else {}
    else:
        try:
            patterns = get_data_patterns(str(path)) if config == "default" else {}
        except (OSError, ValueError):
            patterns = {}
    files = []
    for pattern in patterns.get(task.split, []):
        try:
            files += resolve_pattern(pattern, str(path))
        except (OSError, ValueError):
            pass
    if not files:
        raise TalmError(f"{str(path)!r} has no {config} config with a {task.split!r} split: {fix}")
    return sorted({Path(f) for f in files})


def split_patterns(data_files: Any) -> dict[str, list[str]]:
    """A README config's data_files (a pattern, a list of them, or [{split, path}]) as split -> patterns."""
    if isinstance(data_files, str):
        return {"train": [data_files]}
    out: dict[str, list[str]] = {}
    for item in data_files if isinstance(data_files, list) else []:
        if isinstance(item, str):
            out.setdefault("train", []).append(item)
        elif isinstance(item, dict) and isinstance(item.get("split"), str):
            paths = item.get("path")
            out.setdefault(item["split"], []).extend([paths] if isinstance(paths, str) else list(paths or []))
    return out


def read_data_file(file: Path, fix: str) -> list[dict[str, Any]]:
    """A parquet or JSON-lines data file's rows, as data (nothing in it is run); one line naming it if unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if file.suffix == ".parquet":
            return pq.read_table(file).to_pylist()
        if file.suffix in (".json", ".jsonl"):
            return read_json_rows(file)
    except (OSError, ValueError, pa.ArrowException) as err:
        reason = str(err).replace(f"Could not open Parquet input source '{file}': ", "")  # it names the file
        raise TalmError(f"cannot read {str(file)!r} ({reason}): {fix}") from None
    raise TalmError(f"{str(file)!r} is neither parquet nor JSON lines, which talm reads: {fix}")


def read_json_rows(file: Path) -> list[dict[str, Any]]:
    """A JSON-lines file's objects (or a JSON array of objects)."""
    import json

    text = file.read_text(encoding="utf-8")
    rows = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError("expected one JSON object per row")
    return rows
