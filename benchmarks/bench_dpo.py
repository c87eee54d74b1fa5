"""DPO on the demo chat model (docs/finetuning-chat.md): held-out preference accuracy before and after, and the
two reference modes side by side (a frozen copy beside every step: memory; log-probs stored up front: compute).

It writes synthetic pairs with scripts/make_preferences (right, well-styled answers chosen; a wrong capital, the
answer shouted or a refusal rejected), prepares them with the chat model's tokenizer (the first --val-tokens as
held-out pairs), then runs `train_model --preset dpo --init-from CHAT` once per reference mode, each in its own
process (its peak RSS measured alone). Reported per run: the held-out preference accuracy of DPO's implicit
reward at the last evaluation (50% at the first step by definition: policy = reference), the reward margin, the
wall time, and the share of held-out pairs whose chosen reply has the higher log-probability under the model
(before: the chat model; after: the tuned one), a baseline that does not depend on the reference.

    python benchmarks/bench_dpo.py --chat models/chat
    python benchmarks/bench_dpo.py --chat models/chat --references model --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RSS = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def make_data(work: Path, chat: Path, pairs: int, val_tokens: int) -> Path:
    from talm.data.config import DownloadConfig
    from talm.data.prepare import prepare

    script = ROOT / "scripts" / "make_preferences"
    subprocess.run(
        [sys.executable, str(script), str(work / "pairs.jsonl"), "--count", str(pairs)], check=True
    )
    cfg = DownloadConfig(
        dataset="prefs", data_files=[str(work / "pairs.jsonl")], preferences=True,
        tokenizer_path=chat / "tokenizer.json", data_root=work / "data", val_tokens=val_tokens, overwrite=True,
    )  # fmt: skip
    return prepare(cfg, progress=False).out_dir


@torch.no_grad()
def chosen_more_likely(checkpoint: Path, data_dir: Path, max_pairs: int) -> float:
    """Share of the held-out pairs whose chosen reply the model gives the higher log-probability (ties: half)."""
    from talm.data.manifest import read_data
    from talm.train.checkpoint import load_model
    from talm.train.dpo import sequence_logps
    from talm.train.pairs import PairEval

    model, _ = load_model(checkpoint)
    model.eval()
    data = read_data(data_dir)
    val = PairEval(
        data, max_pairs=max_pairs, context_length=model.config.context_length, batch_size=16,
        pad_id=int(data.tokenizer["eot_id"]),
    )  # fmt: skip
    won = 0.0
    for x, y, _ in val:
        logps, _ = sequence_logps(model(x)[0], y)
        n = len(x) // 2
        won += float((logps[:n] > logps[n:]).sum() + 0.5 * (logps[:n] == logps[n:]).sum())
    return won / val.count


def tune(work: Path, chat: Path, data_dir: Path, reference: str, args: argparse.Namespace) -> dict:
    name = f"dpo-{reference}"
    command = [
        sys.executable,
        "-m",
        "talm.cli.train_model",
        "-n",
        name,
        "-d",
        str(data_dir),
        "--preset",
        "dpo",
    ]
    command += ["--init-from", str(chat), "--restart", "--dpo.reference", reference, "--device", "cpu"]
    command += ["--max-steps", str(args.steps), "--optim.lr", str(args.lr), "--dpo.beta", str(args.beta)]
    command += ["--eval-every", str(args.eval_every), "--batch-size", str(args.batch_size)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS, *command], cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(done.stdout.split("peak_rss_kb")[-1])
    records = [
        json.loads(line) for line in (work / "models" / name / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r for r in records if "val_pref_accuracy" in r]
    return {"name": name, "seconds": seconds, "rss_mb": rss_kb / 1024, "evals": evals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chat", required=True, help="the chat model to tune (models/chat)")
    parser.add_argument("--work", default="bench_dpo", help="directory for the pairs, data and models")
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--val-tokens", type=int, default=8000, help="held-out pairs, in tokens (~200 pairs)")
    parser.add_argument("--references", nargs="+", default=["model", "stored"], choices=["model", "stored"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument(
        "--held-out", type=int, default=256, help="held-out pairs scored for the log-prob baseline"
    )
    args = parser.parse_args()
    chat, work = Path(args.chat).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data_dir = make_data(work, chat, args.pairs, args.val_tokens)
    before = chosen_more_likely(chat / "best", data_dir, args.held_out)
    print(
        f"chat model {chat}: the chosen reply is the more likely one in {100 * before:.1f}% of held-out pairs"
    )
    for reference in args.references:
        run = tune(work, chat, data_dir, reference, args)
        after = chosen_more_likely(work / "models" / run["name"] / "latest", data_dir, args.held_out)
        curve = ", ".join(f"{r['step']}: {100 * r['val_pref_accuracy']:.1f}%" for r in run["evals"])
        last = run["evals"][-1]
        print(
            f"{run['name']}: {args.steps} steps in {run['seconds']:.0f} s, peak RSS {run['rss_mb']:.0f} MB; "
            f"held-out preference accuracy 50.0% at step 0 -> {curve}; reward margin "
            f"{last['val_reward_margin']:.3f}; chosen more likely {100 * before:.1f}% -> {100 * after:.1f}%"
        )


if __name__ == "__main__":
    main()
