"""Prompt data: prompts with reference answers, for reinforcement learning with verifiable rewards (GRPO) and
generative evaluation; and the one definition of how a numeric answer is read from a reference or a reply.

A prompt data directory (data/DATASET/[PREFIX_]SAMPLE/, written whole by `prepare_prompts`, not streamed: such
datasets are small) holds

    meta.json             {"format": FORMAT, "kind": "prompts", dataset, source, config, text_column, files,
                           tokenizer {path, fingerprint, vocab_size, eot_id}, arguments, splits {SPLIT: {file,
                           prompts, tokens}}, malformed, first_malformed, complete}
    train.prompts.jsonl   one {"ids": [...], "answer": str} per line: the prompt rendered with talm's chat format
    val.prompts.jsonl     (`ChatFormat.render_prompt`: its messages, then <|assistant|>) and its reference answer

The manifest's "kind" says what the directory holds ("text" and "conversations" are token shards, see
manifest.py); training and evaluation read it with `read_prompts`. A row whose prompt is not a user message (or a
list of messages ending with one) or whose answer is missing is malformed: skipped, counted, the first named.

Answers follow lm-evaluation-harness's gsm8k task, filter "flexible-extract" (lm_eval/tasks/gsm8k/gsm8k.yaml):
the reference is what follows the last "#### "; a reply's answer is the last match of
`-?[$0-9.,]{2,}|-?[0-9]+` (here: the last that holds a digit); both then lose commas, "$" and one trailing ".",
and must be equal as strings (exact_match).

This module imports no torch.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from talm.data.config import DownloadConfig
from talm.data.conversations import MalformedRows, json_kind, with_text_contents
from talm.data.manifest import layout_files_re, manifest_paths
from talm.errors import TalmError

FORMAT = "talm.prompts/1"
KIND = "prompts"
MANIFEST = "meta.json"
ANSWER_COLUMN = "answer"
SPLITS = ("train", "val")
DEFAULT_VAL_PROMPTS = 500  # at most, a tenth of --data-files' prompts when --val-prompts is unset

# ------------------------------------------------------------------------------------------------ answers

_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval gsm8k flexible-extract
_IGNORED = re.compile(r",|\$|\.$")  # its regexes_to_ignore (besides the "#### " prefix)


def normalise_answer(text: str) -> str:
    """An answer as lm-eval's exact_match compares it: commas, "$" and one trailing "." removed, trimmed."""
    return _IGNORED.sub("", text.strip()).strip()


def reference_answer(answer: Any) -> str:
    """The reference of a dataset's answer: a number as it is, else the text after its last "#### " (GSM8K's
    worked solutions end "#### 72") or the whole text, normalised."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        text = str(answer)
    else:
        text = str(answer).rsplit("####", 1)[-1]
    return normalise_answer(text)


def final_number(reply: str) -> str | None:
    """The last number of a reply, normalised (None if it holds none)."""
    found = [a or b for a, b in _NUMBER.findall(reply) if any(c.isdigit() for c in a or b)]
    return normalise_answer(found[-1]) if found else None


def answers_match(reply: str, reference: str) -> bool:
    """Whether a reply's final number is the reference (both normalised; exact, as lm-eval's exact_match)."""
    got = final_number(reply)
    return got is not None and got == normalise_answer(reference)


# ------------------------------------------------------------------------------------------------ reading rows


def prompt_messages(prompt: Any) -> list[dict[str, str]] | str:
    """A row's prompt as chat messages (a string is one user message), or why it is not a prompt."""
    from talm.tokenizer.chat import BadConversation, check_messages

    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if prompt.strip() else "the prompt is empty"
    if not isinstance(prompt, list):
        return f"the prompt is {json_kind(prompt)}, not text or a list of messages"
    messages = with_text_contents(prompt)
    if isinstance(messages, BadConversation):
        return str(messages)
    try:
        return check_messages(messages, ends_with="user")
    except BadConversation as err:
        return f"the prompt is not a conversation ending with the user's message ({err})"


