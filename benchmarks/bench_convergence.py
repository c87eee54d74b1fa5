"""Convergence at equal wall-clock time: which training recipe reaches the lowest validation bits per byte on
tiny-shakespeare in the same number of seconds.

The protocol (fixed, so that figures compare across recipes, machines and talm versions):

- Data: tiny-shakespeare.txt (repository root), split like nanoGPT's character recipe: the first 90% of the
  file's characters train, the last 10% evaluate (the file is ASCII, so characters are bytes). Published
  nanoGPT figures on that split: 1.88 nats/char = 2.71 bits/byte for its ~3-minute CPU recipe, 1.4697 nats/char
  = 2.12 bits/byte for its A100 recipe. Both parts are tokenized with the shipped tokenizers/base.json by
  talm's own data stage (`talm.data.prepare.prepare`, as `download_data --data-files` does) into one data
  directory whose val split is exactly the last 10%: the val part is prepared once alone to count its tokens,
  then both parts together with --val-tokens set to that count (the boundary is checked). Blank lines separate
  documents, as for every .txt corpus: each becomes an end-of-text token, and bits per byte count the
  documents' UTF-8 bytes (talm's definition, the one every run reports). Prepared once, cached in --cache-dir.
- Recipes: a name plus train_model flags (RECIPES below). Each is given the same wall-clock budget of training
  (--budget seconds): a short calibration run (--calib-steps steps) measures its seconds per step and its
  one-time cost (compilation, warm-up), then max_steps = (budget - one-time cost) / step time, so the recipe's
  learning-rate schedule ends at the budget. The real run evaluates once, at its last step, on the whole val
  split (every non-overlapping context-length window; the tail shorter than one window is left out) and saves
  once, at the end.
- Timing: each run is a fresh `train_model` process; the times are the run's own clock (metrics.jsonl
  "time"), which starts at the first step, after process start-up, data checks and model construction, and
  stops at the last step's end, before the final evaluation and save. Data preparation and calibration are
  outside the budget.
- Noise: --rounds N repeats everything N times, recipes in rotating order, round r with seed 1337 + r (the same
  seed for every recipe of a round); the summary gives per recipe the median and the spread (min to max) of
  val bits/byte, training seconds, steps and tokens.

    python benchmarks/bench_convergence.py                       # baseline and tiny, 100 s each, 3 rounds
    python benchmarks/bench_convergence.py --budget 10 --rounds 1   # smoke test
    python benchmarks/bench_convergence.py --recipes all          # every recipe this talm can run
    python benchmarks/bench_convergence.py --list                 # the recipes and whether they can run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tiny-shakespeare.txt"
TOKENIZER = ROOT / "tokenizers" / "base.json"
TRAIN_FRACTION = 0.9
FIRST_SEED = 1337

# Today's (pre-issue-10) tiny preset, pinned flag by flag so the baseline stays put when the preset is retuned:
# float32, AdamW, cosine, SwiGLU, tied head, every other setting at the defaults (which keep today's behaviour).
TINY_BEFORE = [
    "--model.context_length", "128", "--model.n_layer", "4", "--model.n_head", "4", "--model.d_model", "128",
    "--optim.lr", "3e-3", "--optim.warmup_steps", "30", "--optim.weight_decay", "0.1",
    "--optim.min_lr_ratio", "0.1", "--batch-size", "16",
]  # fmt: skip
TINY = ["--preset", "tiny"]
# The tiny preset of the first retuning (Muon, WSD, QK-norm, ReLU², zero-initialised projections; tied head, one
# AdamW lr), pinned flag by flag: the second retuning's screens are flags on top of it.
TINY_V1 = [
    *TINY_BEFORE, "--model.qk_norm", "--model.mlp", "relu2", "--model.zero_init_proj", "--model.tie_embeddings",
    "--optim.name", "muon", "--optim.schedule", "wsd", "--optim.muon_momentum_warmup", "300",
    "--optim.decay_fraction", "0.2",
]  # fmt: skip
# The second retuning's longer decay to zero and short momentum warmup.
DECAY = ["--optim.min_lr_ratio", "0", "--optim.decay_fraction", "0.4", "--optim.muon_momentum_warmup", "50"]
UNTIED = ["--no-model.tie_embeddings"]

# name -> train_model flags. The benchmark appends its own --max-steps, --eval-every, --eval-tokens,
# --save-every, --log-every and --seed, so a recipe sets everything else. A recipe whose flags this talm does
# not have (an option another branch adds) is skipped with a note, so the table can name them ahead of time.
# Fourth session: the three screen winners that cost nothing per token (a 3x ReLU² MLP, 2 heads, 10 warmup steps).
LEAN = ["--model.mlp_hidden", "384", "--model.n_head", "2", "--optim.warmup_steps", "10"]
RECIPES: dict[str, list[str]] = {
    "baseline": [*TINY_BEFORE, "--dtype", "float32"],  # today's recipe: what every other is compared with
    "tiny": TINY,  # the tiny preset as it is now (--dtype auto: bf16 on CPUs with native bf16)
    "baseline-bf16": [*TINY_BEFORE, "--dtype", "bfloat16"],
    "tiny-compile": [*TINY, "--compile"],
    # The first retuning (docs/benchmarks.md, "Convergence"): each issue 10 option on top of the old preset.
    "muon": [*TINY_BEFORE, "--optim.name", "muon"],
    "wsd": [*TINY_BEFORE, "--optim.schedule", "wsd"],
    "muon-wsd": [*TINY_BEFORE, "--optim.name", "muon", "--optim.schedule", "wsd"],
    "qk-norm": [*TINY_BEFORE, "--model.qk_norm"],
    "relu2": [*TINY_BEFORE, "--model.mlp", "relu2"],
    "softcap": [*TINY_BEFORE, "--model.logit_softcap", "15"],
    "zero-init": [*TINY_BEFORE, "--model.zero_init_proj"],
    "muon-wsd-arch": TINY_V1,  # the winner: the first retuned preset
    "muon-wsd-softcap": [
        *TINY_BEFORE,
        "--optim.name",
        "muon",
        "--optim.schedule",
        "wsd",
        "--model.logit_softcap",
        "15",
    ],
    "muon-wsd-hot": [
        *TINY_BEFORE,
        "--optim.name",
        "muon",
        "--optim.schedule",
        "wsd",
        "--optim.muon_lr",
        "0.04",
        "--optim.lr",
        "6e-3",
    ],
    # The second retuning: on top of the first retuned preset (TINY_V1), one change at a time, then combined.
    "v1-b8": [*TINY_V1, "--batch-size", "8"],
    "v1-wide": [*TINY_V1, "--model.d_model", "192", "--model.n_head", "6"],
    "v1-hot": [*TINY_V1, "--optim.muon_lr", "0.03", "--optim.lr", "5e-3"],
    "v1-ctx256": [*TINY_V1, "--model.context_length", "256", "--batch-size", "8"],
    "v1-untied": [*TINY_V1, *UNTIED],
    "v1-decay0": [*TINY_V1, "--optim.min_lr_ratio", "0", "--optim.decay_fraction", "0.4"],
    "v1-mom50": [*TINY_V1, "--optim.muon_momentum_warmup", "50"],
    "v1-adam-hot": [*TINY_V1, "--optim.lr", "1e-2"],
    "v1-deep": [*TINY_V1, "--model.n_layer", "6"],
    "v1-decay-lr1e-2": [*TINY_V1, *DECAY, "--optim.lr", "1e-2"],
    "v1-decay-lr2e-2": [*TINY_V1, *DECAY, "--optim.lr", "2e-2"],
    "v1-decay-lr2e-2-muon3e-2": [*TINY_V1, *DECAY, "--optim.lr", "2e-2", "--optim.muon_lr", "0.03"],
    "v1-decay-lr3e-2": [*TINY_V1, *DECAY, "--optim.lr", "3e-2"],
    "v1-untied-lr2e-2": [*TINY_V1, *UNTIED, "--optim.lr", "2e-2"],
    "v1-untied-decay-lr2e-2": [*TINY_V1, *UNTIED, *DECAY, "--optim.lr", "2e-2"],
    "v1-emb0.1-head4e-3": [
        *TINY_V1,
        *UNTIED,
        *DECAY,
        "--optim.lr",
        "4e-3",
        "--optim.embedding_lr",
        "0.1",
    ],  # won
    "v1-emb0.3-head4e-3": [*TINY_V1, *UNTIED, *DECAY, "--optim.lr", "4e-3", "--optim.embedding_lr", "0.3"],
    "v1-emb0.05-head4e-3": [*TINY_V1, *UNTIED, *DECAY, "--optim.lr", "4e-3", "--optim.embedding_lr", "0.05"],
    "v1-emb0.1-head2e-3": [*TINY_V1, *UNTIED, *DECAY, "--optim.lr", "2e-3", "--optim.embedding_lr", "0.1"],
    "v1-emb0.1-head1e-2": [*TINY_V1, *UNTIED, *DECAY, "--optim.lr", "1e-2", "--optim.embedding_lr", "0.1"],
    "v1-emb0.1-head2e-2": [*TINY_V1, *UNTIED, *DECAY, "--optim.lr", "2e-2", "--optim.embedding_lr", "0.1"],
    # on top of the second retuned preset (what --preset tiny is now)
    "tiny-muon3e-2": [*TINY, "--optim.muon_lr", "0.03"],
    "tiny-b8": [*TINY, "--batch-size", "8"],
    "tiny-wd0": [*TINY, "--optim.weight_decay", "0"],
    "tiny-decay0.6": [*TINY, "--optim.decay_fraction", "0.6"],
    "tiny-dropout0.1": [*TINY, "--model.dropout", "0.1"],
    # fourth session: batch and shape at equal time
    "tiny-b32": [*TINY, "--batch-size", "32"],
    "tiny-ctx64-b32": [*TINY, "--model.context_length", "64", "--batch-size", "32"],
    "tiny-mlp384": [*TINY, "--model.mlp_hidden", "384"],
    "tiny-heads2": [*TINY, "--model.n_head", "2"],
    "tiny-warmup10": [*TINY, "--optim.warmup_steps", "10"],
    "tiny-lean": [*TINY, *LEAN],
    "tiny-lean-b32": [*TINY, *LEAN, "--batch-size", "32"],
    "tiny-lean-ctx64-b32": [*TINY, *LEAN, "--model.context_length", "64", "--batch-size", "32"],
    "tiny-lean-mlp256": [*TINY, *LEAN, "--model.mlp_hidden", "256"],
    # Muon per projection (the default since the fifth session) against the fused weights as one matrix each
    "tiny-fused": [*TINY, "--no-optim.muon_per_projection"],
    "tiny-muon3e-2-fused": [*TINY, "--optim.muon_lr", "0.03", "--no-optim.muon_per_projection"],
    "tiny-muon1.5e-2": [*TINY, "--optim.muon_lr", "0.015"],
}
DEFAULT_RECIPES = ("baseline", "tiny")


# ------------------------------------------------------------------------------------------------ data


def split_text(text: str) -> tuple[str, str]:
    """nanoGPT's split: the first 90% of the characters train, the rest evaluates."""
    cut = int(len(text) * TRAIN_FRACTION)
    return text[:cut], text[cut:]


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def _split_bytes(manifest: dict, split: str) -> tuple[int, int]:
    shards = [s for s in manifest["shards"] if s["split"] == split]
    return sum(s["tokens"] for s in shards), sum(s["bytes"] for s in shards)


