"""Where the text comes from: dataset presets and --data-files resolved to a `TextSource`, and what is wrong with a
local file that cannot be read.

A source is a Hub repo (or a local directory laid out like the repo, e.g. ./HuggingFaceFW/fineweb, which
`datasets` prefers over the Hub), the shipped tiny-shakespeare.txt, or the user's own files; `TextSource` says
what to pass to `datasets.load_dataset` and how the manifest names it. Resolving checks local files and touches
no network; streaming.py opens and reads the source.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any

from talm.data.config import DownloadConfig
from talm.errors import TalmError

# File types --data-files accepts, by suffix, and the `datasets` builder that reads each.
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
_COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz", ".lz4")
# The columns of a preference pair (talm.data.preferences); "prompt" may be absent when the sides are whole
# conversations.
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class TextSource:
    """A resolved text source: what to pass to `datasets.load_dataset`, and how to name it in the manifest."""

    dataset: str  # the name the user typed (fineweb, tinyshakespeare, mycorpus)
    source: str  # hub repo id, or the file(s) read
    config: str  # config (subset) name
    text_column: str
    load_args: dict[str, Any] = field(default_factory=dict)  # for datasets.load_dataset(**load_args)
    from_hub: bool = False  # streamed from the Hub unless a local directory with the repo's name exists
    files: list[str] = field(default_factory=list)  # local files read (for the manifest), sorted
    conversations: bool = False  # rows are lists of messages (talm.data.conversations), not texts
    preferences: bool = False  # rows are preference pairs (talm.data.preferences): prompt, chosen, rejected
    train_split: str = "train"  # the repo's split read for training
    val_split: str | None = None  # the repo's own held-out split, read whole first as the val split

    def describe(self) -> dict[str, Any]:
        """What identifies this stream in a manifest: a rerun must read exactly the same one."""
        described = {
            "source": self.source,
            "config": self.config,
            "text_column": self.text_column,
            "files": self.files,
        }
        if self.val_split:
            described["splits"] = {"val": self.val_split, "train": self.train_split}
        if self.preferences:
            return {**described, "preferences": True}
        return {**described, "conversations": True} if self.conversations else described

    @property
    def columns(self) -> list[str]:
        """The columns a row is read from: the text column, or a preference pair's three."""
        return list(PAIR_COLUMNS) if self.preferences else [self.text_column]


def _builder_for(path: str) -> str | None:
    name = path.lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _BUILDERS.get(os.path.splitext(name)[1])


def expand_data_files(patterns: list[str]) -> list[str]:
    """Files named by paths, globs and directories (searched recursively), sorted so the order is stable."""
    files: set[str] = set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [
                p
                for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
                if os.path.isfile(p) and _builder_for(p)
            ]
            if not found:
                raise TalmError(
                    f"--data-files directory {pattern!r} holds no parquet, jsonl, json, csv or txt files: "
                    "point it at your text files"
                )
        else:
            found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            if not found:
                raise TalmError(
                    f"--data-files {pattern!r} matches no file: check the path (relative to here)"
                )
        files.update(_display_path(p) for p in found)
    return sorted(files)


def _display_path(path: str) -> str:
    """Relative to the current directory when inside it (the manifest stays valid if the project moves)."""
    relative = os.path.relpath(os.path.abspath(path))
    return os.path.abspath(path) if relative.startswith("..") else relative


def _local_files_source(cfg: DownloadConfig, files: list[str], source: str) -> TextSource:
    builders = {_builder_for(f) for f in files}
    if None in builders:
        bad = next(f for f in files if _builder_for(f) is None)
        raise TalmError(
            f"cannot read {bad!r}: --data-files takes .parquet, .jsonl, .json, .csv or .txt files (optionally "
            "compressed: .gz, .zst, .bz2, .xz)"
        )
    if len(builders) > 1:
        raise TalmError(
            f"--data-files mixes file types ({', '.join(sorted(b for b in builders if b))}): prepare each type "
            "separately, e.g. with --dir-prefix"
        )
    builder = builders.pop()
    if cfg.is_conversations and builder not in ("json", "parquet"):
        raise TalmError(
            f"--conversations reads .jsonl, .json or .parquet files with a messages column, not {builder} files: "
            "convert them, or drop --conversations to read them as text"
        )
    if cfg.is_preferences and builder not in ("json", "parquet"):
        raise TalmError(
            f"--preferences reads .jsonl, .json or .parquet files with chosen and rejected columns, not {builder} "
            "files: convert them"
        )
    load_args: dict[str, Any] = {"path": builder, "data_files": files}
    if builder == "text":
        # A plain text file holds many documents: passages separated by blank lines become documents.
        load_args["sample_by"] = "paragraph"
    return TextSource(
        dataset=cfg.dataset,
        source=source,
        config=cfg.sample,
        text_column="text" if builder == "text" else cfg.column,
        load_args=load_args,
        files=files,
        conversations=cfg.is_conversations,
        preferences=cfg.is_preferences,
    )


