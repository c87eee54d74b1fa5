"""The data-directory format: shard checks against the manifest (cheap: header and size only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from talm.data.manifest import Shard, open_shard, shard_problem
from talm.errors import TalmError


def write(path: Path, ids: list[int], dtype: str = "uint16") -> Shard:
    np.save(path, np.array(ids, dtype=dtype), allow_pickle=False)
    return Shard(path, "train", len(ids), None)


def test_a_good_shard_opens_as_a_read_only_map(tmp_path: Path) -> None:
    shard = write(tmp_path / "s.npy", [1, 2, 3])
    assert shard_problem(shard.path, 3, np.dtype("uint16")) is None
    mm = open_shard(shard, np.dtype("uint16"), vocab_size=4)
    assert mm.tolist() == [1, 2, 3] and not mm.flags.writeable


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: p.unlink(), "is missing"),
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), "truncated"),
        (lambda p: p.write_bytes(b"\x00" * 64 + p.read_bytes()[64:]), "no valid .npy header"),
        (lambda p: np.save(p, np.array([1, 2, 3], dtype="int64")), "manifest lists 3 of uint16"),
        (lambda p: np.save(p, np.array([1, 2], dtype="uint16")), "holds 2 tokens"),
        (
            lambda p: np.save(p, np.array([{"a": 1}, 2, 3], dtype=object), allow_pickle=True),
            "not 1-D token ids",
        ),
    ],
)
def test_a_damaged_shard_is_named_with_the_fix(tmp_path: Path, damage, expected: str) -> None:
    shard = write(tmp_path / "s.npy", [1, 2, 3])
    damage(shard.path)
    with pytest.raises(TalmError, match=expected) as err:
        open_shard(shard, np.dtype("uint16"))
    assert "s.npy" in str(err.value) and "--overwrite" in str(err.value)


def test_ids_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    shard = write(tmp_path / "s.npy", [1, 2, 999])
    with pytest.raises(TalmError, match="token id 999, outside the vocabulary of 500"):
        open_shard(shard, np.dtype("uint16"), vocab_size=500)
