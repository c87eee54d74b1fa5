"""GRPO on a CPU: does reinforcement learning with a verifiable reward raise held-out pass@1 of a small chat model?

    .venv/bin/python benchmarks/bench_grpo.py --workdir /tmp/grpo-bench               # the whole path, ~15 min
    .venv/bin/python benchmarks/bench_grpo.py --workdir /tmp/grpo-bench --rl-steps 60   # again: data and SFT kept

In --workdir, with the shipped tokenizer: two-digit additions from scripts/make_sums (20,000 worked
conversations from a noisy teacher, --wrong of whose sums are one too high; 5,000 prompts with answers, 500 of
them held out), a tiny model fine-tuned from scratch on the conversations (--preset tiny, --sft-steps): it
learns the teacher's mistakes too, so it gets only some sums right; its greedy pass@1 on
the first 200 held-out prompts, then `train_model --preset grpo --init-from` it on the prompts, whose
val_pass@1 (the same 200 prompts, greedy, the same reward) metrics.jsonl records at every evaluation. Prints
every command it runs, pass@1 before and after, and the GRPO run's wall time. Each step is skipped when its
output exists (delete the workdir, or the model directory, to redo it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(command: list[str], cwd: Path) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, check=True)


def pass_at_1(model_dir: Path, data_dir: Path, prompts: int, max_new_tokens: int) -> float:
    """Greedy pass@1 of a model on the first `prompts` held-out prompts, as the GRPO objective measures it."""
    from talm.data.prompts import read_prompts
    from talm.eval.generative import pass_at_1 as measure
    from talm.use.load import load_checkpoint

    model, tokenizer, _ = load_checkpoint(model_dir, "latest", "cpu")
    val = read_prompts(data_dir).splits["val"][:prompts]
    return measure(
        model, tokenizer, [p.ids for p in val], [p.answer for p in val], max_new_tokens=max_new_tokens
    )


def prepare(work: Path, sft_steps: int, wrong: float) -> None:
    """The task's files, its data directories and the SFT model (each made once)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "tokenizers").mkdir(exist_ok=True)
    shutil.copyfile(ROOT / "tokenizers" / "base.json", work / "tokenizers" / "base.json")
    make = [sys.executable, str(ROOT / "scripts" / "make_sums")]
    if not (work / "data/sums-sft/default/meta.json").is_file():
        run([*make, "sums-sft.jsonl", "--conversations", "--wrong", str(wrong), "--count", "20000", "--seed", "1"],
            work)  # fmt: skip
        run([str(BIN / "download_data"), "sums-sft", "--data-files", "sums-sft.jsonl", "--conversations",
             "--val-tokens", "20000"], work)  # fmt: skip
    if not (work / "data/sums/default/meta.json").is_file():
        run([*make, "sums.jsonl", "--count", "5000", "--seed", "0"], work)
        run([str(BIN / "download_data"), "sums", "--data-files", "sums.jsonl", "--prompts"], work)
    if not (work / "models/sums-sft/latest").is_dir():
        run([str(BIN / "train_model"), "-n", "sums-sft", "-d", "data/sums-sft/default", "--preset", "tiny",
             "--max-steps", str(sft_steps), "--eval-every", str(sft_steps)], work)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/grpo-bench"))
    parser.add_argument("--sft-steps", type=int, default=300, help="SFT steps of the starting model (300)")
    parser.add_argument("--wrong", type=float, default=0.5, help="the teacher's share of wrong sums (0.5)")
    parser.add_argument("--rl-steps", type=int, default=60, help="GRPO steps (60)")
    parser.add_argument("--rl-name", default="sums-rl", help="the GRPO run's model name (sums-rl)")
    parser.add_argument("extra", nargs="*", help="more train_model flags for the GRPO run (after --)")
    args = parser.parse_args()
    work = args.workdir.resolve()
    prepare(work, args.sft_steps, args.wrong)
    before = pass_at_1(work / "models/sums-sft", work / "data/sums/default", 200, 16)
    print(f"SFT model: pass@1 {before:.3f} on 200 held-out prompts", flush=True)
    start = time.perf_counter()
    run([str(BIN / "train_model"), "-n", args.rl_name, "-d", "data/sums/default", "--preset", "grpo",
         "--init-from", "models/sums-sft", "--max-steps", str(args.rl_steps), "--grpo.max_new_tokens", "16",
         "--grpo.eval_prompts", "200", "--eval-every", "10", "--restart", *args.extra], work)  # fmt: skip
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (work / "models" / args.rl_name / "metrics.jsonl").open()]
    curve = [(r["step"], r["val_pass@1"]) for r in records if "val_pass@1" in r]
    print("val_pass@1 by step: " + ", ".join(f"{s}: {p:.3f}" for s, p in curve))
    after = curve[-1][1]
    print(
        f"GRPO: pass@1 {before:.3f} -> {after:.3f} ({100 * (after - before):+.1f} points) in {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
