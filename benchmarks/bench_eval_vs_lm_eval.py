"""`evaluate`'s scorer against lm-evaluation-harness's own HF backend (`lm_eval --model hf`): the same model,
the same HellaSwag-layout examples, interleaved rounds, examples/s each, and both accuracies.

    .venv/bin/python benchmarks/bench_eval_vs_lm_eval.py                  # gpt2-124m shape, 40 examples, 1 thread
    .venv/bin/python benchmarks/bench_eval_vs_lm_eval.py --examples 40 --rounds 3 --threads 2 --batch-size 32

A model of a preset's shape (random weights: speed does not depend on them) is exported with `export_hf` (the
transformers directory `export_model` writes) and scored on a local HellaSwag copy (the real schema, rows made
of tiny-shakespeare words, written as tests/fixtures/task_copies.py writes copies) by talm (`prepare` + `score`,
what `evaluate --tasks hellaswag --tasks-dir` runs) and by the harness (`lm_eval --model hf` on a task yaml that
is its `hellaswag` with dataset_path pointing at the copy), alternately, in one process, float32, the same
thread count and batch size. talm puts <|endoftext|> before each context (every training document starts with
it); the exported tokenizer adds no BOS (`add_bos_token=True` changes nothing), so the harness task's text
starts with "<|endoftext|>", which the harness then encodes without special tokens: both score the same tokens,
so their acc and acc_norm must agree. Each side is timed whole (reading the copy, building and tokenizing the
requests, scoring, metrics) and its model calls alone (talm's score_tokens, the harness's loglikelihood).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the copy is local; nothing may come from the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from talm.eval import scoring  # noqa: E402
from talm.eval.runner import prepare, score  # noqa: E402
from talm.model.config import ModelConfig  # noqa: E402
from talm.model.gpt import GPT  # noqa: E402
from talm.tokenizer.api import Tokenizer  # noqa: E402
from talm.train.config import PRESETS  # noqa: E402
from talm.use.export import export_hf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from task_copies import hellaswag_table, write_task_repo  # noqa: E402

TASK = "hellaswag_local"


def shakespeare_rows(n: int, text: Path, seed: int = 0) -> list[dict]:
    """HellaSwag-shaped rows of random word runs: a context of 12-38 words, 4 endings of 5-22 words."""
    words = text.read_text(encoding="utf-8").split()
    rng = random.Random(seed)

    def run(low: int, high: int) -> str:
        k, at = rng.randint(low, high), rng.randrange(len(words) - 50)
        return " ".join(words[at : at + k])

    return [
        {
            "activity_label": run(1, 3),
            "ctx_a": run(10, 30) + ".",
            "ctx_b": run(2, 8),
            "endings": [run(5, 22) + "." for _ in range(4)],
            "label": rng.randrange(4),
        }
        for _ in range(n)
    ]


def harness_task(folder: Path, copy: Path) -> None:
    """`folder`: the harness's hellaswag yaml and utils.py, the yaml reading `copy`, the text after <|endoftext|>."""
    import lm_eval

    source = Path(lm_eval.__file__).parent / "tasks" / "hellaswag"
    shutil.copy(source / "utils.py", folder / "utils.py")
    yaml = (source / "hellaswag.yaml").read_text(encoding="utf-8")
    yaml = yaml.replace("task: hellaswag", f"task: {TASK}").replace(
        "dataset_path: Rowan/hellaswag", f"dataset_path: {copy}"
    )
    yaml = yaml.replace('doc_to_text: "{{query}}"', 'doc_to_text: "<|endoftext|>{{query}}"').replace(
        "training_split: train", "training_split: null"
    )  # the copy has validation only
    assert TASK in yaml and str(copy) in yaml and "<|endoftext|>" in yaml, (
        "the harness's hellaswag.yaml changed"
    )
    yaml = yaml.replace("tag:\n  - multiple_choice\n", "")
    # a cache of its own: datasets names its cache after the folder ("hellaswag") and may find another copy's
    yaml += f"dataset_kwargs:\n  cache_dir: {folder / 'datasets_cache'}\n"
    (folder / f"{TASK}.yaml").write_text(yaml, encoding="utf-8")


def stub_accelerate_if_missing() -> None:
    """lm-eval's HF module imports `accelerate` at its top, which only multi-device runs use; without it
    installed, stand-ins that fail if called. A model object passed as `pretrained` (as here) never calls them."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        import types

        def absent(*args, **kwargs):
            raise RuntimeError("accelerate is not installed")

        stub, utils = types.ModuleType("accelerate"), types.ModuleType("accelerate.utils")
        stub.Accelerator = stub.InitProcessGroupKwargs = stub.find_executable_batch_size = absent
        utils.get_max_memory = absent
        stub.utils = utils
        sys.modules.update({"accelerate": stub, "accelerate.utils": utils})


class Timed:
    """Wraps a function, adding the seconds of each call to `seconds`; keeps the last call's arguments and result."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds, self.last = fn, 0.0, None

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            result = self.fn(*args, **kwargs)
            self.last = (args, result)
            return result
        finally:
            self.seconds += time.perf_counter() - start


