"""Preference data: the ultrafeedback preset on a local copy laid out like the Hub repo (its own held-out split as
val), --data-files --preferences in each row layout, one document per pair with masks on each side's last reply,
malformed pairs skipped and named, exact resume, the manifest's kind, and bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.hub_layout import ultrafeedback_table, write_ultrafeedback

from talm.data.config import DownloadConfig
from talm.data.manifest import LEARN, REJECTED, START, read_data
from talm.data.preferences import fit_side, split_pair
from talm.data.prepare import prepare
from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat

BASE = Path(__file__).resolve().parents[2] / "tokenizers" / "base.json"


def triples(n: int, offset: int = 0) -> list[tuple[str, str, str]]:
    return [(f"What is {i} plus {i}?", f"It is {2 * i}.", f"no idea {i}") for i in range(offset, offset + n)]


def config(**kwargs) -> DownloadConfig:
    return DownloadConfig.model_validate({"tokenizer_path": str(BASE), **kwargs})


def pairs_in(
    out_dir: Path, split: str
) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
    """Each stored pair of a split: ((chosen ids, learn), (rejected ids, learn)), read back through the flags."""
    shards = read_data(out_dir, splits=()).split(split)
    ids = np.concatenate([np.load(s.path) for s in shards])
    flags = np.concatenate([np.load(s.mask_path) for s in shards])
    starts = [*np.flatnonzero(flags & START).tolist(), len(ids)]
    out = []
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        sides = split_pair(ids[a:b], flags[a:b])
        out.append(tuple((i.tolist(), m.astype(int).tolist()) for i, m in sides))
    return out


def expected(chat: ChatFormat, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """A side as it must be stored: the conversation's ids, learning only the reply (and its <|endoftext|>)."""
    ids, learn = chat.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}])
    return ids, learn


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(Tokenizer.from_file(BASE))


def test_ultrafeedback_writes_test_prefs_as_val_and_train_prefs_as_train(
    in_tmp: Path, chat: ChatFormat
) -> None:
    train, test = triples(60), triples(15, offset=1000)
    write_ultrafeedback(
        in_tmp, {"train_prefs": ultrafeedback_table(train), "test_prefs": ultrafeedback_table(test)}
    )
    result = prepare(config(dataset="ultrafeedback", shard_size=400), progress=False)
    assert result.out_dir == Path("data/ultrafeedback/default")
    meta = result.manifest
    assert meta["kind"] == "preferences" and meta["loss_mask"] and meta["complete"]
    assert meta["splits"] == {"val": "test_prefs", "train": "train_prefs"}
    for split, rows in (("val", test), ("train", train)):
        stored = pairs_in(result.out_dir, split)
        assert stored == [(expected(chat, p, c), expected(chat, p, r)) for p, c, r in rows]
    data = read_data(result.out_dir)
    assert data.kind == "preferences" and data.loss_mask


def test_only_the_last_reply_is_learned_in_a_multi_turn_pair(in_tmp: Path, chat: ChatFormat) -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    row = {
        "prompt": [*history, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": "5",
    }
    Path("p.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    out = prepare(config(dataset="p", data_files=["p.jsonl"], preferences=True, val_tokens=1), progress=False)
    (chosen, chosen_learn), (rejected, _) = pairs_in(out.out_dir, "train")[0]
    ids, learn = chat.render([*row["prompt"], {"role": "assistant", "content": "4"}])
    assert chosen == ids and learn != chosen_learn  # the history's "hello" is not learned
    assert sum(chosen_learn) == len(chat.tokenizer.encode("4")) + 1 and chosen_learn[-1] == 1
    assert rejected[:-3] == ids[:-3] or rejected[: len(ids) - 2] == ids[: len(ids) - 2]


@pytest.mark.parametrize(
    "layout",
    [
        lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r},
        lambda p, c, r: {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": {"role": "assistant", "content": r},
        },
        lambda p, c, r: {
            "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
            "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
        },
    ],
    ids=["prompt-and-texts", "prompt-and-messages", "whole-conversations"],
)
def test_each_row_layout_of_data_files_gives_the_same_pairs(in_tmp: Path, chat: ChatFormat, layout) -> None:
    rows = triples(30)
    Path("pairs.jsonl").write_text("".join(json.dumps(layout(*t)) + "\n" for t in rows))
    args = {"dataset": "mine", "data_files": ["pairs.jsonl"], "preferences": True, "val_tokens": 100}
    result = prepare(config(**args), progress=False)
    stored = pairs_in(result.out_dir, "val") + pairs_in(result.out_dir, "train")
    assert stored == [(expected(chat, p, c), expected(chat, p, r)) for p, c, r in rows]
    assert result.manifest["kind"] == "preferences" and result.manifest["totals"]["documents"] == 30


MALFORMED = [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "a"}, "a missing side: no 'rejected'"),
    (
        {"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]},
        "chosen: the last message is from 'user'; it must be from 'assistant'",
    ),
    (
        {
            "chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
        },
        "continue different conversations",
    ),
    ({"chosen": "a", "rejected": "b"}, "a reply without a prompt"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' is a number"),
]


def test_malformed_pairs_are_skipped_counted_and_named_by_line(in_tmp: Path, chat: ChatFormat) -> None:
    good = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples(12)]
    lines = (
        [json.dumps(good[0])] + [json.dumps(row) for row, _ in MALFORMED] + [json.dumps(g) for g in good[1:]]
    )
    Path("pairs.jsonl").write_text("\n".join(lines) + "\n")
    args = {"dataset": "mine", "data_files": ["pairs.jsonl"], "preferences": True, "val_tokens": 1}
    result = prepare(config(**args), progress=False)
    assert result.stats is not None and result.stats.malformed == len(MALFORMED)
    assert result.manifest["totals"]["documents"] == 12
    for (row, why), named in zip(MALFORMED, result.stats.first_malformed, strict=False):
        assert named.startswith(f"'pairs.jsonl' line {lines.index(json.dumps(row)) + 1}: ") and why in named
    assert len(pairs_in(result.out_dir, "val") + pairs_in(result.out_dir, "train")) == 12


