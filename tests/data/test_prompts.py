"""Prompt data (talm.data.prompts): GSM8K's answers read as lm-eval's flexible-extract reads them, `download_data
gsm8k` on a local copy laid out like openai/gsm8k, your own prompt files with --prompts, and readers that refuse
the wrong kind of data in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BASE_TOKENIZER, one_line_error
from fixtures.hub_layout import GSM8K_ROWS, write_gsm8k_repo

from talm.cli.download_data import main
from talm.data.prompts import answers_match, final_number, read_prompts, reference_answer
from talm.errors import TalmError
from talm.tokenizer.api import Tokenizer
from talm.tokenizer.chat import ChatFormat


@pytest.mark.parametrize(
    ("reply", "number"),
    [
        ("Natalia sold 48+24 = 72 clips.", "72"),
        ("The answer is $1,250.", "1250"),
        ("first 3, then 4, so 7.", "7"),
        ("It is -5", "-5"),
        ("0.5 of them", "0.5"),
        ("no number here...", None),
        ("12 apples and 30 pears", "30"),  # the last number, not the first
    ],
)
def test_the_final_number_of_a_reply(reply: str, number: str | None) -> None:
    assert final_number(reply) == number


def test_references_and_matching() -> None:
    assert reference_answer(GSM8K_ROWS[0]["answer"]) == "72"
    assert reference_answer("It makes 5,000 toys.\n#### 5,000") == "5000"
    assert reference_answer(68) == "68" and reference_answer(" 68 ") == "68"
    assert answers_match("so she has 5,000.", "5000")
    assert not answers_match("so she has 5,001.", "5000")
    assert not answers_match("I do not know", "5000")
    assert not answers_match("72 or 73", "72")  # the final number counts


def test_download_gsm8k_from_a_local_copy(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_gsm8k_repo(project)
    main(["gsm8k", "--ds-sample", "socratic"])
    assert "3 train prompts" in capsys.readouterr().out
    data = read_prompts("data/gsm8k/socratic")
    assert [p.answer for p in data.splits["train"]] == ["72", "10", "5000"]
    assert [p.answer for p in data.splits["val"]] == ["4"]  # the test split is held out
    chat = ChatFormat(Tokenizer.from_file(BASE_TOKENIZER))
    question = [{"role": "user", "content": GSM8K_ROWS[0]["question"]}]
    assert list(data.splits["train"][0].ids) == chat.render_prompt(question)
    meta = json.loads(Path("data/gsm8k/socratic/meta.json").read_text())
    assert meta["kind"] == "prompts" and meta["config"] == "socratic"
    before = Path("data/gsm8k/socratic/train.prompts.jsonl").stat().st_mtime_ns
    main(["gsm8k", "--ds-sample", "socratic"])  # the same again: nothing to do
    assert "already complete" in capsys.readouterr().out
    assert Path("data/gsm8k/socratic/train.prompts.jsonl").stat().st_mtime_ns == before


def test_your_own_prompt_files(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"prompt": f"What is {i} + 1?", "answer": i + 1} for i in range(20)]
    rows[5] = {"prompt": ["not", "messages"], "answer": "1"}
    rows[6] = {"prompt": "What is 1 + 1?", "answer": None}
    rows[7] = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
               "answer": "#### 4"}  # fmt: skip
    Path("sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["sums", "--data-files", "sums.jsonl", "--prompts", "--val-prompts", "3"])
    out = capsys.readouterr().out
    assert "2 malformed skipped" in out and "'sums.jsonl' line 6" in out
    data = read_prompts("data/sums/default", vocab_size=1024)
    assert [p.answer for p in data.splits["val"]] == ["1", "2", "3"]
    assert [p.answer for p in data.splits["train"]][:4] == ["4", "5", "4", "9"]


def test_prompt_data_replaces_shards_only_with_overwrite(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["tinyshakespeare", "--dir-prefix", "p", "--max-tokens", "20000", "--val-tokens", "2000"])
    capsys.readouterr()
    Path("p.jsonl").write_text(json.dumps({"prompt": "Hi?", "answer": "1"}) + "\n")
    args = [
        "tinyshakespeare",
        "--dir-prefix",
        "p",
        "--data-files",
        "p.jsonl",
        "--prompts",
        "--val-prompts",
        "0",
    ]
    assert "pass --overwrite" in one_line_error(capsys, main, *args)
    main([*args, "--overwrite"])
    assert sorted(p.name for p in Path("data/tinyshakespeare/p_default").iterdir()) == [
        "meta.json", "train.prompts.jsonl", "val.prompts.jsonl",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fineweb", "--prompts"], "pass them with --data-files"),
        (["gsm8k", "--conversations"], "exclude each other"),
        (["gsm8k", "--ds-sample", "all"], "one of main, socratic"),
        (["gsm8k", "--max-tokens", "1000", "--shard-size", "10"], "drop --max-tokens, --shard-size"),
        (["gsm8k", "--num-proc", "2"], "drop --num-proc"),
        (["tinyshakespeare", "--val-prompts", "5"], "--val-prompts is for prompt data"),
    ],
)
def test_bad_prompt_arguments_are_one_line(
    project: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert message in one_line_error(capsys, main, *args)
    assert not Path("data").exists()


def test_readers_refuse_the_other_kind(project: Path, tiny_data: Path) -> None:
    from talm.data.manifest import read_data

    with pytest.raises(TalmError, match="holds text data, not prompts"):
        read_prompts(tiny_data)
    write_gsm8k_repo(project)
    main(["gsm8k"])
    with pytest.raises(TalmError, match="holds prompts with reference answers, not token shards"):
        read_data("data/gsm8k/main")
