"""ShardWriter (with its ShardDir): shard boundaries, counts, dtype, manifest, val/train split, resume, repair."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import fill_disk_in_shard
from hypothesis import given, settings
from hypothesis import strategies as st

import talm.data.shard_dir
from talm.data.manifest import manifest_paths, shard_name
from talm.data.shard_dir import npy_header
from talm.data.writer import ShardWriter, TokenBatch
from talm.errors import TalmError

EOT = 1000


def make_writer(out_dir: Path, **kw: Any) -> ShardWriter:
    args = {"dtype": np.uint16, "shard_size": 10, "val_tokens": 0, "max_tokens": None}
    args.update(kw)
    return ShardWriter(
        out_dir, header={"dataset": "t", "source": "s", "config": "c"}, arguments={"a": 1}, **args
    )


def batches_of(docs: list[list[int]], cuts: list[int], dtype: Any = np.uint16) -> list[TokenBatch]:
    """Token batches of the documents (each: eot + ids; [] is a document without text), cut at `cuts`."""
    edges = [0, *sorted(set(c for c in cuts if 0 < c < len(docs))), len(docs)]
    out = []
    for k, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        group = docs[a:b]
        parts = [np.array([EOT, *d], dtype=dtype) for d in group if d]
        tokens = np.concatenate(parts) if parts else np.empty(0, dtype)
        lens = np.array([len(d) + 1 if d else 0 for d in group], dtype=np.int64)
        nbytes = np.array([3 * len(d) for d in group], dtype=np.int64)
        out.append(TokenBatch(tokens, lens, nbytes, {"batch": k}))
    return out


class Killed(Exception):
    pass


def run_writer(
    writer: ShardWriter, batches: list[TokenBatch], *, kill_after_manifests: int | None = None
) -> None:
    """Feed the batches (from the resume position, if any) like write_shards does; optionally die right after
    the n-th manifest write, as a kill -9 would."""
    if kill_after_manifests is not None:
        original, count = writer._write_manifest, [0]

        def write_then_maybe_die() -> None:
            original()
            count[0] += 1
            if count[0] == kill_after_manifests:
                raise Killed

        writer._write_manifest = write_then_maybe_die  # type: ignore[method-assign]
    start = writer.resume_state["batch"] if writer.resume_state else 0
    for batch in batches[start:]:
        if writer.add(batch):
            return
    writer.finish()


def dir_contents(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_shard_boundaries_counts_and_manifest(tmp_path: Path) -> None:
    docs = [[1, 2, 3], [4, 5], [], [6, 7, 8, 9, 10, 11], [12], [], [13, 14, 15, 16]]
    writer = make_writer(tmp_path / "d", shard_size=5, val_tokens=6)
    assert writer.open() == "new"
    run_writer(writer, batches_of(docs, [2, 5]))
    m = json.loads((tmp_path / "d" / "meta.json").read_text())
    # val = whole documents until >= 6 tokens: [eot 1 2 3][eot 4 5] = 7 tokens, cut into shards of 5 + 2;
    # train = the other 14 tokens: 5 + 5 + 4
    assert [(s["file"], s["split"], s["tokens"]) for s in m["shards"]] == [
        ("val_000000.npy", "val", 5),
        ("val_000001.npy", "val", 2),
        ("train_000002.npy", "train", 5),
        ("train_000003.npy", "train", 5),
        ("train_000004.npy", "train", 4),
    ]
    stream = np.concatenate([np.array([EOT, *d]) for d in docs if d])
    written = np.concatenate([np.load(tmp_path / "d" / s["file"]) for s in m["shards"]])
    assert written.dtype == np.uint16 and np.array_equal(written, stream)
    # documents are counted in the shard holding their eot; bytes (3 per token here) add up per split
    assert [s["documents"] for s in m["shards"]] == [2, 0, 1, 2, 0]
    assert sum(s["bytes"] for s in m["shards"] if s["split"] == "val") == 3 * 5
    assert sum(s["bytes"] for s in m["shards"] if s["split"] == "train") == 3 * 11
    assert m["totals"] == {"tokens": 21, "documents": 5, "bytes": 48, "empty_documents": 2}
    assert m["complete"] is True and m["resume"] is None
    for key in ("format", "dataset", "source", "config", "dtype", "shard_size", "shards"):
        assert key in m
    assert m["format"] == "talm.shards/1" and m["dtype"] == "uint16" and m["shard_size"] == 5
    assert [s["file"] for s in m["shards"] if s["split"] == "val"] == [
        shard_name("val", i, "") for i in (0, 1)
    ]
    assert manifest_paths(tmp_path / "d") == [tmp_path / "d" / "meta.json"]


def test_max_tokens_cuts_training_exactly_and_val_is_extra(tmp_path: Path) -> None:
    docs = [[i] * 4 for i in range(1, 20)]
    writer = make_writer(tmp_path / "d", shard_size=7, val_tokens=3, max_tokens=12)
    writer.open()
    run_writer(writer, batches_of(docs, [3, 4, 9]))
    m = writer.state_dict()
    assert sum(s["tokens"] for s in m["shards"] if s["split"] == "train") == 12
    assert [s["tokens"] for s in m["shards"] if s["split"] == "val"] == [5]  # one whole document
    assert m["complete"]


def test_uint32_keeps_ids_above_65535(tmp_path: Path) -> None:
    docs = [[65535, 65536, 70000], [99999]]
    writer = make_writer(tmp_path / "d", dtype=np.uint32, shard_size=100)
    writer.open()
    run_writer(writer, batches_of(docs, [], dtype=np.uint32))
    shard = np.load(tmp_path / "d" / "train_000000.npy")
    assert shard.dtype == np.uint32 and shard.tolist() == [EOT, 65535, 65536, 70000, EOT, 99999]
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["dtype"] == "uint32"


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    shard_size=st.integers(1, 30),
    val_tokens=st.integers(0, 40),
    max_tokens=st.one_of(st.none(), st.integers(1, 200)),
    kill=st.integers(1, 12),
)
def test_resume_after_a_kill_is_identical(
    lengths: list[int], cuts: list[int], shard_size: int, val_tokens: int, max_tokens: int | None, kill: int
) -> None:
    docs = [list(range(1 + i, 1 + i + n)) for i, n in enumerate(lengths)]
    if not any(docs):
        docs[0] = [7]
    batches = batches_of(docs, cuts)
    kw = {"shard_size": shard_size, "val_tokens": val_tokens, "max_tokens": max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        clean, interrupted = Path(tmp) / "clean", Path(tmp) / "interrupted"
        try:
            writer = make_writer(clean, **kw)
            writer.open()
            run_writer(writer, batches)
        except TalmError as err:
            assert "validation split" in str(err)  # the stream ended inside the val split: nothing is left
            assert not clean.exists()
            return
        expected = dir_contents(clean)
        writer = make_writer(interrupted, **kw)
        writer.open()
        try:
            run_writer(writer, batches, kill_after_manifests=kill)
        except Killed:
            resumed = make_writer(interrupted, **kw)
            assert resumed.open() in ("resume", "complete")
            run_writer(resumed, batches)
        assert dir_contents(interrupted) == expected
        # the stream is the documents in order, cut after max_tokens training tokens
        m = json.loads(expected["meta.json"])
        stream = np.concatenate([np.array([EOT, *d]) for d in docs if d])
        got = np.concatenate([np.frombuffer(expected[s["file"]][128:], np.uint16) for s in m["shards"]])
        assert np.array_equal(got, stream[: len(got)])
        val = sum(s["tokens"] for s in m["shards"] if s["split"] == "val")
        ends = np.cumsum([len(d) + 1 for d in docs if d])
        assert val == 0 if val_tokens == 0 else (val in ends and val >= val_tokens)  # whole documents only
        train = sum(s["tokens"] for s in m["shards"] if s["split"] == "train")
        assert train == (len(stream) - val if max_tokens is None else min(max_tokens, len(stream) - val))
        assert all(s["tokens"] == shard_size for s in m["shards"][:-1] if s["split"] == "train")
        if max_tokens is None:
            assert m["totals"]["empty_documents"] == lengths.count(0) - (not any(lengths))
            assert m["totals"]["documents"] == sum(1 for d in docs if d)


def test_shards_are_written_as_np_save_writes_them(tmp_path: Path) -> None:
    """Tokens stream to the shard's temp file; the committed file is byte for byte what np.save writes."""
    docs = [[i % 900, i % 7] * (i % 5) for i in range(300)]
    batches = batches_of(docs, [17, 90, 91, 200])
    writer = make_writer(tmp_path / "out", shard_size=100, val_tokens=30)
    writer.open()
    run_writer(writer, batches)
    stream = np.concatenate([b.tokens for b in batches])
    m = json.loads((tmp_path / "out" / "meta.json").read_text())
    offset = 0
    for s in m["shards"]:
        expected = tmp_path / "expected.npy"
        np.save(expected, stream[offset : offset + s["tokens"]])
        assert (tmp_path / "out" / s["file"]).read_bytes() == expected.read_bytes()
        offset += s["tokens"]
    assert offset == len(stream)
    assert len(npy_header(np.dtype(np.uint32), 5)) == len(npy_header(np.dtype(np.uint32), 10**12))


