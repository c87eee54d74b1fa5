"""Conversation data: the smoltalk preset on a local copy laid out like the Hub repo (its real configs, file
layout and schema), --data-files --conversations, token and loss-mask shards, malformed conversations skipped
and counted, resumability, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from talm.data.config import DownloadConfig
from talm.data.manifest import LEARN, MASK_DTYPE, START, mask_name, read_data
from talm.data.prepare import prepare
from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat

BASE = Path(__file__).resolve().parents[2] / "tokenizers" / "base.json"
MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))  # smoltalk's `messages`


def conversation(i: int) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}]
    turns.append(
        {"role": "assistant", "content": f"It is {2 * i}. naïve café 🙂" if i % 5 == 0 else str(2 * i)}
    )
    if i % 3 == 0:
        turns = [{"role": "system", "content": "You are a helpful assistant."}, *turns]
    if i % 4 == 0:
        turns += [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome."}]
    return turns


MALFORMED = [
    [{"role": "user", "content": "no answer"}],  # does not end with the assistant
    [{"role": "assistant", "content": "first"}],  # starts with the assistant
    [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],  # unknown role
    [],  # empty
    [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}],  # null content
]


def rows(n: int, *, malformed_every: int = 0) -> list[list[dict[str, str]]]:
    out = []
    for i in range(n):
        out.append(conversation(i))
        if malformed_every and i % malformed_every == malformed_every - 1:
            out.append(MALFORMED[(i // malformed_every) % len(MALFORMED)])
    return out


def write_smoltalk(root: Path, configs: dict[str, list[list[dict]]]) -> None:
    """./HuggingFaceTB/smoltalk as on the Hub: data/CONFIG/{train,test}-0000i-of-0000n.parquet, columns
    messages (and source in `all`), README.md mapping each config's train and test splits."""
    repo = root / "HuggingFaceTB" / "smoltalk"
    yaml = ["---", "configs:"]
    for config, conversations in configs.items():
        sub = repo / "data" / config
        sub.mkdir(parents=True)
        halves = [conversations[: len(conversations) // 2], conversations[len(conversations) // 2 :]]
        for i, part in enumerate(halves):
            columns = {"messages": pa.array(part, MESSAGES)}
            if config == "all":
                columns["source"] = pa.array(["everyday-conversations"] * len(part), pa.string())
            pq.write_table(pa.table(columns), sub / f"train-{i:05d}-of-00002.parquet", row_group_size=50)
        test = {"messages": pa.array(conversations[:5], MESSAGES)}
        pq.write_table(pa.table(test), sub / "test-00000-of-00001.parquet")
        yaml += [f"- config_name: {config}", "  data_files:"]
        yaml += [f"  - split: {s}\n    path: data/{config}/{s}-*" for s in ("train", "test")]
    (repo / "README.md").write_text("\n".join([*yaml, "---", "# local copy", ""]), encoding="utf-8")


def stream_of(out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's tokens and flags, val first then train, in stream order."""
    data = read_data(out_dir, splits=("train",))
    shards = data.split("val") + data.split("train")
    ids = np.concatenate([np.load(s.path) for s in shards])
    flags = np.concatenate([np.load(s.mask_path) for s in shards])
    return ids, flags


def conversations_in(ids: np.ndarray, flags: np.ndarray) -> list[tuple[list[int], list[int]]]:
    starts = [*np.flatnonzero(flags & START).tolist(), len(ids)]
    return [
        (ids[a:b].tolist(), (flags[a:b] & LEARN).tolist())
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]


@pytest.fixture(scope="module")
def chat() -> ChatFormat:
    return ChatFormat(Tokenizer.from_file(BASE))


def config(**kwargs) -> DownloadConfig:
    return DownloadConfig.model_validate({"tokenizer_path": str(BASE), "val_tokens": 300, **kwargs})


def test_smoltalk_from_a_hub_layout_copy_gives_each_conversation_with_its_mask(
    in_tmp: Path, chat: ChatFormat
) -> None:
    convs = rows(200, malformed_every=20)
    write_smoltalk(in_tmp, {"everyday-conversations": convs, "all": convs[:50]})
    result = prepare(
        config(dataset="smoltalk", ds_sample="everyday-conversations", shard_size=1000), progress=False
    )
    assert result.out_dir == Path("data/smoltalk/everyday-conversations")
    meta = result.manifest
    assert meta["loss_mask"] is True and meta["complete"] and meta["text_column"] == "messages"
    assert (
        meta["totals"]["documents"] == 200 and meta["totals"]["empty_documents"] == 10
    )  # malformed: skipped
    for shard in meta["shards"]:
        tokens, flags = (
            np.load(result.out_dir / shard["file"]),
            np.load(result.out_dir / mask_name(shard["file"])),
        )
        assert flags.dtype == MASK_DTYPE and len(flags) == len(tokens) == shard["tokens"]
    ids, flags = stream_of(result.out_dir)
    assert conversations_in(ids, flags) == [chat.render(c) for c in convs if c not in MALFORMED]
    assert result.stats is not None and "must be from 'assistant'" in result.stats.first_malformed[0]
    assert read_data(result.out_dir).loss_mask


def test_the_all_config_with_its_extra_column(in_tmp: Path, chat: ChatFormat) -> None:
    write_smoltalk(in_tmp, {"all": rows(60)})
    result = prepare(config(dataset="smoltalk", ds_sample="all", val_tokens=0), progress=False)
    assert conversations_in(*stream_of(result.out_dir)) == [chat.render(c) for c in rows(60)]


def test_an_unknown_smoltalk_config_is_refused_naming_the_real_ones() -> None:
    with pytest.raises(TalmError, match="smol-magpie-ultra"):
        config(dataset="smoltalk", ds_sample="smol-magic")


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_data_files_with_a_named_messages_column(in_tmp: Path, chat: ChatFormat, suffix: str) -> None:
    convs = rows(80)
    if suffix == "jsonl":
        Path("chats.jsonl").write_text(
            "".join(json.dumps({"id": i, "turns": c}) + "\n" for i, c in enumerate(convs))
        )
    else:
        pq.write_table(pa.table({"turns": pa.array(convs, MESSAGES)}), "chats.parquet")
    cfg = config(dataset="mine", data_files=[f"chats.{suffix}"], conversations=True, text_column="turns")
    result = prepare(cfg, progress=False)
    assert conversations_in(*stream_of(result.out_dir)) == [chat.render(c) for c in convs]


def test_the_messages_column_is_the_default_and_text_data_has_no_masks(in_tmp: Path) -> None:
    Path("chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in rows(40)))
    assert config(dataset="mine", data_files=["chats.jsonl"], conversations=True).column == "messages"
    Path("text.txt").write_text("one paragraph\n\nanother one\n\n" * 50)
    text = prepare(config(dataset="t", data_files=["text.txt"], val_tokens=10), progress=False)
    assert "loss_mask" not in text.manifest and not read_data(text.out_dir).loss_mask
    assert not list(text.out_dir.glob("*.mask.npy"))


def test_all_malformed_is_refused_and_leaves_nothing(in_tmp: Path) -> None:
    Path("bad.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in MALFORMED * 3))
    with pytest.raises(TalmError, match="no valid conversation: 15 malformed ones skipped") as err:
        prepare(config(dataset="bad", data_files=["bad.jsonl"], conversations=True), progress=False)
    assert len(str(err.value).splitlines()) == 1
    assert not Path("data").exists()


def test_a_text_column_is_refused_as_conversations(in_tmp: Path) -> None:
    Path("t.jsonl").write_text("".join(json.dumps({"messages": "just text"}) + "\n" for _ in range(5)))
    with pytest.raises(
        TalmError, match="held no valid conversation: 5 malformed ones skipped .*--text-column"
    ):
        prepare(config(dataset="t", data_files=["t.jsonl"], conversations=True), progress=False)
    pq.write_table(pa.table({"messages": ["just text"] * 5}), "t.parquet")  # a typed column: refused as such
    with pytest.raises(TalmError, match="not lists of messages: pass the column"):
        prepare(config(dataset="t", data_files=["t.parquet"], conversations=True), progress=False)


def test_conversations_need_jsonl_or_parquet(in_tmp: Path) -> None:
    Path("t.txt").write_text("hello\n")
    with pytest.raises(TalmError, match="--conversations reads .jsonl, .json or .parquet"):
        prepare(config(dataset="t", data_files=["t.txt"], conversations=True), progress=False)


class Killed(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_files(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dying right after the 3rd manifest write (as a kill -9 would, between shards), then rerunning, gives
    exactly the files of an uninterrupted run; so does a deleted mask shard, made again from its resume point."""
    from talm.data.writer import ShardWriter

    Path("chats.jsonl").write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in rows(300, malformed_every=7))
    )
    args = {"dataset": "c", "data_files": ["chats.jsonl"], "conversations": True, "shard_size": 700}
    clean = prepare(config(**args, data_root="clean"), progress=False).out_dir
    real, written = ShardWriter._write_manifest, [0]

    def die_after_three(self: ShardWriter) -> None:
        real(self)
        written[0] += 1
        if written[0] == 3:
            raise Killed

    monkeypatch.setattr(ShardWriter, "_write_manifest", die_after_three)
    with pytest.raises(Killed):
        prepare(config(**args), progress=False)
    monkeypatch.setattr(ShardWriter, "_write_manifest", real)
    out = Path("data/c/default")
    assert not json.loads((out / "meta.json").read_text())["complete"]
    assert prepare(config(**args), progress=False).status == "resume"
    contents = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}  # noqa: E731
    assert contents(out) == contents(clean)
    (out / "train_000003.mask.npy").unlink()
    again = prepare(config(**args), progress=False)
    assert again.repaired and "train_000003.mask.npy" in again.repaired
    assert contents(out) == contents(clean)


def test_the_cli_summary_counts_conversations_and_skipped(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from talm.cli.download_data import main

    shutil.copyfile(BASE, "base.json")
    Path("chats.jsonl").write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in rows(50, malformed_every=10))
    )
    main(["mine", "--data-files", "chats.jsonl", "--conversations", "-t", "base.json", "--val-tokens", "100"])
    out = capsys.readouterr().out
    assert "50 conversations" in out and "5 malformed skipped; the first: 'chats.jsonl' line 11: " in out


def test_one_odd_row_is_that_rows_problem_not_every_rows(in_tmp: Path, chat: ChatFormat) -> None:
    """A message whose content is a number among good rows: the good rows are written exactly as given (not as
    JSON text, '"Question 0..."'), the odd one is skipped, counted and named by its line. (datasets' JSON loader
    made the whole column JSON text.) OpenAI-style text parts are joined; other parts make the row malformed."""
    good = rows(60)
    odd = [{"role": "user", "content": 7}, {"role": "assistant", "content": "seven"}]
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
    ]
    image = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
        {"role": "assistant", "content": "A cat."},
    ]
    written = [*good[:30], odd, *good[30:], parts, image]
    Path("chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in written))
    result = prepare(config(dataset="c", data_files=["chats.jsonl"], conversations=True), progress=False)
    joined = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]
    assert conversations_in(*stream_of(result.out_dir)) == [chat.render(c) for c in [*good, joined]]
    assert result.stats is not None and result.stats.malformed == 2
    assert result.stats.first_malformed == [
        "'chats.jsonl' line 31: message 0's content is a number, not text",
        "'chats.jsonl' line 63: message 0's content is a list of content parts that are not all text parts "
        "({'type': 'text', 'text': str})",
    ]


def test_one_odd_text_row_is_that_rows_problem(in_tmp: Path) -> None:
    """Plain text JSON lines: a row whose text is a number is skipped and named; every other document is
    written exactly as given; a row without the column is an empty document, as a null text is."""
    tok = Tokenizer.from_file(BASE)
    texts = [f"Document {i}: some text, naïve café." for i in range(40)]
    lines = [json.dumps({"text": t}) for t in texts]
    lines[12] = json.dumps({"text": 12})
    lines[20] = json.dumps({"other": "no text here"})
    Path("docs.jsonl").write_text("\n".join(lines) + "\n")
    result = prepare(config(dataset="d", data_files=["docs.jsonl"], val_tokens=50), progress=False)
    data = read_data(result.out_dir)
    ids = np.concatenate([np.load(s.path) for s in data.split("val") + data.split("train")])
    cuts = np.flatnonzero(ids == tok.eot_id)
    documents = [tok.decode(d[1:].tolist()) for d in np.split(ids, cuts[1:])]
    assert documents == [t for i, t in enumerate(texts) if i not in (12, 20)]
    assert result.stats is not None and result.stats.malformed == 1
    assert result.stats.first_malformed == ["'docs.jsonl' line 13: 'text' holds a number, not text"]
    assert result.manifest["totals"]["empty_documents"] == 2


def test_content_parts_in_parquet_are_joined(in_tmp: Path, chat: ChatFormat) -> None:
    """Typed (parquet, Hub) rows go through the same check: text parts joined, as from JSON lines."""
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    schema = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(part))]))
    convs = [
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": f"Hi {i}, "}, {"type": "text", "text": "ok?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": f"Fine {i}."}]},
        ]
        for i in range(40)
    ]
    pq.write_table(pa.table({"messages": pa.array(convs, schema)}), "parts.parquet")
    cfg = config(dataset="p", data_files=["parts.parquet"], conversations=True, val_tokens=0)
    result = prepare(cfg, progress=False)
    joined = [
        [{"role": "user", "content": f"Hi {i}, ok?"}, {"role": "assistant", "content": f"Fine {i}."}]
        for i in range(40)
    ]
    assert conversations_in(*stream_of(result.out_dir)) == [chat.render(c) for c in joined]