def prepare_data(cache_dir: Path, text_path: Path, tokenizer_path: Path) -> tuple[Path, dict]:
    """The benchmark's data directory (train = first 90%, val = last 10%), prepared by talm's data stage and
    cached under `cache_dir` by the text's and tokenizer's hashes. Returns (directory, facts about it)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from talm.data.config import DownloadConfig
    from talm.data.prepare import prepare
    from talm.tokenizer.api import Tokenizer

    raw = text_path.read_bytes()
    tokenizer = Tokenizer.from_file(tokenizer_path)
    key = hashlib.sha256(raw).hexdigest()[:12] + "-" + tokenizer.fingerprint[:12]
    base = cache_dir / key
    train_text, val_text = split_text(raw.decode("utf-8"))
    # expand_data_files sorts the files: "0_val" comes first, so the val split is exactly this file
    val_file, train_file = base / "text" / "0_val.txt", base / "text" / "1_train.txt"
    _write_if_changed(val_file, val_text)
    _write_if_changed(train_file, train_text)

    def run(dataset: str, files: list[Path], val_tokens: int) -> dict:
        cfg = DownloadConfig(
            dataset=dataset,
            data_files=[str(f) for f in files],
            tokenizer_path=tokenizer_path,
            data_root=base / "data",
            val_tokens=val_tokens,
        )
        return prepare(cfg, progress=False)

    alone = run("shakespeare_val", [val_file], 0)  # the val part alone: all of it lands in "train"
    val_tokens, val_bytes = _split_bytes(alone.manifest, "train")
    both = run("shakespeare_split", [val_file, train_file], val_tokens)
    got = _split_bytes(both.manifest, "val")
    if got != (val_tokens, val_bytes):
        raise SystemExit(
            f"the val split of {both.out_dir} is {got} (tokens, bytes), not the last 10% ({val_tokens}, "
            f"{val_bytes}): delete {base} and rerun"
        )
    train_tokens, train_bytes = _split_bytes(both.manifest, "train")
    facts = {
        "text": str(text_path),
        "chars": len(train_text) + len(val_text),
        "train_chars": len(train_text),
        "val_chars": len(val_text),
        "train_tokens": train_tokens,
        "train_bytes": train_bytes,
        "val_tokens": val_tokens,
        "val_bytes": val_bytes,
        "tokenizer": str(tokenizer_path),
        "vocab_size": tokenizer.vocab_size,
    }
    return both.out_dir, facts


# ------------------------------------------------------------------------------------------------ runs


def runnable(flags: list[str]) -> str | None:
    """Why this talm's train_model cannot take `flags` (None if it can)."""
    from talm.cli.train_model import build_parser

    parser, _ = build_parser()
    # else a missing --model.mlp would pass as an abbreviation of --model.mlp_hidden
    parser.allow_abbrev = False
    try:
        _, unknown = parser.parse_known_args(["-n", "x", "-d", "x", *flags])
    except SystemExit:
        return "a value train_model refuses"
    missing = [u for u in unknown if u.startswith("-")]
    return f"this train_model has no {', '.join(missing)}" if unknown else None


