"""The resumable text stream over `datasets` (offline, on local copies of hub repos and local files)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BASE_TOKENIZER, SHAKESPEARE
from fixtures.hub_layout import (
    cosmopedia_table,
    fineweb_edu_dedup_table,
    fineweb_table,
    python_edu_table,
    sample_texts,
    write_hub_repo,
)

from talm.config import validate
from talm.data.config import DownloadConfig
from talm.data.prepare import prepare
from talm.data.sources import resolve_source
from talm.data.streaming import TextStream
from talm.errors import TalmError


def config(**kw: object) -> DownloadConfig:
    return validate(DownloadConfig, kw)


def all_texts(stream: TextStream, target_bytes: int = 2000) -> list[str | None]:
    return [t for batch in stream.batches(target_bytes, rows_per_read=16) for t in batch.texts]


# ------------------------------------------------------------------------------------------------ local files


def test_tinyshakespeare_streams_passages(in_tmp: Path) -> None:
    with pytest.raises(TalmError, match="not found in the current directory.*project root"):
        resolve_source(config(dataset="tinyshakespeare"))
    (in_tmp / "tiny-shakespeare.txt").write_bytes(SHAKESPEARE.read_bytes())
    texts = all_texts(TextStream(resolve_source(config(dataset="tinyshakespeare"))), 1 << 20)
    passages = SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")
    assert texts[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert len(texts) == len(passages) and texts[:50] == passages[:50]


def test_jsonl_and_text_columns(in_tmp: Path) -> None:
    rows = [{"content": f"doc {i}", "n": i} for i in range(50)] + [{"content": None, "n": 50}]
    Path("c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(dataset="mine", data_files=["c.jsonl"], text_column="content")
    assert all_texts(TextStream(resolve_source(cfg))) == [r["content"] for r in rows]
    with pytest.raises(TalmError, match="has no column 'text'.*--text-column.*content, n"):
        all_texts(TextStream(resolve_source(config(dataset="mine", data_files=["c.jsonl"]))))
    numbers = config(
        dataset="mine", data_files=["c.jsonl"], text_column="n", tokenizer_path=str(BASE_TOKENIZER)
    )
    assert all_texts(TextStream(resolve_source(numbers))) == list(range(51))  # as given: the encoder checks
    with pytest.raises(
        TalmError, match="held no text: 51 malformed rows skipped .*'c.jsonl' line 1: 'n' holds a"
    ):
        prepare(numbers, progress=False)


# ------------------------------------------------------------------------------------------------ hub layouts


def test_hub_layouts_with_real_schemas(in_tmp: Path) -> None:
    texts = sample_texts(300)
    write_hub_repo(
        in_tmp,
        "HuggingFaceFW/fineweb",
        {"sample-10BT": [fineweb_table(texts[:120]), fineweb_table(texts[120:])]},
    )
    write_hub_repo(
        in_tmp,
        "HuggingFaceTB/smollm-corpus",
        {
            "cosmopedia-v2": [cosmopedia_table(texts[:100])],
            "fineweb-edu-dedup": [fineweb_edu_dedup_table(texts[100:200])],
            "python-edu": [python_edu_table(10)],
        },
    )
    assert all_texts(TextStream(resolve_source(config(dataset="fineweb")))) == texts
    assert all_texts(TextStream(resolve_source(config(dataset="smol")))) == texts[:100]
    edu = resolve_source(config(dataset="smol", ds_sample="fineweb-edu-dedup"))
    assert all_texts(TextStream(edu)) == texts[100:200]
    # python-edu read as plain files (the preset refuses it): no text column, and the error lists the real ones
    files = config(dataset="py", data_files=["HuggingFaceTB/smollm-corpus/python-edu"])
    with pytest.raises(TalmError, match="no column 'text'.*blob_id, repo_name, path, length_bytes"):
        TextStream(resolve_source(files))


@pytest.mark.parametrize("workers", [1, 3])
def test_stream_resumes_exactly_from_its_state(in_tmp: Path, workers: int) -> None:
    texts = sample_texts(500)
    write_hub_repo(
        in_tmp,
        "HuggingFaceFW/fineweb",
        {"sample-10BT": [fineweb_table(texts[i : i + 125]) for i in range(0, 500, 125)]},
    )
    source = resolve_source(config(dataset="fineweb"))
    texts = all_texts(TextStream(source, num_workers=workers, worker_index=workers - 1))  # this worker's part
    for stop_after in (1, 2, 3):
        seen, resumed = stop_and_resume(
            lambda: TextStream(source, num_workers=workers, worker_index=workers - 1), stop_after, 3000, 16
        )
        assert seen + all_texts(resumed, 3000) == texts


def stop_and_resume(
    new_stream: Callable[[], TextStream], stop_after: int, budget: int, rows_per_read: int
) -> tuple[list[str | None], TextStream]:
    """The texts of a stream's first stop_after + 1 batches, and a new stream resumed from the state saved then
    (through JSON, as the manifest stores it), standing where the first stopped (datasets would say 0)."""
    seen: list[str | None] = []
    for k, batch in enumerate(new_stream().batches(budget, rows_per_read=rows_per_read)):
        seen += batch.texts
        if k == stop_after:
            state = batch.state
            break
    else:
        raise AssertionError("the stream is too short for this test")
    resumed = new_stream()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.state_dict() == state
    return seen, resumed


def test_worker_split_covers_every_document_once(in_tmp: Path) -> None:
    texts = sample_texts(200)
    Path("p").mkdir()
    for i in range(4):
        pq.write_table(pa.table({"text": texts[i * 50 : (i + 1) * 50]}), f"p/{i}.parquet", row_group_size=16)
    source = resolve_source(config(dataset="mine", data_files=["p"]))
    for workers in (2, 3):  # 4 files: split by file for 2 workers, by example for 3
        parts = [all_texts(TextStream(source, num_workers=workers, worker_index=i)) for i in range(workers)]
        assert all(parts)
        assert sorted(t for part in parts for t in part) == sorted(texts)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_fast_with_the_way_out(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    source = resolve_source(config(dataset="fineweb"))
    assert source.from_hub
    start = time.monotonic()
    with pytest.raises(TalmError) as err:
        TextStream(source)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "could not reach the Hugging Face Hub" in message
    assert "--data-files" in message and "./HuggingFaceFW/fineweb" in message and "HF_ENDPOINT" in message


@pytest.mark.parametrize("workers", [1, 3])
def test_local_json_rows_resume_exactly_and_split_over_workers(in_tmp: Path, workers: int) -> None:
    """Local JSON is read by talm row by row (jsonl.gz and a .json array too): the position is (file, line), a
    resumed stream continues exactly, and the workers' parts cover every row once."""
    import gzip

    texts = sample_texts(300)
    Path("a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n\n" for t in texts[:40]))
    with gzip.open("b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[40:200])
    source = resolve_source(config(dataset="mine", data_files=["a.jsonl", "b.jsonl.gz"]))
    parts = [all_texts(TextStream(source, num_workers=workers, worker_index=i)) for i in range(workers)]
    assert sorted(t for part in parts for t in part) == sorted(texts[:200])
    mine = parts[-1]
    for stop_after in (0, 2):  # inside the first file, inside the second
        seen, resumed = stop_and_resume(
            lambda: TextStream(source, num_workers=workers, worker_index=workers - 1),
            stop_after,
            1000 * (4 - workers),
            4,
        )
        assert seen + all_texts(resumed, 3000) == mine
    Path("c.json").write_text(json.dumps([{"text": t} for t in texts[200:]]))
    array = resolve_source(config(dataset="mine", data_files=["c.json"]))
    batches = list(TextStream(array).batches(2000, rows_per_read=16))
    assert [t for b in batches for t in b.texts] == texts[200:]
    assert batches[0].places is not None and batches[0].places[1] == "'c.json' item 2"
    resumed = TextStream(array)
    resumed.load_state_dict(batches[1].state)
    assert all_texts(resumed) == [t for b in batches[2:] for t in b.texts]


def test_a_position_of_another_reader_is_refused_with_the_way_out(in_tmp: Path) -> None:
    Path("a.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    stream = TextStream(resolve_source(config(dataset="mine", data_files=["a.jsonl"])))
    with pytest.raises(TalmError, match="read its JSON files another way .*--overwrite"):
        stream.load_state_dict({"examples_iterable": {"shard_idx": 0, "shard_example_idx": 3}})
