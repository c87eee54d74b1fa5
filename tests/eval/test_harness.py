"""talm checkpoints in EleutherAI's lm-evaluation-harness (the talm[eval] extra): a harness task end to end on a
local copy, and the harness's own task definitions giving the same per-example log-likelihoods and metrics as
talm's built-in scorer on the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.task_copies import write_all_tasks

pytest.importorskip("lm_eval")

from talm.eval.runner import prepare, score  # noqa: E402
from talm.eval.scoring import per_example, score_tokens  # noqa: E402
from talm.eval.tasks import get_task  # noqa: E402
from talm.use.lm_eval import TalmLM, run_harness  # noqa: E402
from talm.use.load import load_checkpoint  # noqa: E402

HARNESS_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
# talm task -> the harness's yaml for it
YAMLS = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(--tasks-dir with local copies of the tasks, a folder of harness yamls reading those copies: each
    includes the harness's real task definition and only points dataset_path at the local copy)."""
    root = tmp_path_factory.mktemp("harness")
    tasks_dir = write_all_tasks(root / "tasks")
    yamls = root / "yamls"
    yamls.mkdir()
    for name, yaml in YAMLS.items():
        (yamls / f"local_{name}.yaml").write_text(
            f"include: {HARNESS_TASKS / yaml}\ntask: local_{name}\ntag: []\n"
            f"dataset_path: {tasks_dir / get_task(name).repo}\n"
            # the local copies hold only the split talm scores (the one the harness scores too)
            + "".join(
                f"{split}_split: {split if get_task(name).split == split else 'null'}\n"
                for split in ("validation", "test")
            )
            + "training_split: null\n",
            encoding="utf-8",
        )
    return tasks_dir, yamls


def test_harness_runs_a_local_task_end_to_end(tiny_model_dir: Path, local_tasks: tuple[Path, Path]) -> None:
    _, yamls = local_tasks
    table, results = run_harness(
        tiny_model_dir, ["local_arc_easy"], device="cpu", include_path=str(yamls), include_defaults=False
    )
    numbers = results["results"]["local_arc_easy"]
    assert 0.0 <= numbers["acc,none"] <= 1.0 and 0.0 <= numbers["acc_norm,none"] <= 1.0
    assert "local_arc_easy" in table and "acc_norm" in table


@pytest.mark.parametrize("name", list(YAMLS))
def test_harness_and_builtin_scorer_agree(
    tiny_model_dir: Path, local_tasks: tuple[Path, Path], name: str
) -> None:
    """The same model scored by the harness (its task yaml: its templates, delimiters, partial scoring and
    metrics) and by talm.eval: the same log-likelihood for every request, the same acc and acc_norm."""
    tasks_dir, yamls = local_tasks
    _, results = run_harness(
        tiny_model_dir,
        [f"local_{name}"],
        device="cpu",
        include_path=str(yamls),
        include_defaults=False,
        log_samples=True,
    )
    samples = sorted(results["samples"][f"local_{name}"], key=lambda s: s["doc_id"])
    harness_lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]

    model, tokenizer, _ = load_checkpoint(tiny_model_dir, device="cpu")
    prepared = prepare(tokenizer, name, tasks_dir=tasks_dir)
    ours = per_example(prepared.examples, score_tokens(model, prepared.requests))
    assert len(ours) == len(harness_lls)
    for mine, theirs in zip(ours, harness_lls, strict=True):
        assert [ll for ll, _ in mine] == pytest.approx(theirs, abs=1e-5)

    result = score(model, prepared)
    harness = results["results"][f"local_{name}"]
    for metric in result.metrics:
        key = "perplexity" if metric == "ppl" else metric
        assert result.metrics[metric] == pytest.approx(harness[f"{key},none"], abs=1e-6), metric