def resolve_source(cfg: DownloadConfig) -> TextSource:
    """Turn a validated config into a `TextSource` (checks local files; touches no network)."""
    if cfg.data_files:
        files = expand_data_files(cfg.data_files)
        return _local_files_source(cfg, files, source=" ".join(cfg.data_files))
    preset = cfg.preset
    assert preset is not None  # DownloadConfig refuses an unknown dataset without --data-files
    if preset.kind == "file":
        if not os.path.isfile(preset.source):
            raise TalmError(
                f"{preset.source!r} not found in the current directory: run download_data {cfg.dataset} from the "
                "talm project root (where the file is shipped), or pass your own text with --data-files"
            )
        return _local_files_source(cfg, [_display_path(preset.source)], source=preset.source)
    return TextSource(
        dataset=cfg.dataset,
        source=preset.source,
        config=cfg.sample,
        text_column=cfg.column,
        load_args={"path": preset.source, "name": cfg.sample},
        from_hub=not os.path.isdir(preset.source),
        conversations=cfg.is_conversations,
        preferences=cfg.is_preferences,
        train_split=preset.train_split,
        val_split=cfg.own_val_split,
    )


# ------------------------------------------------------------------------------------------------ bad content
# `datasets` reports unparsable content as a bare UnicodeDecodeError or ArrowInvalid with a position inside its
# chunk; these say which file, which line, and the fix (streaming.py calls `describe_bad_content`).


class SourceDataError(TalmError):
    """The source's own content cannot be read (not UTF-8, a broken JSON line, ...): the message names the file,
    the place and the fix."""


def missing_column(source: TextSource, columns: list[str]) -> TalmError:
    """The refusal of a source whose rows lack the column asked for, listing the ones they have."""
    if source.preferences:
        return TalmError(
            f"{source.source} ({source.config}) has no column {source.text_column!r}: preference pairs need the "
            f"columns chosen and rejected (and prompt, unless they are whole conversations); rename its columns "
            f"(they are: {', '.join(columns)})"
        )
    hint = (
        "" if source.conversations or "messages" not in columns else " (conversations: add --conversations)"
    )
    return TalmError(
        f"{source.source} ({source.config}) has no column {source.text_column!r}{hint}: pass the column holding "
        f"the text with --text-column (its columns: {', '.join(columns)})"
    )


def _open_local(path: str) -> Any:
    """A local file for reading its raw (decompressed) bytes, or None for a compression the stdlib lacks."""
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(os.path.splitext(path)[1].lower())
    if opener is not None:
        return opener(path, "rb")
    if path.lower().endswith(_COMPRESSIONS):
        return None
    return open(path, "rb")


def open_data_file(path: str) -> Any:
    """A local data file for reading its (decompressed) bytes: the stdlib's decompressors, else fsspec's (zstd,
    lz4, as `datasets` reads them)."""
    f = _open_local(path)
    if f is not None:
        return f
    import fsspec

    try:
        return fsspec.open(path, "rb", compression="infer").open()
    except (ImportError, ValueError) as err:
        raise TalmError(
            f"cannot decompress {path!r} ({err}): decompress it first, or install the module"
        ) from None


def text_file_problem(path: str) -> str | None:
    """The first place where a text file is not UTF-8, said as `talm.tokenizer.textfiles.check_utf8` says it for
    train_tokenizer (one helper for both stages), or None."""
    from talm.tokenizer.textfiles import check_utf8

    f = _open_local(path)
    if f is None:
        return None
    with f:
        try:
            check_utf8(f, path)
        except TalmError as err:
            return str(err)
    return None


def json_line_problem(path: str, number: int, line: bytes) -> str | None:
    """What is wrong with line `number` of a JSON-lines file if it is not a JSON object (torn, invalid, not
    UTF-8), said with the fix; None if it is one."""
    try:
        value = json.loads(line.decode("utf-8"))
        if isinstance(value, dict):
            return None
        why = f"holds a JSON {type(value).__name__}, not an object"
    except UnicodeDecodeError as err:
        why = f"is not UTF-8 (invalid byte 0x{line[err.start]:02x} at column {err.start + 1})"
    except json.JSONDecodeError as err:
        torn = not line.endswith(b"\n")  # only the last line can lack its newline
        why = (
            f"is cut off (a torn last line: {err.msg}, column {err.colno})"
            if torn
            else f"is not valid JSON ({err.msg}, column {err.colno})"
        )
    return f"{path!r} line {number} {why}: fix or delete that line (each line must be one JSON object), then rerun"


def json_lines_problem(path: str) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object (torn, invalid, not UTF-8), or None."""
    f = _open_local(path)
    if f is None:
        return None
    with f:
        for number, line in enumerate(f, start=1):
            problem = json_line_problem(path, number, line) if line.strip() else None
            if problem is not None:
                return problem
    return None


def describe_bad_content(source: TextSource, err: BaseException) -> str:
    """The first problem found in the source's local files, else `err` said with the fix."""
    builder = source.load_args.get("path")
    for path in source.files:
        if builder == "text":
            problem = text_file_problem(path)
        elif builder == "json":
            problem = json_lines_problem(path)
            if problem is not None and not path.lower().endswith(".jsonl"):
                try:  # a .json file may also be one JSON document
                    f = _open_local(path)
                    with f:
                        json.load(f)
                    problem = None
                except (OSError, ValueError):
                    pass
        else:
            problem = None
        if problem is not None:
            return problem
    what = f"{len(source.files)} file(s) of --data-files" if source.files else source.source
    return f"cannot read {what} ({type(err).__name__}: {err}): check that the files are intact and of the type their names say"
