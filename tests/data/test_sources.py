"""Dataset presets and source resolution: what the config names becomes a `TextSource` (no stream is opened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from talm.config import validate
from talm.data.config import DATASET_PRESETS, DownloadConfig
from talm.data.sources import resolve_source
from talm.errors import TalmError


def config(**kw: object) -> DownloadConfig:
    return validate(DownloadConfig, kw)


# ------------------------------------------------------------------------------------------------ presets


def test_presets_are_data_with_the_real_repos() -> None:
    assert DATASET_PRESETS["fineweb"].source == "HuggingFaceFW/fineweb"
    assert DATASET_PRESETS["fineweb"].default_config == "sample-10BT"
    assert DATASET_PRESETS["fineweb-edu"].source == "HuggingFaceFW/fineweb-edu"
    assert DATASET_PRESETS["smol"].source == "HuggingFaceTB/smollm-corpus"
    assert DATASET_PRESETS["smol"].configs == ["cosmopedia-v2", "fineweb-edu-dedup"]
    assert config(dataset="smol").out_dir == Path("data/smol/cosmopedia-v2")
    assert config(dataset="fineweb", ds_sample="CC-MAIN-2024-10", dir_prefix="x").out_dir == Path(
        "data/fineweb/x_CC-MAIN-2024-10"
    )
    assert config(dataset="fineweb-edu", ds_sample="sample-350BT").sample == "sample-350BT"
    assert config(dataset="tinyshakespeare").out_dir == Path("data/tinyshakespeare/default")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"dataset": "webtext"},
            "unknown dataset 'webtext': choose one of fineweb, fineweb-edu, smol, smoltalk, gsm8k, ultrafeedback, tinyshakespeare",
        ),
        (
            {"dataset": "fineweb", "ds_sample": "sample-1T"},
            "one of sample-10BT, sample-100BT, sample-350BT, default",
        ),
        ({"dataset": "fineweb", "ds_sample": "CC-MAIN-24"}, "or a dump like CC-MAIN-2024-10"),
        ({"dataset": "smol", "ds_sample": "fineweb-edu"}, "one of cosmopedia-v2, fineweb-edu-dedup"),
        (
            {"dataset": "smol", "ds_sample": "python-edu"},
            "python-edu' of HuggingFaceTB/smollm-corpus holds no text",
        ),
        ({"dataset": "../etc"}, "not a plain name"),
        ({"dataset": "fineweb", "dir_prefix": "a/b"}, "--dir-prefix 'a/b' is not a plain name"),
        ({"dataset": "fineweb", "num_workers": 4, "worker_index": 4}, "pass an index from 0 to 3"),
        ({"dataset": "fineweb", "shard_size": 0}, "shard_size=0"),
    ],
)
def test_bad_configs_say_what_is_valid(kw: dict, message: str) -> None:
    with pytest.raises(TalmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(**kw)


def test_token_counts_accept_scientific_notation() -> None:
    cfg = config(dataset="fineweb", max_tokens="1e9", shard_size="5e7")
    assert (cfg.max_tokens, cfg.shard_size) == (1_000_000_000, 50_000_000)
    assert cfg.val_target == 10_000_000
    assert config(dataset="fineweb", max_tokens="1e6").val_target == 100_000  # capped at a tenth
    assert config(dataset="x", data_files=["f"], val_tokens=0).val_target == 0


# ------------------------------------------------------------------------------------------------ local files


def test_data_files_globs_directories_and_types(in_tmp: Path) -> None:
    (in_tmp / "corpus" / "sub").mkdir(parents=True)
    for name in ("a.jsonl", "sub/b.jsonl", "sub/c.jsonl.gz", "notes.md"):
        (in_tmp / "corpus" / name).write_bytes(b"")
    src = resolve_source(config(dataset="mine", data_files=["corpus"]))
    assert src.files == ["corpus/a.jsonl", "corpus/sub/b.jsonl", "corpus/sub/c.jsonl.gz"]
    assert src.load_args["path"] == "json" and src.config == "default"
    src = resolve_source(config(dataset="mine", data_files=["corpus/*.jsonl"]))
    assert src.files == ["corpus/a.jsonl"]
    with pytest.raises(TalmError, match="matches no file"):
        resolve_source(config(dataset="mine", data_files=["nothing*.parquet"]))
    (in_tmp / "x.txt").write_text("hi")
    with pytest.raises(TalmError, match="mixes file types"):
        resolve_source(config(dataset="mine", data_files=["x.txt", "corpus/a.jsonl"]))
    with pytest.raises(TalmError, match=r"cannot read .*notes\.md"):
        resolve_source(config(dataset="mine", data_files=["corpus/notes.md"]))