def test_a_source_of_only_malformed_pairs_is_refused_and_leaves_nothing(in_tmp: Path) -> None:
    Path("pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row, _ in MALFORMED))
    args = {"dataset": "mine", "data_files": ["pairs.jsonl"], "preferences": True, "val_tokens": 1}
    with pytest.raises(
        TalmError, match="held no valid preference pair: 6 malformed ones skipped .the first: "
    ):
        prepare(config(**args), progress=False)
    assert not Path("data").exists()


def test_a_repo_without_a_rejected_column_is_refused_before_writing(in_tmp: Path) -> None:
    table = ultrafeedback_table(triples(10))
    table = table.drop(["rejected"])
    write_ultrafeedback(in_tmp, {"train_prefs": table, "test_prefs": table})
    with pytest.raises(
        TalmError, match="has no column 'rejected': preference pairs need the columns chosen and"
    ):
        prepare(config(dataset="ultrafeedback"), progress=False)
    assert not Path("data").exists()


class Killed(Exception):
    pass


def positionless(manifest: bytes) -> dict:
    """A manifest without its stream positions: `datasets` words the same position differently after a resume
    (shard_example_idx), so resumes are compared by the shards and manifests they write, not by that wording."""
    meta = json.loads(manifest)
    for entry in meta["shards"]:
        if entry.get("resume"):
            entry["resume"]["stream_state"] = entry["resume"]["stream_state"]["part"]
    return meta


@pytest.mark.parametrize("where", ["inside val", "end of val", "inside train"])
def test_an_interrupted_ultrafeedback_run_resumes_to_the_same_files(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Killed after a manifest write inside the val split, at its end, or inside train, a rerun ends with exactly
    the files of an uninterrupted run."""
    from talm.data.writer import ShardWriter

    write_ultrafeedback(
        in_tmp,
        {
            "train_prefs": ultrafeedback_table(triples(80)),
            "test_prefs": ultrafeedback_table(triples(20, 500)),
        },
    )
    args = {"dataset": "ultrafeedback", "shard_size": 300}
    monkeypatch.setattr(
        "talm.data.streaming.ROWS_PER_READ", 8
    )  # several reads per split: positions inside it
    monkeypatch.setattr("talm.data.prepare.BATCH_BYTES", 200)
    clean = prepare(config(**args, data_root="clean"), progress=False).out_dir
    val_shards = [s["split"] for s in json.loads((clean / "meta.json").read_text())["shards"]].count("val")
    assert val_shards >= 2
    die_at = {"inside val": 1, "end of val": val_shards, "inside train": val_shards + 2}[where]
    real, written = ShardWriter._write_manifest, [0]

    def die(self: ShardWriter) -> None:
        real(self)
        written[0] += 1
        if written[0] == die_at:
            raise Killed

    monkeypatch.setattr(ShardWriter, "_write_manifest", die)
    with pytest.raises(Killed):
        prepare(config(**args), progress=False)
    monkeypatch.setattr(ShardWriter, "_write_manifest", real)
    assert prepare(config(**args), progress=False).status == "resume"
    out = Path("data/ultrafeedback/default")
    contents = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}  # noqa: E731
    resumed, uninterrupted = contents(out), contents(clean)
    assert positionless(resumed.pop("meta.json")) == positionless(uninterrupted.pop("meta.json"))
    assert resumed == uninterrupted  # every shard and mask, byte for byte
    assert pairs_in(out, "val") == pairs_in(clean, "val") and pairs_in(out, "train") == pairs_in(
        clean, "train"
    )


def test_a_manifest_without_kind_reads_as_before(tmp_path: Path, tiny_data: Path) -> None:
    """Data written before the field: loss masks mean conversations, none text."""
    assert read_data(tiny_data).kind == "text"
    from fixtures.conversations import conversation_data

    out = conversation_data(tmp_path, conversations=60)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "conversations"
    del meta["kind"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert read_data(out).kind == "conversations"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            {"dataset": "ultrafeedback", "val_tokens": 100},
            "has its own validation split .test_prefs.*drop --val-tokens",
        ),
        (
            {"dataset": "m", "data_files": ["p.jsonl"], "preferences": True, "text_column": "x"},
            "--preferences reads the columns prompt, chosen and rejected: drop --text-column",
        ),
        (
            {"dataset": "m", "data_files": ["p.jsonl"], "preferences": True, "conversations": True},
            "exclude each other",
        ),
    ],
)
def test_contradictory_flags_are_refused(in_tmp: Path, args: dict, message: str) -> None:
    Path("p.jsonl").write_text("{}\n")
    with pytest.raises(TalmError, match=message):
        config(**args)


def test_preferences_need_jsonl_or_parquet(in_tmp: Path) -> None:
    Path("p.txt").write_text("hello\n")
    with pytest.raises(TalmError, match="--preferences reads .jsonl, .json or .parquet files"):
        prepare(config(dataset="m", data_files=["p.txt"], preferences=True), progress=False)


def test_the_cli_summary_counts_pairs_and_names_the_first_skipped(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from talm.cli.download_data import main

    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples(20)]
    rows.insert(5, {"prompt": "q", "chosen": "x", "rejected": "x"})
    Path("pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["mine", "--data-files", "pairs.jsonl", "--preferences", "-t", str(BASE), "--val-tokens", "50"])
    out = capsys.readouterr().out
    assert "20 preference pairs" in out
    assert "1 malformed skipped; the first: 'pairs.jsonl' line 6: chosen and rejected are identical" in out


def test_a_side_longer_than_the_context_loses_the_prompt_start_never_the_reply() -> None:
    ids = np.arange(10)
    learn = np.array([0] * 6 + [1] * 4, dtype=bool)  # the reply is ids 6..9, predicted from id 5 on
    assert fit_side(ids, learn, 10)[0].tolist() == list(range(10))  # fits: unchanged
    cut_ids, cut_learn = fit_side(ids, learn, 5)
    assert cut_ids.tolist() == [5, 6, 7, 8, 9] and cut_learn.tolist() == [False, True, True, True, True]
    assert fit_side(ids, learn, 4) is None  # the reply and the token before it need 5


def test_split_pair_cuts_at_the_rejected_flag() -> None:
    ids = np.arange(7)
    flags = np.array([START, 0, LEARN, LEARN, REJECTED, 0, LEARN], dtype=np.uint8)
    (c, cl), (r, rl) = split_pair(ids, flags)
    assert c.tolist() == [0, 1, 2, 3] and cl.tolist() == [False, False, True, True]
    assert r.tolist() == [4, 5, 6] and rl.tolist() == [False, False, True]


def test_make_preferences_writes_what_download_data_preferences_reads(in_tmp: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_preferences"
    subprocess.run(
        [sys.executable, str(script), "pairs.jsonl", "--count", "300"], check=True, capture_output=True
    )
    args = {"dataset": "p", "data_files": ["pairs.jsonl"], "preferences": True, "val_tokens": 500}
    result = prepare(config(**args), progress=False)
    assert result.stats is not None and result.stats.malformed == 0
    assert result.manifest["totals"]["documents"] == 300


def test_parquet_data_files_in_ultrafeedbacks_schema(in_tmp: Path, chat: ChatFormat) -> None:
    """Its extra columns (prompt_id, messages, scores) are not read; the whole conversations give the pairs."""
    import pyarrow.parquet as pq

    rows = triples(25)
    pq.write_table(ultrafeedback_table(rows), "prefs.parquet")
    args = {"dataset": "uf", "data_files": ["prefs.parquet"], "preferences": True, "val_tokens": 100}
    result = prepare(config(**args), progress=False)
    stored = pairs_in(result.out_dir, "val") + pairs_in(result.out_dir, "train")
    assert stored == [(expected(chat, p, c), expected(chat, p, r)) for p, c, r in rows]
