"""Where the text comes from: dataset presets resolved to a resumable stream of documents' texts.

Everything is read with Hugging Face `datasets` in streaming mode, so a sample of hundreds of GB is never
downloaded first: Hub repos (or a local directory laid out like the repo, e.g. ./HuggingFaceFW/fineweb, which
`datasets` prefers over the Hub), the shipped tiny-shakespeare.txt, and the user's own files. The stream yields
batches of texts together with the stream position after them (`IterableDataset.state_dict()`), which is what
makes an interrupted run resumable. No tokenizing happens here.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from talm.data.config import DownloadConfig
from talm.errors import TalmError

# File types --data-files accepts, by suffix, and the `datasets` builder that reads each.
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
_COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz", ".lz4")
# A quick look at the Hub before streaming from it: datasets would otherwise retry for tens of seconds.
_HUB_PROBE_TIMEOUT_S = 10
ROWS_PER_READ = 1024  # rows per Arrow batch taken from `datasets`; texts are then grouped by bytes


class SourceDataError(TalmError):
    """The source's own content cannot be read (not UTF-8, a broken JSON line, ...): the message names the file,
    the place and the fix."""


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

    def describe(self) -> dict[str, Any]:
        """What identifies this stream in a manifest: a rerun must read exactly the same one."""
        return {
            "source": self.source,
            "config": self.config,
            "text_column": self.text_column,
            "files": self.files,
        }


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
    )


def _hub_unreachable(source: TextSource, why: str) -> TalmError:
    return TalmError(
        f"could not reach the Hugging Face Hub for {source.source} ({why}): use a local copy, either with "
        f"--data-files PATH_OR_GLOB or as a directory ./{source.source} laid out like the repo, or set "
        "HF_ENDPOINT to a reachable mirror"
    )


def check_hub_reachable(source: TextSource) -> None:
    """Fail in seconds, with the way out, when the Hub cannot be reached (datasets would retry for minutes)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return  # the user asked for the local cache only; datasets says what is missing
    url = f"{constants.ENDPOINT.rstrip('/')}/api/datasets/{source.source}"
    try:
        with urllib.request.urlopen(url, timeout=_HUB_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # it answered (maybe 401/404): reachable; datasets reports what is wrong with the repo
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise _hub_unreachable(source, f"{constants.ENDPOINT}: {reason}") from None


@dataclass
class TextBatch:
    """Consecutive documents of the stream, and the stream position just after the last of them."""

    texts: list[str | None]  # None or "" for documents without text (skipped and counted by the writer)
    utf8_bytes: np.ndarray  # int64, UTF-8 length of each text (0 for None)
    state: dict[str, Any]  # IterableDataset.state_dict() after this batch: resume from here


class TextStream:
    """A resumable stream of documents' texts from a `TextSource`, optionally one worker's part of it."""

    def __init__(self, source: TextSource, *, num_workers: int = 1, worker_index: int = 0) -> None:
        self.source = source
        self._dataset = _open(source, num_workers=num_workers, worker_index=worker_index)
        self._loaded: dict[str, Any] | None = None  # a loaded position not yet reached by iterating

    def state_dict(self) -> dict[str, Any]:
        """The stream position (after the last batch yielded), as plain JSON-able data."""
        # datasets reports its initial state between load_state_dict() and the next read: not where we are.
        return copy.deepcopy(self._loaded) if self._loaded is not None else self._dataset.state_dict()

    def _position(self) -> dict[str, Any]:
        # a copy: datasets may keep mutating the dicts it returned (seen after load_state_dict), while the
        # position of a batch must stay what it was when the batch was read
        return copy.deepcopy(self._dataset.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._dataset.load_state_dict(copy.deepcopy(state))  # datasets mutates the dict it is given
        self._loaded = copy.deepcopy(state)

    def batches(self, target_bytes: int = 4 << 20, rows_per_read: int | None = None) -> Iterator[TextBatch]:
        """Texts in stream order, grouped into batches of about `target_bytes` of UTF-8 (whole reads of
        `rows_per_read` rows, the granularity of the stream positions)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        column = self.source.text_column
        texts: list[str | None] = []
        sizes: list[np.ndarray] = []
        n_bytes = 0
        tables = self._dataset.iter(batch_size=rows_per_read or ROWS_PER_READ)
        try:
            for table in _reading(self.source, tables):
                self._loaded = None
                if column not in table.column_names:
                    raise _missing_column(self.source, table.column_names)
                values = table.column(column)
                if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                    raise TalmError(
                        f"column {column!r} of {self.source.source} holds {values.type}, not text: pass the text "
                        f"column with --text-column (columns: {', '.join(table.column_names)})"
                    )
                lengths = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
                texts.extend(values.to_pylist())
                sizes.append(lengths.astype(np.int64))
                n_bytes += int(lengths.sum())
                if n_bytes >= target_bytes:
                    yield TextBatch(texts, np.concatenate(sizes), self._position())
                    texts, sizes, n_bytes = [], [], 0
            if texts:
                yield TextBatch(texts, np.concatenate(sizes), self._position())
        finally:
            tables.close()  # closes datasets' file readers now, not at interpreter exit


def _reading(source: TextSource, tables: Iterator[Any]) -> Iterator[Any]:
    """The stream's tables, with a failure to parse the source's content said as which file, where, and the fix
    (`datasets` raises a bare UnicodeDecodeError or pyarrow's ArrowInvalid, with a position inside its chunk)."""
    while True:
        try:
            table = next(tables)
        except StopIteration:
            return
        except TalmError:
            raise
        except (UnicodeError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
            raise SourceDataError(_describe_bad_content(source, err)) from None
        yield table


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


def text_file_problem(path: str) -> str | None:
    """The first place where a text file is not UTF-8, said as `talm.tokenizer.api.check_utf8` says it for
    train_tokenizer (one helper for both stages), or None."""
    from talm.tokenizer.api import check_utf8

    f = _open_local(path)
    if f is None:
        return None
    with f:
        try:
            check_utf8(f, path)
        except TalmError as err:
            return str(err)
    return None


def json_lines_problem(path: str) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object (torn, invalid, not UTF-8), or None."""
    f = _open_local(path)
    if f is None:
        return None
    with f:
        number = 0
        for number, line in enumerate(f, start=1):  # noqa: B007 (used after the loop)
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8"))
                if isinstance(value, dict):
                    continue
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
            return (
                f"{path!r} line {number} {why}: fix or delete that line (each line must be one JSON object), "
                "then rerun"
            )
    return None


def _describe_bad_content(source: TextSource, err: BaseException) -> str:
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


def _missing_column(source: TextSource, columns: list[str]) -> TalmError:
    return TalmError(
        f"{source.source} ({source.config}) has no column {source.text_column!r}: pass the column holding the text "
        f"with --text-column (its columns: {', '.join(columns)})"
    )


def _import_datasets() -> Any:
    """Import `datasets` without letting it import torch (2+ s of start-up this stage does not need)."""
    if "datasets" in sys.modules:
        return sys.modules["datasets"]
    previous = os.environ.get("USE_TORCH")
    os.environ["USE_TORCH"] = "0"
    try:
        import datasets
    finally:
        if previous is None:
            del os.environ["USE_TORCH"]
        else:
            os.environ["USE_TORCH"] = previous
    version = tuple(int(p) for p in re.findall(r"\d+", datasets.__version__)[:3])
    if version < (5, 0, 1):
        raise TalmError(
            f"datasets {datasets.__version__} resumes streams wrongly: upgrade it (pip install 'datasets>=5.0.1')"
        )
    return datasets


def _load(datasets: Any, source: TextSource, extra: dict[str, Any]) -> Any:
    """`datasets.load_dataset(..., streaming=True)` with its failures turned into one-line TalmErrors."""
    try:
        return datasets.load_dataset(**source.load_args, **extra, split="train", streaming=True)
    except ConnectionError as err:
        raise _hub_unreachable(source, str(err)) from None
    except datasets.exceptions.DatasetNotFoundError:
        raise TalmError(
            f"dataset {source.source!r} was not found on the Hub: check the name, or log in with `hf auth login` "
            "if it is gated"
        ) from None
    except ValueError as err:
        # e.g. a config the (local copy of the) repo does not have: datasets lists the available ones
        raise TalmError(f"cannot open {source.source} config {source.config!r}: {err}") from None
    except (datasets.exceptions.DataFilesNotFoundError, FileNotFoundError) as err:
        raise TalmError(f"cannot open {source.source}: {err}: check the files or the local copy") from None


def _open(source: TextSource, *, num_workers: int, worker_index: int) -> Any:
    """The source as a streaming `IterableDataset` of Arrow batches (this worker's part of it)."""
    if source.from_hub:
        check_hub_reachable(source)
    datasets = _import_datasets()
    from datasets.distributed import split_dataset_by_node

    # errors too: a file datasets cannot parse is reported by talm in one line (see `_reading`)
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    dataset = _load(datasets, source, {})
    if dataset.features is not None and source.text_column not in dataset.features:
        raise _missing_column(source, list(dataset.features))
    if dataset.info.builder_name == "parquet" and dataset.features is not None and len(dataset.features) > 1:
        # Read only the text column: the others (urls, ids, metadata) would cost as much to decode as the text.
        dataset = _load(datasets, source, {"columns": [source.text_column]})
    if num_workers > 1:
        dataset = split_dataset_by_node(dataset, rank=worker_index, world_size=num_workers)
    # Arrow batches: the text column goes to Python in bulk, not row by row through dicts.
    return dataset.with_format("arrow")
