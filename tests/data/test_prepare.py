"""The read -> tokenize -> write pipeline (`tokenize_batch`, `write_shards`) on a stand-in stream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BASE_TOKENIZER

import talm.data.prepare
from talm.data.prepare import tokenize_batch, write_shards
from talm.data.streaming import TextBatch
from talm.data.writer import ShardWriter
from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer


def make_writer(out_dir: Path, **kw: Any) -> ShardWriter:
    args = {"dtype": np.uint16, "shard_size": 10, "val_tokens": 0, "max_tokens": None}
    args.update(kw)
    return ShardWriter(
        out_dir, header={"dataset": "t", "source": "s", "config": "c"}, arguments={"a": 1}, **args
    )


def test_tokenize_batch_dtype_follows_the_tokenizer() -> None:
    class Big:  # a tokenizer whose vocabulary needs uint32
        eot_id = 70_000
        token_dtype = np.dtype(np.uint32)

        def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[np.ndarray]:
            return [np.array([66_000 + len(t)], dtype=np.uint32) for t in texts]

    batch = tokenize_batch(Big(), ["ab", None, "", "abc"], np.array([2, 0, 0, 3]), {})
    assert batch.tokens.dtype == np.uint32
    assert batch.tokens.tolist() == [70_000, 66_002, 70_000, 66_003]
    assert batch.doc_tokens.tolist() == [2, 0, 0, 2]


class ListStream:
    """A stand-in for streaming.TextStream: batches of texts with integer positions as the state."""

    def __init__(self, batches: list[list[str | None]], fail_at: int | None = None) -> None:
        self._batches, self._next, self._fail_at = batches, 0, fail_at

    def state_dict(self) -> dict[str, int]:
        return {"next": self._next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._next = state["next"]

    def batches(self, target_bytes: int) -> Any:
        while self._next < len(self._batches):
            if self._next == self._fail_at:
                raise TalmError("the source broke")
            texts = self._batches[self._next]
            self._next += 1
            sizes = np.array([len((t or "").encode()) for t in texts], dtype=np.int64)
            yield TextBatch(texts, sizes, self.state_dict())


def test_write_shards_pipeline_with_the_real_tokenizer(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(BASE_TOKENIZER)
    texts = [f"Document {i}: some text, ünïcode ✓ {'la ' * (i % 13)}" for i in range(300)]
    texts[5], texts[17] = None, ""
    batches = [texts[i : i + 37] for i in range(0, 300, 37)]
    writer = make_writer(tmp_path / "d", shard_size=500, val_tokens=200, dtype=tok.token_dtype)
    writer.open()
    stats = write_shards(ListStream(batches), tok, writer, progress=False)
    m = writer.state_dict()
    assert m["complete"] and stats.empty_documents == 2 and stats.documents == 298
    stream = np.concatenate([np.load(tmp_path / "d" / s["file"]) for s in m["shards"]])
    docs = [tok.decode(part[1:]) for part in np.split(stream, np.flatnonzero(stream == tok.eot_id))[1:]]
    assert docs == [t for t in texts if t]
    assert m["totals"]["bytes"] == sum(len(t.encode()) for t in texts if t)


def test_write_shards_raises_the_readers_error(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(BASE_TOKENIZER)
    writer = make_writer(tmp_path / "d", shard_size=50, dtype=tok.token_dtype)
    writer.open()
    with pytest.raises(TalmError, match="the source broke"):
        write_shards(ListStream([["a b c"] * 20] * 5, fail_at=3), tok, writer, progress=False)
    assert not writer.state_dict()["complete"]
    assert not list((tmp_path / "d").glob(".*.tmp"))  # the shard being written was dropped


def test_progress_lines_without_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logs get a progress line every PROGRESS_INTERVAL_S (here shortened), and nothing without the flag."""
    tok = Tokenizer.from_file(BASE_TOKENIZER)
    batches = [[f"text number {i} " * 20] * 10 for i in range(6)]
    monkeypatch.setattr(talm.data.prepare, "PROGRESS_INTERVAL_S", 0.0)
    for lines in (True, False):
        writer = make_writer(tmp_path / str(lines), shard_size=400, dtype=tok.token_dtype, max_tokens=10**6)
        writer.open()
        write_shards(ListStream(batches), tok, writer, progress=False, progress_lines=lines)
        out, err = capsys.readouterr()
        assert out == ""
        if not lines:
            assert err == ""
            continue
        got = err.splitlines()
        assert len(got) == len(batches)
        assert all(line.startswith("download_data: ") and " tokens, " in line for line in got)
        assert got[-1].endswith("MB/s)") and "60 documents" in got[-1] and "%) tokens" in got[-1]


def test_the_data_stage_imports_no_torch() -> None:
    code = (
        "import sys, talm.cli.download_data, talm.data.prepare, talm.tokenizer.api; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
