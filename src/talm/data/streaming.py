"""Reading a `TextSource`: a resumable stream of documents' texts, optionally one worker's part of it.

Everything is read with Hugging Face `datasets` in streaming mode, so a sample of hundreds of GB is never
downloaded first. The stream yields batches of texts together with the stream position after them
(`IterableDataset.state_dict()`), which is what makes an interrupted run resumable. `datasets`' failures (no
network, no such repo or config, unparsable content) become one-line TalmErrors. No tokenizing happens here.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from talm.data.conversations import content_bytes, conversation_rows
from talm.data.jsonrows import JsonRows
from talm.data.preferences import pair_bytes
from talm.data.sources import SourceDataError, TextSource, describe_bad_content, missing_column
from talm.errors import TalmError

__all__ = ["SourceDataError", "TextBatch", "TextStream"]

# A quick look at the Hub before streaming from it: datasets would otherwise retry for tens of seconds.
_HUB_PROBE_TIMEOUT_S = 10
ROWS_PER_READ = 1024  # rows per Arrow batch taken from `datasets`; texts are then grouped by bytes


def _hub_unreachable(source: TextSource, why: str) -> TalmError:
    return TalmError(
        f"could not reach the Hugging Face Hub for {source.source} ({why}): use a local copy, either with "
        f"--data-files PATH_OR_GLOB or as a directory ./{source.source} laid out like the repo, or set "
        "HF_ENDPOINT to a reachable mirror"
    )


def hub_unreachable(repo_id: str, kind: str = "datasets") -> str | None:
    """Why the Hub cannot be reached (one bounded request for `repo_id`'s api page), or None when it answered or
    HF_HUB_OFFLINE asks for the local cache only. datasets itself retries for minutes before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # the user asked for the local cache only; datasets says what is missing
    url = f"{constants.ENDPOINT.rstrip('/')}/api/{kind}/{repo_id}"
    try:
        with urllib.request.urlopen(url, timeout=_HUB_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return None  # it answered (maybe 401/404): reachable; datasets reports what is wrong with the repo
    except (urllib.error.URLError, OSError) as err:
        return f"{constants.ENDPOINT}: {getattr(err, 'reason', err)}"
    return None


def check_hub_reachable(source: TextSource) -> None:
    """Fail in seconds, with the way out, when the Hub cannot be reached."""
    why = hub_unreachable(source.source)
    if why is not None:
        raise _hub_unreachable(source, why)


@dataclass
class TextBatch:
    """Consecutive documents of the stream, and the stream position just after the last of them."""

    texts: list[Any]  # texts (None or "" for documents without text), or conversations' messages; local JSON
    # rows as parsed, of any type (checked by the encoder, which counts and names a malformed one)
    utf8_bytes: np.ndarray  # int64, UTF-8 length of each text (0 for None)
    state: dict[str, Any]  # the stream position after this batch: resume from here
    places: list[str] | None = None  # where each row is ("'chats.jsonl' line 7"), when the reader knows
    ends_val: bool = False  # its last row ends the source's own val split (`TextSource.val_split`)


def reads_json_itself(source: TextSource) -> bool:
    """Local JSON files are read by talm (jsonrows.py), each row with its own types; the rest by `datasets`."""
    return bool(source.files) and source.load_args.get("path") == "json"


class TextStream:
    """A resumable stream of documents' texts from a `TextSource`, optionally one worker's part of it."""

    def __init__(self, source: TextSource, *, num_workers: int = 1, worker_index: int = 0) -> None:
        self.source = source
        split = {"num_workers": num_workers, "worker_index": worker_index}
        self._reader: JsonRows | DatasetReads | SplitReads
        if reads_json_itself(source):
            self._reader = JsonRows(source, **split)
        elif source.val_split:
            parts = (source.val_split, source.train_split)
            self._reader = SplitReads([DatasetReads(source, _open(source, part, **split)) for part in parts])
        else:
            self._reader = DatasetReads(source, _open(source, source.train_split, **split))

    def state_dict(self) -> dict[str, Any]:
        """The stream position (after the last batch yielded), as plain JSON-able data."""
        return self._reader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reader.load_state_dict(state)

    def batches(self, target_bytes: int = 4 << 20, rows_per_read: int | None = None) -> Iterator[TextBatch]:
        """Texts in stream order, grouped into batches of about `target_bytes` of UTF-8 (whole reads of
        `rows_per_read` rows, the granularity of the stream positions)."""
        texts: list[Any] = []
        sizes: list[np.ndarray] = []
        places: list[str] | None = [] if isinstance(self._reader, JsonRows) else None
        n_bytes = 0
        for values, row_bytes, where, ends_val in self._reads(rows_per_read or ROWS_PER_READ):
            texts.extend(values)
            sizes.append(row_bytes)
            n_bytes += int(row_bytes.sum())
            if places is not None:
                places.extend(where)
            if n_bytes >= target_bytes or ends_val:  # a batch never spans the val split's end
                yield TextBatch(texts, np.concatenate(sizes), self.state_dict(), places, ends_val)
                texts, sizes, n_bytes = [], [], 0
                places = None if places is None else []
        if texts:
            yield TextBatch(texts, np.concatenate(sizes), self.state_dict(), places)

    def _reads(self, rows_per_read: int) -> Iterator[tuple[list[Any], np.ndarray, list[str], bool]]:
        if isinstance(self._reader, SplitReads):
            yield from self._reader.reads(rows_per_read)
            return
        if isinstance(self._reader, DatasetReads):
            for values, row_bytes, where in self._reader.reads(rows_per_read):
                yield values, row_bytes, where, False
            return
        measure = _text_bytes
        if self.source.conversations or self.source.preferences:
            measure = pair_bytes if self.source.preferences else content_bytes
        for values, where in self._reader.reads(rows_per_read):
            yield values, np.fromiter(map(measure, values), dtype=np.int64, count=len(values)), where, False


def _text_bytes(value: Any) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


class SplitReads:
    """Splits of a repo read one after the other (its own val split, then its train split); the position is
    (which split, that split's position). Every split but the last ends with an empty read that says so."""

    def __init__(self, parts: list[DatasetReads]) -> None:
        self.parts, self.part = parts, 0

    def state_dict(self) -> dict[str, Any]:
        return {"part": self.part, "state": self.parts[self.part].state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or sorted(state) != ["part", "state"]:
            raise TalmError(
                "the interrupted run being resumed read the source another way (an earlier talm): rerun with "
                "--overwrite to start afresh"
            )
        self.part = int(state["part"])
        self.parts[self.part].load_state_dict(state["state"])

    def reads(self, rows_per_read: int) -> Iterator[tuple[list[Any], np.ndarray, list[str], bool]]:
        for part in range(self.part, len(self.parts)):
            self.part = part
            for values, row_bytes, where in self.parts[part].reads(rows_per_read):
                yield values, row_bytes, where, False
            if part < len(self.parts) - 1:  # an empty read marks the end (the position is still this split's)
                yield [], np.zeros(0, dtype=np.int64), [], True


class DatasetReads:
    """A `datasets` IterableDataset of Arrow batches, read as the text column's values (texts, or conversations'
    messages) and their UTF-8 bytes; its state_dict() is the stream position."""

    def __init__(self, source: TextSource, dataset: Any) -> None:
        self.source, self._dataset = source, dataset
        self._loaded: dict[str, Any] | None = None  # a loaded position not yet reached by iterating

    def state_dict(self) -> dict[str, Any]:
        # datasets reports its initial state between load_state_dict() and the next read: not where we are; and
        # a copy, as datasets may keep mutating the dicts it returned (seen after load_state_dict)
        return copy.deepcopy(self._loaded if self._loaded is not None else self._dataset.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._dataset.load_state_dict(copy.deepcopy(state))  # datasets mutates the dict it is given
        self._loaded = copy.deepcopy(state)

    def reads(self, rows_per_read: int) -> Iterator[tuple[list[Any], np.ndarray, list[str]]]:
        import pyarrow as pa
        import pyarrow.compute as pc

        column = self.source.text_column
        tables = self._dataset.iter(batch_size=rows_per_read)
        try:
            for table in _reading(self.source, tables):
                self._loaded = None
                if column not in table.column_names:
                    raise missing_column(self.source, table.column_names)
                values = table.column(column)
                if (
                    self.source.preferences
                ):  # prompt, chosen, rejected: checked and rendered by preferences.py
                    rows = table.select(
                        [c for c in self.source.columns if c in table.column_names]
                    ).to_pylist()
                    yield rows, np.fromiter(map(pair_bytes, rows), dtype=np.int64, count=len(rows)), []
                elif self.source.conversations:  # lists of messages, checked and rendered by conversations.py
                    rows, row_bytes = conversation_rows(self.source, values)
                    yield rows, row_bytes, []
                elif not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                    hint = (
                        " (conversations, lists of messages: add --conversations)"
                        if pa.types.is_list(values.type)
                        else ""
                    )
                    raise TalmError(
                        f"column {column!r} of {self.source.source} holds {values.type}, not text{hint}: pass the "
                        f"text column with --text-column (columns: {', '.join(table.column_names)})"
                    )
                else:
                    lengths = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
                    yield values.to_pylist(), lengths.astype(np.int64), []
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
            raise SourceDataError(describe_bad_content(source, err)) from None
        yield table


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


def _load(datasets: Any, source: TextSource, split: str, extra: dict[str, Any]) -> Any:
    """`datasets.load_dataset(..., streaming=True)` with its failures turned into one-line TalmErrors."""
    try:
        return datasets.load_dataset(**source.load_args, **extra, split=split, streaming=True)
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


def _open_quietly(source: TextSource, split: str) -> tuple[Any, Any]:
    """(the datasets module, a split of the source as a streaming dataset), the Hub checked first; datasets' own
    logs and progress bars off, its errors too: a file it cannot parse is said by talm in one line (`_reading`)."""
    if source.from_hub:
        check_hub_reachable(source)
    datasets = _import_datasets()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    return datasets, _load(datasets, source, split, {})


def _open(source: TextSource, split: str, *, num_workers: int, worker_index: int) -> Any:
    """A split of the source as a streaming `IterableDataset` of Arrow batches (this worker's part of it)."""
    datasets, dataset = _open_quietly(source, split)
    from datasets.distributed import split_dataset_by_node

    features = dataset.features
    needed = ["chosen", "rejected"] if source.preferences else [source.text_column]
    for column in needed:
        if features is not None and column not in features:
            raise missing_column(replace(source, text_column=column), list(features))
    if dataset.info.builder_name == "parquet" and features is not None and len(features) > 1:
        # Read only the text columns: the others (urls, ids, metadata) would cost as much to decode as the text.
        dataset = _load(datasets, source, split, {"columns": [c for c in source.columns if c in features]})
    if num_workers > 1:
        dataset = split_dataset_by_node(dataset, rank=worker_index, world_size=num_workers)
    # Arrow batches: the text column goes to Python in bulk, not row by row through dicts.
    return dataset.with_format("arrow")


def split_rows(source: TextSource, split: str, columns: list[str]) -> Iterator[dict[str, Any]]:
    """The `columns` of every row of one split of a Hub source (or its local copy laid out like the repo), in
    order: what prompt data (talm.data.prompts), small and written whole, reads."""
    _, dataset = _open_quietly(source, split)
    if dataset.features is not None:
        missing = [c for c in columns if c not in dataset.features]
        if missing:
            raise TalmError(
                f"the {split!r} split of {source.source} ({source.config}) has no column(s) {', '.join(missing)} "
                f"(its columns: {', '.join(dataset.features)}): pass the column holding the prompts with "
                "--text-column"
            )
    tables = dataset.with_format("arrow").iter(batch_size=ROWS_PER_READ)
    try:
        for table in _reading(source, tables):
            yield from table.select(columns).to_pylist()
    finally:
        tables.close()