def largest_ll_difference(talm_calls: Timed, lm_calls: Timed, choices: int = 4) -> float:
    """max |log-likelihood| difference per request: talm's in example-then-choice order, the harness's by each
    request's (doc_id, choice index)."""
    ours = [ll for ll, _ in talm_calls.last[1]]
    (instances,), theirs = lm_calls.last
    by_key = {(inst.doc_id, inst.idx): ll for inst, (ll, _) in zip(instances, theirs, strict=True)}
    return max(abs(ours[d * choices + k] - ll) for (d, k), ll in by_key.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="gpt2-124m", choices=list(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=50304)
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokenizer", default=str(ROOT / "tests" / "fixtures" / "talm-original-base.json"))
    parser.add_argument("--text", default="/work/shared/data/tiny-shakespeare.txt", help="words for the rows")
    args = parser.parse_args()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))

    from transformers import (
        AutoModelForCausalLM,
    )  # before the stand-in: transformers checks what is installed

    stub_accelerate_if_missing()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_vs_lm_eval."))
    tokenizer = Tokenizer.from_file(args.tokenizer)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**PRESETS[args.preset]["model"], vocab_size=args.vocab_size)).eval()
    export = export_hf(model, tokenizer, work / "export")
    copy = write_task_repo(
        work / "tasks",
        "Rowan/hellaswag",
        {"default": hellaswag_table(shakespeare_rows(args.examples, Path(args.text)))},
    )
    (work / "yamls").mkdir()
    harness_task(work / "yamls", copy)
    manager = TaskManager(include_path=str(work / "yamls"))
    hf_model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    lm = HFLM(
        pretrained=hf_model, tokenizer=str(export), backend="causal", device="cpu", batch_size=args.batch_size
    )
    lm_calls = lm.loglikelihood = Timed(lm.loglikelihood)
    talm_calls = scoring_calls = Timed(scoring.score_tokens)

    import talm.eval.runner as runner

    runner.score_tokens = scoring_calls
    requests = prepare(tokenizer, "hellaswag", tasks_dir=work / "tasks").requests
    tokens = sum(len(c) + len(k) for c, k in requests)
    print(
        f"{args.preset} shape ({model.num_params() / 1e6:.1f}M parameters, vocab {args.vocab_size}), cpu, float32, "
        f"{torch.get_num_threads()} threads, batch {args.batch_size}: {args.examples} examples, {len(requests)} "
        f"requests, {tokens:,} tokens (talm's count, <|endoftext|> included); talm {talm_version()}, "
        f"lm-eval {lm_eval_version()}"
    )

    def run_talm() -> dict[str, float]:
        return score(
            model, prepare(tokenizer, "hellaswag", tasks_dir=work / "tasks"), batch_size=args.batch_size
        ).metrics

    def run_harness() -> dict[str, float]:
        out = simple_evaluate(
            model=lm,
            tasks=[TASK],
            task_manager=manager,
            batch_size=args.batch_size,
            log_samples=False,
            bootstrap_iters=0,
        )
        found = out["results"][TASK]
        return {"acc": found["acc,none"], "acc_norm": found["acc_norm,none"]}

    sides = {"talm": (run_talm, talm_calls), "lm-eval hf": (run_harness, lm_calls)}
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    metrics = {}
    for r in range(args.rounds):
        for name in list(sides)[:: 1 if r % 2 == 0 else -1]:  # alternate which side goes first
            run, calls = sides[name]
            calls.seconds = 0.0
            start = time.perf_counter()
            metrics[name] = run()
            whole = time.perf_counter() - start
            rates[name].append((args.examples / whole, args.examples / calls.seconds))
            print(
                f"round {r + 1} {name:>10}: {whole:7.2f} s, {args.examples / whole:6.2f} examples/s whole, "
                f"{args.examples / calls.seconds:6.2f} examples/s model calls; "
                f"acc {metrics[name]['acc']:.4f}, acc_norm {metrics[name]['acc_norm']:.4f}"
            )
    for r in range(args.rounds):
        (tw, tm), (hw, hm) = rates["talm"][r], rates["lm-eval hf"][r]
        print(f"round {r + 1}: talm / lm-eval examples/s: {tw / hw:.2f}x whole, {tm / hm:.2f}x model calls")
    same = all(abs(metrics["talm"][m] - metrics["lm-eval hf"][m]) < 1e-9 for m in ("acc", "acc_norm"))
    print(
        f"acc and acc_norm {'agree' if same else 'DIFFER'}: talm {metrics['talm']}, lm-eval {metrics['lm-eval hf']}"
    )
    print(
        f"max |log-likelihood difference| over the requests: {largest_ll_difference(talm_calls, lm_calls):.1e}"
    )
    shutil.rmtree(work)


def talm_version() -> str:
    from importlib.metadata import version

    return version("talm")


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


if __name__ == "__main__":
    main()