def _source_rows(cfg: DownloadConfig, source: Any) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(split, where, row) of every row: a preset's train split and its held-out split; or --data-files' rows,
    all "train" (the first are held out later)."""
    from talm.data.jsonrows import JsonRows
    from talm.data.streaming import split_rows

    columns = [source.text_column, ANSWER_COLUMN]
    if not source.files:
        preset = cfg.preset
        assert preset is not None and preset.val_split is not None
        for split, hub_split in (("train", "train"), ("val", preset.val_split)):
            for i, row in enumerate(split_rows(source, hub_split, columns)):
                yield split, f"row {i} of the {hub_split!r} split of {source.source}", row
        return
    builder = source.load_args.get("path")
    if builder not in ("json", "parquet"):
        raise TalmError(
            f"--prompts reads .jsonl, .json or .parquet files with {source.text_column!r} and {ANSWER_COLUMN!r} "
            f"columns, not {builder} files: convert them"
        )
    for path in source.files:
        if builder == "json":
            yield from (("train", where, row) for where, row in JsonRows(source).rows_of(path))
        else:
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(path).to_pylist()):
                yield "train", f"{path!r} row {i}", row


@dataclass
class PromptRows:
    """Encoded prompts per split, and the malformed rows skipped."""

    splits: dict[str, list[dict[str, Any]]]
    malformed: MalformedRows


def encode_rows(cfg: DownloadConfig, source: Any, tokenizer: Any) -> PromptRows:
    """Every valid row rendered as a chat prompt with its reference answer; a preset's held-out split is "val",
    else the first --val-prompts rows of the files are."""
    from talm.tokenizer.chat import ChatFormat

    chat = ChatFormat(tokenizer)  # refuses a tokenizer without the role tokens
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    malformed = MalformedRows()
    for split, where, row in _source_rows(cfg, source):
        if source.text_column not in row or ANSWER_COLUMN not in row:
            missing = [c for c in (source.text_column, ANSWER_COLUMN) if c not in row]
            raise TalmError(
                f"{where} has no {' or '.join(map(repr, missing))} (its columns: "
                f"{', '.join(row)}): prompt data needs the prompt (--text-column) and its {ANSWER_COLUMN!r}"
            )
        messages = prompt_messages(row[source.text_column])
        answer = row[ANSWER_COLUMN]
        if isinstance(messages, str):
            malformed.add(where, messages)
            continue
        if answer is None or isinstance(answer, (bool, list, dict)) or not reference_answer(answer):
            malformed.add(where, f"the answer is {json_kind(answer)}, not a reference answer")
            continue
        splits[split].append({"ids": chat.render_prompt(messages), "answer": reference_answer(answer)})
    if cfg.data_files:
        rows = splits["train"]
        held = cfg.val_prompts if cfg.val_prompts is not None else min(DEFAULT_VAL_PROMPTS, len(rows) // 10)
        splits = {"train": rows[held:], "val": rows[:held]}
    elif cfg.val_prompts is not None:
        splits["val"] = splits["val"][: cfg.val_prompts]
    return PromptRows(splits, malformed)


# ------------------------------------------------------------------------------------------------ writing


@dataclass
class PromptResult:
    """Outcome of `prepare_prompts`: where, whether it wrote ("new") or found the same data ("complete")."""

    out_dir: Path
    manifest: dict[str, Any]
    status: str
    seconds: float = 0.0


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode("utf-8")


def _previous(out_dir: Path, arguments: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The same prompt data written before (nothing to do), None when the directory is free (or --overwrite);
    TalmError when it holds other data."""
    manifests = manifest_paths(out_dir)
    if not manifests or overwrite:
        return None
    try:
        previous = json.loads(manifests[0].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = {}
    if isinstance(previous, dict) and previous.get("kind") == KIND and previous.get("arguments") == arguments:
        return previous
    raise TalmError(
        f"{str(out_dir)!r} already holds other data (another source, tokenizer or kind): pass --overwrite to "
        "replace it, or --dir-prefix to write beside it"
    )


def _clear(out_dir: Path) -> None:
    """Remove an earlier layout's files (token shards and manifests of any worker layout, prompt files)."""
    for manifest in manifest_paths(out_dir):
        pattern = layout_files_re(manifest.name)
        for f in out_dir.iterdir():
            if f.is_file() and pattern.fullmatch(f.name):
                f.unlink()
    for split in SPLITS:
        (out_dir / f"{split}.prompts.jsonl").unlink(missing_ok=True)


def prepare_prompts(cfg: DownloadConfig) -> PromptResult:
    """download_data for prompt data: read every row (a preset's splits or --data-files), render the prompts,
    and write the split files, then the manifest (each atomically), holding the directory's lock."""
    from talm.data.prepare import locked
    from talm.data.sources import resolve_source
    from talm.files import check_writable_dir, write_atomically
    from talm.tokenizer.api import Tokenizer

    start = time.perf_counter()
    tokenizer = Tokenizer.from_file(cfg.tokenizer_path)
    source = resolve_source(cfg)
    arguments = {
        **source.describe(),
        KIND: True,
        "tokenizer": tokenizer.fingerprint,
        "val_prompts": cfg.val_prompts,
    }
    out_dir = Path(cfg.out_dir)
    check_writable_dir(out_dir, instead="pass another --data-root")
    with locked(out_dir, ""):
        previous = _previous(out_dir, arguments, cfg.overwrite)
        if previous is not None:
            return PromptResult(out_dir, previous, "complete")
        rows = encode_rows(cfg, source, tokenizer)
        if not rows.splits["train"]:
            first = rows.malformed.first
            why = f" ({rows.malformed.count:,} malformed, the first: {first[0]})" if first else ""
            raise TalmError(
                f"{source.source} held no prompt for training{why}: each row needs a prompt in "
                f"{source.text_column!r} (--text-column) and its reference in {ANSWER_COLUMN!r}"
                + (", and more rows than --val-prompts" if cfg.data_files else "")
            )
        _clear(out_dir)
        splits = {}
        for split, split_rows in rows.splits.items():
            body = _jsonl(split_rows)
            write_atomically(out_dir / f"{split}.prompts.jsonl", lambda f, b=body: f.write(b))
            tokens = sum(len(r["ids"]) for r in split_rows)
            splits[split] = {"file": f"{split}.prompts.jsonl", "prompts": len(split_rows), "tokens": tokens}
        manifest = {
            "format": FORMAT,
            "kind": KIND,
            "dataset": source.dataset,
            **source.describe(),
            "tokenizer": {
                "path": str(cfg.tokenizer_path),
                "fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size,
                "eot_id": tokenizer.eot_id,
            },
            "arguments": arguments,
            "splits": splits,
            "malformed": rows.malformed.count,
            "first_malformed": rows.malformed.first,
            "complete": True,
        }
        body = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
        write_atomically(out_dir / MANIFEST, lambda f: f.write(body))
    return PromptResult(out_dir, manifest, "new", time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Prompt:
    """One prompt: its chat-rendered ids (ending with <|assistant|>) and its reference answer."""

    ids: tuple[int, ...]
    answer: str


@dataclass
class PromptSet:
    """A prompt data directory, read: its tokenizer (as the manifest recorded it) and its splits."""

    dir: Path
    tokenizer: dict[str, Any]
    splits: dict[str, list[Prompt]]


def directory_kind(data_dir: str | Path) -> str | None:
    """What a data directory's manifest says it holds ("prompts", "text", "conversations", ...), None when it
    has no readable manifest (the readers then say what is wrong)."""
    manifests = manifest_paths(Path(data_dir)) if Path(data_dir).is_dir() else []
    try:
        meta = json.loads(manifests[0].read_text(encoding="utf-8")) if manifests else None
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    return meta.get("kind") or ("conversations" if meta.get("loss_mask") else "text")


def prompt_dataset(data_dir: str | Path) -> Any:
    """A prompt data directory as a `manifest.DataSet` without shards (its tokenizer and place, what a training
    run reads before its objective reads the prompts); TalmError if it is not prompt data."""
    import numpy as np

    from talm.data.manifest import DataSet

    data = read_prompts(data_dir)
    return DataSet(data.dir, data.tokenizer, np.dtype("uint16"), [], True, kind=KIND)


def read_prompts(data_dir: str | Path, vocab_size: int | None = None) -> PromptSet:
    """A prompt data directory's manifest and splits, every row checked (ids below `vocab_size` if given);
    TalmError naming the file and line at fault otherwise."""
    data_dir = Path(data_dir)
    fix = "rerun download_data with --overwrite to recreate it"
    kind = directory_kind(data_dir)
    if kind != KIND:
        what = "no readable manifest" if kind is None else f"{kind.rstrip('s')} data"
        raise TalmError(
            f"{str(data_dir)!r} holds {what}, not prompts with reference answers: make prompt data with "
            "download_data gsm8k, or download_data NAME --data-files FILE --prompts"
        )
    meta = json.loads((data_dir / MANIFEST).read_text(encoding="utf-8"))
    splits: dict[str, list[Prompt]] = {}
    for split, entry in (meta.get("splits") or {}).items():
        path = data_dir / str(entry.get("file"))
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise TalmError(f"cannot read {str(path)!r} ({err}): {fix}") from None
        splits[split] = [_prompt(path, i, line, vocab_size, fix) for i, line in enumerate(lines, start=1)]
        if len(splits[split]) != entry.get("prompts"):
            raise TalmError(f"{str(path)!r} holds {len(splits[split])} prompts, not the manifest's: {fix}")
    return PromptSet(data_dir, meta.get("tokenizer") or {}, splits)


def _prompt(path: Path, number: int, line: str, vocab_size: int | None, fix: str) -> Prompt:
    try:
        row = json.loads(line)
        ids, answer = tuple(row["ids"]), row["answer"]
        ok = ids and isinstance(answer, str) and all(type(i) is int and i >= 0 for i in ids)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise TalmError(f"{str(path)!r} line {number} is not a prompt row ({{ids, answer}}): {fix}")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise TalmError(
            f"{str(path)!r} line {number} holds token id {max(ids)}, outside the vocabulary of {vocab_size}: the "
            f"data was made with another tokenizer; {fix}"
        )
    return Prompt(ids, answer)
