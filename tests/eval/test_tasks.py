"""The tasks read from local copies laid out like their Hub repositories, with their real column schemas."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fixtures.task_copies import (
    ARC_ROWS,
    HELLASWAG_ROWS,
    PIQA_ROWS,
    WINOGRANDE_ROWS,
    arc_table,
    lambada_table,
    piqa_table,
    winogrande_table,
    write_all_tasks,
    write_task_repo,
)

from talm.errors import TalmError
from talm.eval.tasks import TASKS, get_task, load_examples


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_all_tasks(tmp_path_factory.mktemp("tasks"))


def test_every_task_reads_its_real_repo_layout(tasks_dir: Path) -> None:
    for name, task in TASKS.items():
        examples = load_examples(name, tasks_dir=tasks_dir)
        assert len(examples) >= 2, name
        for ex in examples:
            assert 0 <= ex.gold < len(ex.requests) and len(ex.choices) == len(ex.requests), name
        assert (tasks_dir / task.repo / "README.md").is_file()


def test_hellaswag_text_is_the_harness_preprocessing(tasks_dir: Path) -> None:
    first, second, _ = load_examples("hellaswag", tasks_dir=tasks_dir)
    context = first.requests[0][0]
    # activity label, ctx_a, then ctx_b capitalised (str.capitalize lowercases the rest)
    assert context == f"Removing ice from car: {HELLASWAG_ROWS[0]['ctx_a']} Then"
    assert first.gold == 3 and first.requests[3][1] == " , the man continues removing the snow on his car."
    # WikiHow's [title] becomes a sentence end, other [tags] vanish, "AWAY" is lowercased by capitalize()
    assert (
        second.requests[0][0]
        == "Finance and Business: How to make money. Save every week. put money away in a jar"
    )
    assert second.choices[1] == "and spend it at once. Done."


def test_arc_gold_is_the_position_of_the_answer_key(tasks_dir: Path) -> None:
    examples = load_examples("arc_easy", tasks_dir=tasks_dir)
    assert [ex.gold for ex in examples] == [1, 0, 3]
    assert examples[2].requests[3] == ("Question: Which tool measures temperature?\nAnswer:", " thermometer")
    assert [ex.gold for ex in load_examples("arc_challenge", tasks_dir=tasks_dir)] == [3, 0, 1]
    assert len(examples[2].choices) == len(ARC_ROWS[2]["choices"]) == 5


def test_winogrande_is_partial_scoring(tasks_dir: Path) -> None:
    ex = load_examples("winogrande", tasks_dir=tasks_dir)[2]
    assert ex.requests == (
        ("The cat chased the mouse, but the cat", " was too fast to be caught."),
        ("The cat chased the mouse, but the mouse", " was too fast to be caught."),
    )
    assert ex.gold == 1  # answer "2"


def test_lambada_splits_off_the_last_word(tasks_dir: Path) -> None:
    ex = load_examples("lambada", tasks_dir=tasks_dir)[2]
    assert ex.requests == (
        ("ROMEO: What light through yonder window breaks? It is the east, and Juliet is the", " sun"),
    )


def test_limit_takes_the_first_examples(tasks_dir: Path) -> None:
    assert [ex.gold for ex in load_examples("arc_easy", tasks_dir=tasks_dir, limit=2)] == [1, 0]


def test_unknown_task_and_missing_copy_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(TalmError, match="unknown task 'hellaswagg': pick from hellaswag"):
        get_task("hellaswagg")
    with pytest.raises(TalmError, match=r"no local copy of piqa at .*baber/piqa.*--local-dir"):
        load_examples("piqa", tasks_dir=tmp_path)


def test_a_copy_without_the_real_columns_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa

    write_task_repo(tmp_path, "baber/piqa", {"default": pa.table({"question": ["q"], "answer": ["a"]})})
    with pytest.raises(TalmError, match="lacks the column.s. goal, sol1, sol2, label"):
        load_examples("piqa", tasks_dir=tmp_path)


def test_unreachable_hub_says_how_to_use_a_local_copy(monkeypatch: pytest.MonkeyPatch, in_tmp: Path) -> None:
    monkeypatch.setenv(
        "HF_HUB_OFFLINE", "1"
    )  # as unreachable as a machine without network, without the retries
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    with pytest.raises(TalmError) as err:
        load_examples("winogrande")
    message = str(err.value)
    assert "\n" not in message
    assert "cannot read winogrande from the Hub (allenai/winogrande)" in message
    assert "pass --tasks-dir DIR with the dataset repository allenai/winogrande downloaded into" in message
    assert "--local-dir DIR/allenai/winogrande)" in message
    assert "hf download allenai/winogrande --repo-type dataset" in message


def test_a_hub_that_refuses_connections_is_reported_in_seconds_in_one_line(
    monkeypatch: pytest.MonkeyPatch, in_tmp: Path
) -> None:
    # Online mode pointed at a port nothing listens on: datasets alone would retry for half a minute and log
    # warnings first; the probe fails at once.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    t = time.monotonic()
    with pytest.raises(TalmError) as err:
        load_examples("hellaswag")
    assert time.monotonic() - t < 10
    message = str(err.value)
    assert "\n" not in message and "http://127.0.0.1:9" in message and "--tasks-dir DIR" in message


@pytest.mark.parametrize(
    ("task", "repo", "config", "table", "problem"),
    [
        ("arc_easy", "allenai/ai2_arc", "ARC-Easy",
         arc_table([ARC_ROWS[0], {**ARC_ROWS[1], "answerKey": "E"}]), "row 1 of .* has answerKey 'E', not one of"),
        ("arc_easy", "allenai/ai2_arc", "ARC-Easy",
         arc_table([{**ARC_ROWS[0], "labels": ["A", "B"]}]), "row 0 of .* has 3 choices.text but 2 choices.label"),
        ("piqa", "baber/piqa", "default", piqa_table([PIQA_ROWS[0], {**PIQA_ROWS[1], "label": 2}]),
         "row 1 of .* has label 2, not one of 0..1"),
        ("piqa", "baber/piqa", "default", piqa_table([{**PIQA_ROWS[0], "sol2": None}]),
         "row 0 of .* has sol2 None, not a string"),
        ("winogrande", "allenai/winogrande", "winogrande_xl",
         winogrande_table([{**WINOGRANDE_ROWS[0], "answer": "0"}]), "has answer '0', not one of 1..2"),
        ("winogrande", "allenai/winogrande", "winogrande_xl",
         winogrande_table([{**WINOGRANDE_ROWS[0], "sentence": "no blank here"}]), "a sentence without the blank"),
        ("lambada", "EleutherAI/lambada_openai", "default", lambada_table(["fine passage", ""]),
         "row 1 of .* has text '', not a passage followed by its last word"),
    ],
)  # fmt: skip
def test_every_task_checks_its_rows_against_its_schema(
    tmp_path: Path, task: str, repo: str, config: str, table: object, problem: str
) -> None:
    write_task_repo(tmp_path, repo, {config: table})
    with pytest.raises(TalmError, match=problem) as err:
        load_examples(task, tasks_dir=tmp_path)
    assert "\n" not in str(err.value) and f"--local-dir {tmp_path / repo}" in str(err.value)


def test_limit_checks_only_the_rows_it_scores(tmp_path: Path) -> None:
    write_task_repo(
        tmp_path, "baber/piqa", {"default": piqa_table([PIQA_ROWS[0], {**PIQA_ROWS[1], "label": 5}])}
    )
    assert len(load_examples("piqa", tasks_dir=tmp_path, limit=1)) == 1
    with pytest.raises(TalmError, match="row 1 of "):
        load_examples("piqa", tasks_dir=tmp_path, limit=2)


def test_a_json_lines_copy_is_read_as_the_parquet_one(tmp_path: Path, tasks_dir: Path) -> None:
    import json

    folder = tmp_path / "EleutherAI" / "lambada_openai" / "default"
    folder.mkdir(parents=True)
    texts = lambada_table_texts(tasks_dir)
    (folder / "test-00000-of-00001.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert load_examples("lambada", tasks_dir=tmp_path) == load_examples("lambada", tasks_dir=tasks_dir)


def lambada_table_texts(tasks_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    (file,) = (tasks_dir / "EleutherAI" / "lambada_openai").rglob("*.parquet")
    return pq.read_table(file).column("text").to_pylist()


def test_the_message_names_the_flag_of_the_command_that_reads_the_tasks(tmp_path: Path) -> None:
    with pytest.raises(TalmError, match=", or drop --eval-tasks-dir$"):
        load_examples("piqa", tasks_dir=tmp_path, flag="--eval-tasks-dir")
    write_task_repo(tmp_path, "baber/piqa", {"default": piqa_table([{**PIQA_ROWS[0], "label": 9}])})
    with pytest.raises(TalmError, match=", or point --eval-tasks-dir at one$"):
        load_examples("piqa", tasks_dir=tmp_path, flag="--eval-tasks-dir")


def test_a_json_lines_row_without_a_column_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "EleutherAI" / "lambada_openai" / "default"
    folder.mkdir(parents=True)
    (folder / "test-00000-of-00001.jsonl").write_text('{"text": "a whole passage"}\n{"words": "x y"}\n')
    with pytest.raises(TalmError, match=r"row 1 of .*test-00000-of-00001.jsonl' has text None, not a string"):
        load_examples("lambada", tasks_dir=tmp_path)
    (folder / "test-00000-of-00001.jsonl").write_text('{"text": "a whole passage"}\n{"text": "torn')
    with pytest.raises(TalmError, match=r"cannot read .*test-00000-of-00001.jsonl' \(Unterminated string"):
        load_examples("lambada", tasks_dir=tmp_path)