@dataclass
class Run:
    recipe: str
    round: int
    seed: int
    calib_step_s: float  # seconds per step, from the calibration run
    calib_fixed_s: float  # one-time seconds (compilation, warm-up) before the steps settle
    max_steps: int
    train_s: float  # the run's own clock at its last step
    steps: int
    tokens: int
    val_loss: float
    val_bpb: float


class Runner:
    """Runs train_model processes in a scratch directory (models/NAME under it)."""

    def __init__(self, work: Path, data_dir: Path, args: argparse.Namespace) -> None:
        self.work, self.data_dir, self.args = work, data_dir, args
        self.env = dict(os.environ)
        import talm

        src = str(Path(talm.__file__).resolve().parents[1])  # the talm this script imports, also in the runs
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
        self.env.setdefault("TQDM_DISABLE", "1")
        if args.threads:
            self.env["OMP_NUM_THREADS"] = str(args.threads)
            self.env["MKL_NUM_THREADS"] = str(args.threads)

    def train(self, name: str, flags: list[str]) -> list[dict]:
        """One train_model process; its metrics.jsonl records. Exits with its output if it fails."""
        cmd = [sys.executable, "-m", "talm.cli.train_model", "-n", name, "-d", str(self.data_dir)]
        cmd += ["--restart", *flags]
        if self.args.device:
            cmd += ["--device", self.args.device]
        proc = subprocess.run(cmd, cwd=self.work, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise SystemExit(f"train_model failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
        from talm.train.metrics import read_metrics

        records = read_metrics(self.work / "models" / name)
        if not self.args.keep:
            shutil.rmtree(self.work / "models" / name, ignore_errors=True)
        return records

    def calibrate(self, recipe: str, flags: list[str], seed: int) -> tuple[float, float]:
        """(seconds per step once settled, one-time seconds) from a short run of the recipe."""
        n = self.args.calib_steps
        records = self.train(
            f"calib-{recipe}",
            [*flags, "--max-steps", str(n), "--log-every", "1", "--eval-every", str(n)]
            + ["--eval-tokens", "1", "--save-every", str(n), "--seed", str(seed)],
        )
        times = {r["step"]: r["time"] for r in records if "train_loss" in r}
        half = n // 2
        step_s = (times[n] - times[half]) / (n - half)
        fixed = max(0.0, times[n] - n * step_s)
        return step_s, fixed

    def measure(self, recipe: str, round_: int) -> Run:
        flags = RECIPES[recipe]
        seed = FIRST_SEED + round_
        step_s, fixed = self.calibrate(recipe, flags, seed)
        steps = max(1, int((self.args.budget - fixed) / step_s))
        records = self.train(
            f"{recipe}-r{round_}",
            [*flags, "--max-steps", str(steps), "--log-every", "10", "--eval-every", str(steps)]
            + ["--eval-tokens", str(self.args.val_tokens), "--save-every", str(steps), "--seed", str(seed)],
        )
        last = [r for r in records if "train_loss" in r][-1]
        final = [r for r in records if "val_loss" in r][-1]
        return Run(
            recipe, round_, seed, step_s, fixed, steps, last["time"], last["step"], last["tokens"],
            final["val_loss"], final["val_bpb"],
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ report


def machine() -> str:
    import torch

    from talm.train.precision import cpu_native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        caps = torch.cpu.get_capabilities()
        cpu = caps.get("cpu_name") or cpu
    except Exception:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return (
        f"{cpu}, {os.cpu_count()} logical cores, {gpu}, torch {torch.__version__}, "
        f"native CPU bf16: {'yes' if cpu_native_bf16() else 'no'}, threads {threads}"
    )


def spread(values: list[float], fmt: str) -> tuple[str, str]:
    med = statistics.median(values)
    rng = f"{format(min(values), fmt)}-{format(max(values), fmt)}" if len(values) > 1 else "-"
    return format(med, fmt), rng


def summary(runs: list[Run], recipes: list[str]) -> str:
    head = ("recipe", "runs", "val bits/byte", "spread", "train s", "spread", "steps", "tokens", "s/step")
    rows = [head]
    for name in recipes:
        mine = [r for r in runs if r.recipe == name]
        if not mine:
            continue
        bpb, bpb_range = spread([r.val_bpb for r in mine], ".4f")
        secs, secs_range = spread([r.train_s for r in mine], ".1f")
        rows.append(
            (
                name,
                str(len(mine)),
                bpb,
                bpb_range,
                secs,
                secs_range,
                spread([r.steps for r in mine], ".0f")[0],
                spread([r.tokens for r in mine], ",.0f")[0],
                spread([r.calib_step_s for r in mine], ".3f")[0],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def reproduce(args: argparse.Namespace, recipes: list[str]) -> str:
    parts = ["python benchmarks/bench_convergence.py", f"--budget {args.budget:g}", f"--rounds {args.rounds}"]
    parts.append(f"--recipes {','.join(recipes)}")
    if args.calib_steps != 30:
        parts.append(f"--calib-steps {args.calib_steps}")
    if args.threads:
        parts.append(f"--threads {args.threads}")
    if args.device:
        parts.append(f"--device {args.device}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=100.0, help="training seconds per run (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated names from RECIPES, or all"
    )
    parser.add_argument(
        "--calib-steps", type=int, default=30, help="steps of each calibration run (default 30)"
    )
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: torch's choice)")
    parser.add_argument("--device", help="--device for train_model (default: its own choice)")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "talm-bench-convergence"
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the runs' model directories")
    parser.add_argument("--list", action="store_true", help="list the recipes and whether they can run")
    args = parser.parse_args()
    if args.budget <= 0 or args.rounds < 1 or args.calib_steps < 2:
        parser.error("--budget must be > 0, --rounds >= 1, --calib-steps >= 2")

    if args.list:
        for name, flags in RECIPES.items():
            why = runnable(flags)
            print(f"{name}: {'runs' if why is None else 'skipped: ' + why}\n    {' '.join(flags)}")
        return
    wanted = list(RECIPES) if args.recipes == "all" else [r.strip() for r in args.recipes.split(",") if r]
    unknown = [r for r in wanted if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}: choose from {', '.join(RECIPES)}")
    recipes = []
    for name in wanted:
        why = runnable(RECIPES[name])
        if why is None:
            recipes.append(name)
        else:
            print(f"skipping {name}: {why}", file=sys.stderr)
    if not recipes:
        raise SystemExit("no recipe to run")

    t0 = time.perf_counter()
    data_dir, facts = prepare_data(args.cache_dir, TEXT, TOKENIZER)
    args.val_tokens = facts["val_tokens"]
    print(f"machine: {machine()}")
    print(
        f"data: {TEXT.name}, train = first {facts['train_chars']:,} chars ({facts['train_tokens']:,} tokens), "
        f"val = last {facts['val_chars']:,} chars ({facts['val_tokens']:,} tokens, {facts['val_bytes']:,} bytes "
        f"of document text), tokenizer {TOKENIZER.relative_to(ROOT)} (vocab {facts['vocab_size']}); prepared "
        f"in {time.perf_counter() - t0:.1f}s in {data_dir}"
    )
    print(
        f"budget {args.budget:g} s of training per run, {args.rounds} round(s), recipes {', '.join(recipes)}"
    )
    print("eval: the whole val split (non-overlapping context-length windows), once, after the last step")

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="talm-conv-") as work:
        runner = Runner(Path(work), data_dir, args)
        for r in range(args.rounds):
            k = r % len(recipes)
            for name in recipes[k:] + recipes[:k]:
                run = runner.measure(name, r)
                runs.append(run)
                print(
                    f"round {r + 1}/{args.rounds} {name:14s} {run.steps:6d} steps in {run.train_s:7.1f}s "
                    f"(calibrated {run.calib_step_s:.3f} s/step + {run.calib_fixed_s:.1f}s once)  "
                    f"val {run.val_bpb:.4f} bits/byte ({run.val_loss:.4f} nats/token)",
                    flush=True,
                )
    print()
    print(summary(runs, recipes))
    print(f"\nspread = min-max over rounds; total {time.perf_counter() - t0:.0f}s")
    print(f"reproduce: {reproduce(args, recipes)}")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "data": facts, "runs": [asdict(r) for r in runs]}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
