"""TokenLoader and EvalSlice over memory-mapped shards (docs/design.md §2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from talm.data.manifest import read_data
from talm.errors import TalmError
from talm.train.loader import EvalSlice, TokenLoader

T = 16


def window_index(data, row: np.ndarray) -> tuple[str, int]:
    """Which (shard, window) a (T+1)-token row was cut from (windows start at multiples of T)."""
    for shard in data.split("train"):
        mm = np.load(shard.path, mmap_mode="r")
        for w in range((shard.tokens - 1) // T):
            if np.array_equal(mm[w * T : w * T + T + 1], row):
                return shard.path.name, w
    raise AssertionError("row is not a window of any train shard")


def rows(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return torch.cat([x, y[:, -1:]], dim=1).numpy()


def test_batches_are_offset_by_one_and_cut_from_shard_windows(tiny_data: Path) -> None:
    data = read_data(tiny_data)
    loader = TokenLoader(data, batch_size=4, context_length=T, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, T) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in rows(x, y):
        window_index(data, row)
    assert all(isinstance(m, np.memmap) for m in loader._maps._maps.values())  # never a loaded copy


def test_one_epoch_visits_every_window_once_and_epochs_differ(tiny_data: Path) -> None:
    data = read_data(tiny_data)
    loader = TokenLoader(data, batch_size=50, context_length=T, seed=3)
    total = loader.total_windows
    seen = [rows(*loader.next_batch()) for _ in range(total // 50)]
    flat = np.concatenate(seen)
    assert len({r.tobytes() for r in flat}) == len(flat) == (total // 50) * 50
    assert loader.epoch == 0
    nxt = rows(*loader.next_batch())
    assert loader.epoch == 1 and not np.array_equal(nxt, seen[0])  # reshuffled for the new epoch
    other_seed = TokenLoader(data, batch_size=50, context_length=T, seed=4)
    assert not np.array_equal(rows(*other_seed.next_batch()), seen[0])


def test_ranks_read_disjoint_windows_that_together_equal_one_process(tiny_data: Path) -> None:
    data = read_data(tiny_data)
    single = TokenLoader(data, batch_size=3, context_length=T, seed=1)
    ranks = [TokenLoader(data, batch_size=3, context_length=T, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        a, b = (rows(*loader.next_batch()) for loader in ranks)
        assert not {r.tobytes() for r in a} & {r.tobytes() for r in b}
        # a single process accumulating two micro-batches sees exactly the same windows
        both = np.concatenate([rows(*single.next_batch()), rows(*single.next_batch())])
        assert np.array_equal(np.concatenate([a, b]), both)


def test_state_dict_round_trip_resumes_exactly(tiny_data: Path) -> None:
    data = read_data(tiny_data)
    loader = TokenLoader(data, batch_size=40, context_length=T, seed=7)
    for _ in range(loader.total_windows // 40 - 1):  # close to the end of the epoch
        loader.next_batch()
    state = loader.state_dict()
    expected = [rows(*loader.next_batch()) for _ in range(4)]  # crosses into epoch 1
    assert loader.epoch == 1
    fresh = TokenLoader(data, batch_size=40, context_length=T, seed=7)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert all(np.array_equal(rows(*fresh.next_batch()), e) for e in expected)


def test_manifests_of_several_workers_are_merged(tiny_data: Path, tmp_path: Path) -> None:
    d = tmp_path / "data"
    shutil.copytree(tiny_data, d)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").unlink()
    shards = meta["shards"]
    for i, part in enumerate((shards[:2], shards[2:])):
        (d / f"meta.w{i:03d}-of-002.json").write_text(json.dumps({**meta, "shards": part}))
    data = read_data(d)
    assert sorted(s.path.name for s in data.shards) == sorted(s["file"] for s in shards)
    other = {**meta, "shards": [], "tokenizer": {**meta["tokenizer"], "fingerprint": "different"}}
    (d / "meta.w002-of-003.json").write_text(json.dumps(other))
    with pytest.raises(TalmError, match="disagree on the tokenizer"):
        read_data(d)


def test_eval_slice_is_fixed_and_split_over_ranks(tiny_data: Path) -> None:
    data = read_data(tiny_data)
    whole = EvalSlice(data, eval_tokens=40 * T, context_length=T, batch_size=8)
    assert len(whole.windows) == 40 and whole.tokens == 40 * T
    first = [rows(x, y) for x, y in whole]
    assert all(np.array_equal(a, b) for a, b in zip(first, [rows(x, y) for x, y in whole], strict=True))
    val = np.load(data.split("val")[0].path)
    assert np.array_equal(first[0][0], val[: T + 1])  # the slice starts at the start of the val split
    parts = [
        EvalSlice(data, eval_tokens=40 * T, context_length=T, batch_size=8, rank=r, world_size=2)
        for r in (0, 1)
    ]
    union = sorted(r.tobytes() for p in parts for x, y in p for r in rows(x, y))
    assert union == sorted(r.tobytes() for b in first for r in b)
    tpb = data.tokens_per_byte("val")
    shard = json.loads((tiny_data / "meta.json").read_text())["shards"][0]
    assert tpb == pytest.approx(shard["tokens"] / shard["bytes"])


def test_bad_data_directories(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(TalmError, match="not found"):
        read_data(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TalmError, match="no manifest"):
        read_data(tmp_path / "empty")
    d = tmp_path / "noval"
    shutil.copytree(tiny_data, d)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(
        json.dumps({**meta, "shards": [s for s in meta["shards"] if s["split"] != "val"]})
    )
    with pytest.raises(TalmError, match="no val shards"):
        read_data(d)
    (d / "meta.json").write_text(json.dumps({**meta, "shards": []}))
    with pytest.raises(TalmError, match="no train shards"):
        read_data(d)
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "train_000002.npy").unlink()
    with pytest.raises(TalmError, match="missing"):
        read_data(d)
    data = read_data(tiny_data)
    with pytest.raises(TalmError, match="too few for one window"):
        EvalSlice(data, eval_tokens=100, context_length=100_000, batch_size=1)
    with pytest.raises(TalmError, match="fewer than one batch"):
        TokenLoader(data, batch_size=10_000, context_length=T, seed=0)


def test_check_shards_and_seed_range(tiny_data: Path, tmp_path: Path) -> None:
    from talm.train.loader import check_shards

    check_shards(read_data(tiny_data))  # intact: nothing to say
    d = tmp_path / "data"
    shutil.copytree(tiny_data, d)
    shard = sorted(d.glob("train_*.npy"))[-1]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(TalmError, match=rf"shard '{shard}' is .* bytes, not the .* its header promises"):
        check_shards(read_data(d))
    for seed in (-1, 2**63):
        with pytest.raises(TalmError, match=f"--seed {seed} is out of range"):
            TokenLoader(read_data(tiny_data), batch_size=4, context_length=T, seed=seed)