def test_rolling_and_generation(tiny_model_dir: Path) -> None:
    """loglikelihood_rolling sums the log-probs of a whole text from <|endoftext|>; generate_until stops at the
    first stop string."""
    from lm_eval.api.instance import Instance

    lm = TalmLM(str(tiny_model_dir), device="cpu")
    text = (
        "To be, or not to be, that is the question. " * 8
    )  # longer than the 64-token context: several windows
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = lm.tok_encode(text)
    windows, start = [], 0
    while start < len(ids):  # disjoint windows, each predicted from what fits before it
        end = min(start + 64, len(ids))
        context = ([lm.eot_token_id] + ids)[max(0, end - 64) : start + 1] if start else [lm.eot_token_id]
        windows.append((context, ids[start:end]))
        start = end
    expected = sum(ll for ll, _ in score_tokens(lm.model, windows))
    assert rolling == pytest.approx(expected, abs=1e-3)

    [free, stopped] = lm.generate_until(
        [
            Instance("generate_until", {}, ("Once upon a time", {"until": [], "max_gen_toks": 12}), 0),
            Instance("generate_until", {}, ("Once upon a time", {"until": ["e"], "max_gen_toks": 12}), 1),
        ]
    )
    assert free and "e" not in stopped and free.startswith(stopped)


def test_the_harness_command_line_knows_the_talm_model(
    tiny_model_dir: Path, local_tasks: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`python -m talm.use.lm_eval --model talm ...` is lm_eval's own command line with "talm" registered."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    from talm.use.lm_eval import main

    # only the test's yamls: indexing the harness's thousands of built-in tasks takes it a minute on a busy CPU
    monkeypatch.setattr(
        lm_eval.tasks, "TaskManager", lambda *a, **k: TaskManager(*a, **k | {"include_defaults": False})
    )
    _, yamls = local_tasks
    argv = ["lm_eval", "--model", "talm", "--model_args", f"path={tiny_model_dir}", "--device", "cpu"]
    monkeypatch.setattr("sys.argv", [*argv, "--tasks", "local_piqa", "--include_path", str(yamls)])
    main()
    out = capsys.readouterr().out
    assert "talm ({'path'" in out and "|local_piqa|" in out.replace(" ", "")


def test_an_unreachable_hub_fails_in_seconds_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import datasets.config
    from huggingface_hub import constants

    from talm.errors import TalmError

    # the harness's own hellaswag task (its data on the Hub), with the Hub at a port nothing listens on
    (tmp_path / "hub_hellaswag.yaml").write_text(
        f"include: {HARNESS_TASKS / YAMLS['hellaswag']}\ntask: hub_hellaswag\ntag: []\n", encoding="utf-8"
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(TalmError) as err:
        run_harness(
            tiny_model_dir,
            ["hub_hellaswag"],
            device="cpu",
            include_path=str(tmp_path),
            include_defaults=False,
        )
    assert time.monotonic() - start < 15  # datasets alone retries for a minute
    message = str(err.value)
    assert "\n" not in message and "Rowan/hellaswag" in message and "http://127.0.0.1:9" in message
    assert "hf download Rowan/hellaswag --repo-type dataset" in message and "--include-path" in message
    # the offline mode it ran in is undone
    assert not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE


def test_generation_requests_run_together_and_each_gets_what_it_gets_alone(tiny_model_dir: Path) -> None:
    """generate_until batches its requests through the engine (fewer slots than requests: they take turns), and
    each continuation is the one it gets alone, cut at its own stop string."""
    from lm_eval.api.instance import Instance

    lm = TalmLM(str(tiny_model_dir), device="cpu", batch_size=2)
    args = [
        ("Once upon a time", {"until": [], "max_gen_toks": 12}),
        ("To be, or not", {"until": ["e"], "max_gen_toks": 9}),
        ("A", {"until": "o", "max_gen_toks": 5}),
    ]
    requests = [Instance("generate_until", {}, a, i) for i, a in enumerate(args)]
    together = lm.generate_until(requests)
    alone = [lm.generate_until([r])[0] for r in requests]
    assert together == alone and together[0] and "e" not in together[1] and "o" not in together[2]