def test_disk_full_mid_shard_keeps_directory_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = [[i, i + 1, i + 2] for i in range(1, 40)]
    batches = batches_of(docs, [10, 20, 30])
    clean = make_writer(tmp_path / "clean", shard_size=16, val_tokens=8)
    clean.open()
    run_writer(clean, batches)

    fill_disk_in_shard(monkeypatch, 4)  # the 4th shard: part of it reaches the disk, then the disk is full
    out = tmp_path / "full"
    writer = make_writer(out, shard_size=16, val_tokens=8)
    writer.open()
    with pytest.raises(TalmError, match="No space left on device.*rerun the same command to resume"):
        run_writer(writer, batches)
    m = json.loads((out / "meta.json").read_text())
    assert len(m["shards"]) == 3 and not m["complete"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json", *(s["file"] for s in m["shards"])])
    for s in m["shards"]:
        assert len(np.load(out / s["file"])) == s["tokens"]
    monkeypatch.delattr(talm.data.shard_dir, "open")
    resumed = make_writer(out, shard_size=16, val_tokens=8)
    assert resumed.open() == "resume"
    run_writer(resumed, batches)
    assert dir_contents(out) == dir_contents(tmp_path / "clean")


def test_open_refuses_other_arguments_and_cleans_strays(tmp_path: Path) -> None:
    out = tmp_path / "d"
    writer = make_writer(out, shard_size=4)
    writer.open()
    with pytest.raises(Killed):
        run_writer(writer, batches_of([[1, 2, 3]] * 5, [2]), kill_after_manifests=2)
    (out / "train_000002.npy").write_bytes(b"written but not yet in the manifest")
    (out / ".train_000003.npy.tmp").write_bytes(b"half")
    other = ShardWriter(out, header={}, arguments={"a": 2}, dtype=np.uint16, shard_size=4, val_tokens=0)
    with pytest.raises(TalmError, match=r"other arguments \(a 1 -> 2\).*--overwrite"):
        other.open()
    again = make_writer(out, shard_size=4)
    assert again.open() == "resume"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train_000000.npy", "train_000001.npy"]
    fresh = ShardWriter(out, header={}, arguments={"a": 2}, dtype=np.uint16, shard_size=4, val_tokens=0)
    assert fresh.open(overwrite=True) == "new"
    assert list(out.iterdir()) == []


def test_worker_layouts_do_not_mix(tmp_path: Path) -> None:
    out = tmp_path / "d"
    for index in range(2):
        w = make_writer(out, worker_index=index, num_workers=2)
        w.open()
        run_writer(w, batches_of([[index + 1] * 3] * 4, []))
    assert sorted(p.name for p in out.glob("meta*")) == ["meta.w000-of-002.json", "meta.w001-of-002.json"]
    assert (out / "train.w001-of-002_000000.npy").exists()
    single = make_writer(out)
    with pytest.raises(TalmError, match="different number of workers"):
        single.open()
    assert single.open(overwrite=True) == "new"
    assert list(out.iterdir()) == []
