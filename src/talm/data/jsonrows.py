"""Local JSON-lines and JSON files read row by row, each row keeping its own types.

`datasets`' JSON loader gives a column one type over a chunk of rows: one row whose message content is a number
(or OpenAI-style content parts) turns every content of its chunk into JSON text ('"Hi"', quotes and all), and
which rows that hits depends on where chunks fall. So talm parses local JSON itself with Python's json module:
each row is what its line says, a row of the wrong type is that row's problem (counted and named by line where
it is encoded), and the stream position is (file, line), exact for resuming. Hub repos (and local copies laid
out like them) still stream through `datasets` (streaming.py).

A file is JSON lines (one object per line, blank lines skipped), or, for .json, one JSON array of objects (or
of strings, each read as {"text": ...}, as `datasets` does). A line that is not a JSON object stops the run
with the place and the fix (`sources.json_line_problem`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from talm.data.sources import SourceDataError, TextSource, json_line_problem, missing_column, open_data_file
from talm.errors import TalmError


class JsonRows:
    """The text column's value in each row of a source's local JSON files, in file order, with where each row
    is ("'chats.jsonl' line 7"); a worker takes rows worker_index, worker_index + num_workers, ..."""

    def __init__(self, source: TextSource, *, num_workers: int = 1, worker_index: int = 0) -> None:
        self.source, self.files, self.column = source, source.files, source.text_column
        self.num_workers, self.worker_index = num_workers, worker_index
        # the next line (or array item) to read, and rows read so far by all workers (what the split counts)
        self.position = {"file": 0, "line": 0, "row": 0}

    def state_dict(self) -> dict[str, Any]:
        return {"json_rows": dict(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        inner = state.get("json_rows") if isinstance(state, dict) else None
        if not isinstance(inner, dict) or sorted(inner) != ["file", "line", "row"]:
            raise TalmError(
                "the interrupted run being resumed read its JSON files another way (an earlier talm): rerun "
                "with --overwrite to start afresh"
            )
        self.position = {k: int(v) for k, v in inner.items()}

    def reads(self, rows_per_read: int) -> Iterator[tuple[list[Any], list[str]]]:
        """This worker's rows in reads of `rows_per_read`: (values of the column, None where a row lacks it;
        where each row is). `position` is just after a read's last row when it is handed over."""
        values: list[Any] = []
        places: list[str] = []
        while self.position["file"] < len(self.files):
            path = self.files[self.position["file"]]
            for number, row in self._rows_of(path, skip=self.position["line"]):
                self.position["line"] = abs(number)
                self.position["row"] += 1
                if self.position["row"] == 1 and self.column not in row:
                    raise missing_column(self.source, list(row))
                if (self.position["row"] - 1) % self.num_workers != self.worker_index:
                    continue
                values.append(self._value(row))
                places.append(f"{path!r} {'line' if number > 0 else 'item'} {abs(number)}")
                if len(values) >= rows_per_read:
                    yield values, places
                    values, places = [], []
            self.position = {"file": self.position["file"] + 1, "line": 0, "row": self.position["row"]}
        if values:
            yield values, places

    def rows_of(self, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every row of one file, whole (all its columns), with where it is ("'x.jsonl' line 7")."""
        for number, row in self._rows_of(path, skip=0):
            yield f"{path!r} {'line' if number > 0 else 'item'} {abs(number)}", row

    def _value(self, row: dict[str, Any]) -> Any:
        """What the encoder gets of a row: its text column's value, or a preference pair's columns."""
        if self.source.preferences:
            return {k: row[k] for k in self.source.columns if k in row}
        return row.get(self.column)

    def _rows_of(self, path: str, *, skip: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, or minus the item number in a JSON array; the row) of each row after the first `skip`
        lines (items)."""
        with open_data_file(path) as f:
            head = f.read(1 << 16).lstrip(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not content
            if head.lstrip()[:1] == b"[":
                yield from _array_rows(path, head + f.read(), skip)
                return
            f.seek(0)
            for number, line in enumerate(f, start=1):
                if number <= skip or not line.strip():
                    continue
                if number == 1:
                    line = line.lstrip(b"\xef\xbb\xbf")
                try:
                    row = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    row = None
                if not isinstance(row, dict):
                    raise SourceDataError(json_line_problem(path, number, line))
                yield number, row


def _array_rows(path: str, data: bytes, skip: int) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        items = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceDataError(
            f"{path!r} is not valid JSON ({err}): write one JSON object per line (JSON lines), or make it one "
            "JSON array of objects"
        ) from None
    for i, item in enumerate(items, start=1):
        if i <= skip:
            continue
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise SourceDataError(
                f"{path!r} item {i} holds a JSON {type(item).__name__}, not an object: fix or delete it "
                "(each item must be one JSON object), then rerun"
            )
        yield -i, item
