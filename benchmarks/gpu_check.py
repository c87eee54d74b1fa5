"""The GPU check: everything talm needs a GPU to prove, in one command that fits a short loan of one H100/H200.

    python benchmarks/gpu_check.py --out DIR          # on a CUDA machine: at most ~8 minutes
    python benchmarks/gpu_check.py --dry-run --out DIR  # on CPU: the same steps at toy sizes (tests run this)

1. correctness on the device: the model's forward/backward under autocast, KV-cache logits equal to the full
   forward, cached and uncached greedy generation giving the same tokens, trainer steps in bfloat16 and in
   float16 with the GradScaler (the loss falls), and a checkpoint round trip (the loaded model's logits equal);
2. training throughput of the gpt2-124m preset (tokens/s and MFU from metrics.jsonl, first window dropped):
   eager vs torch.compile in one process, and DDP and FSDP each as a 1-process torchrun with NCCL;
3. generation tokens/s with the KV cache (batch 1 and 8);
4. a checkpoint trained on the device, exported to transformers, and its logits equal to talm's (float32);
5. one summary table, printed and written to DIR/gpu_check.md and DIR/gpu_check.json.

Every step records ok / FAIL (with the error's last line) / skip (with why) and the rest still run. The device
machine of this workplace has torch and transformers but not pydantic: docs/benchmarks.md ("GPU check") gives
the exact command that carries it as wheels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's talm, installed or not

from talm.data.manifest import build_manifest, manifest_bytes, manifest_header, shard_entry  # noqa: E402
from talm.tokenizer.api import Tokenizer  # noqa: E402

TEXT = ROOT / "tiny-shakespeare.txt"
TOKENIZER = ROOT / "tokenizers" / "base.json"


@dataclass
class Row:
    step: str
    status: str = "ok"
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0


class Check:
    """Runs the steps, each timed and caught, and collects their rows."""

    def __init__(self, device: torch.device, dry_run: bool, work: Path) -> None:
        self.device, self.dry_run, self.work, self.rows = device, dry_run, work, []

    def step(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        row = Row(name)
        try:
            row.figures = fn() or {}
        except Skip as why:
            row.status, row.note = "skip", str(why)
        except Exception as err:  # one failing step must not hide the others
            traceback.print_exc()
            lines = str(err).strip().splitlines()
            row.status, row.note = "FAIL", f"{type(err).__name__}: {lines[-1] if lines else ''}"
        row.seconds = round(time.perf_counter() - t, 1)
        print(f"   {row.status} {row.figures} {row.note} ({row.seconds}s)", flush=True)
        self.rows.append(row)


class Skip(Exception):
    pass


def make_data(out: Path, tokenizer: Tokenizer, repeat: int = 1) -> Path:
    """A talm data directory of tiny-shakespeare (`repeat` times), written with the manifest's own definition."""
    text = TEXT.read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n") if d.strip()] * repeat
    ids = tokenizer.encode_batch(docs)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(tokenizer.token_dtype)
    shards = []
    for split, members in (("val", range(0, 200)), ("train", range(200, len(docs)))):
        arr = np.concatenate([np.concatenate(([tokenizer.eot_id], ids[i])) for i in members]).astype(dtype)
        name = f"{split}_{len(shards):06d}.npy"
        np.save(out / name, arr)
        nbytes = sum(len(docs[i].encode("utf-8")) for i in members)
        shards.append(shard_entry(name, split, int(arr.size), len(members), nbytes))
    source = {
        "dataset": "tiny-shakespeare",
        "source": "local",
        "config": "default",
        "text_column": "text",
        "files": [str(TEXT)],
        "tokenizer": {
            "path": str(tokenizer.path),
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
        },
    }
    header = manifest_header(
        source, dtype=dtype, shard_size=max(s["tokens"] for s in shards), worker_index=0, num_workers=1,
        val_tokens=shards[0]["tokens"], max_tokens=None, arguments={"made_by": "gpu_check"},
    )  # fmt: skip
    (out / "meta.json").write_bytes(
        manifest_bytes(build_manifest(header, shards, resume=None, empty_documents=0))
    )
    return out


# ------------------------------------------------------------------------------------------------ 1. correctness


def tiny_config(vocab: int) -> Any:
    from talm.model.config import ModelConfig

    return ModelConfig(vocab_size=vocab, context_length=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64)


def check_model(chk: Check) -> dict[str, Any]:
    from talm.model.gpt import GPT, KVCache
    from talm.train.precision import Precision

    torch.manual_seed(0)
    model = GPT(tiny_config(300)).to(chk.device)
    ids = torch.randint(0, 300, (2, 48), device=chk.device)
    with Precision("auto", chk.device).autocast():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # compare in true float32
    with torch.no_grad():
        full = model(ids)[0]
        cache = KVCache(model.config, 2, 48, chk.device, torch.float32)
        parts = [model(ids[:, :8], cache=cache)[0]] + [
            model(ids[:, t : t + 1], cache=cache)[0] for t in range(8, 48)
        ]
    diff = (torch.cat(parts, 1) - full).abs().max().item()
    assert diff < 1e-3, f"KV-cache logits differ by {diff}"
    return {"loss": round(loss.item(), 4), "kv_cache_max_diff": f"{diff:.1e}"}


def check_generation(chk: Check) -> dict[str, Any]:
    from talm.model.gpt import GPT
    from talm.use.sample import generate_ids

    torch.manual_seed(0)
    model = GPT(tiny_config(300)).to(chk.device).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]  # different lengths: the cached path left-pads
    cached = list(generate_ids(model, prompts, max_new_tokens=20, temperature=0.0, use_cache=True))
    plain = list(generate_ids(model, prompts, max_new_tokens=20, temperature=0.0, use_cache=False))
    assert cached == plain, "greedy tokens differ with and without the KV cache"
    return {"tokens": sum(len(c) for c in cached)}


def train_tiny(chk: Check, dtype: str, name: str) -> dict[str, Any]:
    from talm.train.config import RunConfig
    from talm.train.loop import Trainer
    from talm.train.metrics import read_metrics
    from talm.use.load import load_checkpoint

    if chk.device.type != "cuda":
        if dtype == "float16":
            raise Skip("float16 needs CUDA")
        dtype = "auto"  # a dry run checks the steps, not bf16 emulated on a CPU (several times slower)
    model_dir = chk.work / "models" / name
    cfg = RunConfig.model_validate(
        {
            "model": {"context_length": 64, "n_layer": 2, "n_head": 4, "d_model": 64},
            "optim": {"lr": 3e-3, "warmup_steps": 5},
            "train": {"max_steps": 15 if chk.dry_run else 60, "batch_size": 16, "eval_every": 1000,
                      "save_every": 1000, "log_every": 5, "eval_tokens": 4096, "device": chk.device.type,
                      "dtype": dtype},
            "data": {"dir": str(chk.work / "data")},
        }
    )  # fmt: skip
    trainer = Trainer(cfg, model_dir)
    trainer.run()
    losses = [r["train_loss"] for r in read_metrics(model_dir) if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5, f"the loss did not fall: {losses}"
    loaded, _, _ = load_checkpoint(model_dir, "latest", chk.device)
    ids = torch.randint(0, trainer.model.config.vocab_size, (1, 32), device=chk.device)
    with torch.no_grad():
        diff = (loaded(ids)[0] - trainer.model.eval()(ids)[0]).abs().max().item()
    assert diff == 0.0, f"the reloaded checkpoint's logits differ by {diff}"
    return {"first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 3), "reload_diff": diff}


# ------------------------------------------------------------------------------------------------ 2. throughput


def throughput(chk: Check, label: str, compile_: bool, launcher: str, parallel: str | None) -> dict[str, Any]:
    """One short gpt2-124m run as a user starts it; tokens/s and MFU of its steady windows."""
    model_dir = chk.work / "models" / f"speed-{label}"  # train_model writes models/NAME under its working dir
    if chk.dry_run:  # the plumbing only: toy steps, and no compilation (a minute per run on a CPU)
        sizes = ["--preset", "tiny", "--max-steps", "4", "--log-every", "1", "--batch-size", "4"]
        sizes += ["--eval-tokens", "1024"]
        compile_ = False
    else:
        sizes = ["--preset", "gpt2-124m", "--max-steps", "40", "--log-every", "5", "--batch-size", "32",
                 "--train.tokens_per_step", str(32 * 1024 * 4), "--model.vocab_size", "50304"]  # fmt: skip
    args = ["-n", model_dir.name, "-d", str(chk.work / "data"), *sizes, "--eval-every", "100000",
            "--save-every", "100000", "--compile" if compile_ else "--no-compile"]  # fmt: skip
    if parallel:
        args += ["--train.parallel", parallel]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "talm.cli.train_model", *args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "talm.cli.train_model", *args]
    done = subprocess.run(cmd, env=env, cwd=chk.work, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        said = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(said[-1] if said else f"exit {done.returncode}")
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "tokens_per_s" in r][1:]  # the first window holds compilation
    tps = float(np.median([r["tokens_per_s"] for r in steady]))
    mfu = [r["mfu"] for r in steady if "mfu" in r]
    return {"tokens_per_s": round(tps), "mfu": round(float(np.median(mfu)), 3) if mfu else None}


# ------------------------------------------------------------------------------------------------ 3-4.


def generation_speed(chk: Check) -> dict[str, Any]:
    from talm.config import merge
    from talm.model.config import ModelConfig
    from talm.model.gpt import GPT
    from talm.train.config import PRESETS
    from talm.use.sample import generate_ids

    preset = "tiny" if chk.dry_run else "gpt2-124m"
    vocab = 1024 if chk.dry_run else 50304
    model_cfg = ModelConfig.model_validate(merge(PRESETS[preset]["model"], {"vocab_size": vocab}))
    dtype = torch.bfloat16 if chk.device.type == "cuda" else torch.float32
    model = GPT(model_cfg).to(chk.device, dtype).eval()
    new = 16 if chk.dry_run else 256
    out = {}
    for batch in (1, 8):
        prompts = [list(range(1, 65))] * batch
        list(generate_ids(model, prompts, max_new_tokens=4, temperature=0.0))  # warm-up
        if chk.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        got = list(generate_ids(model, prompts, max_new_tokens=new, temperature=1.0, seed=0))
        if chk.device.type == "cuda":
            torch.cuda.synchronize()
        out[f"batch{batch}_tokens_per_s"] = round(sum(len(g) for g in got) / (time.perf_counter() - t))
    return out


def export_equal_logits(chk: Check) -> dict[str, Any]:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise Skip(f"transformers is not installed ({err})") from None
    from talm.use.export import export_hf
    from talm.use.load import load_checkpoint

    name = "bf16" if (chk.work / "models" / "bf16" / "latest").exists() else "fp16"
    if not (chk.work / "models" / name / "latest").exists():
        raise Skip("no trainer step left a checkpoint to export")
    model, tokenizer, meta = load_checkpoint(chk.work / "models" / name, "latest", "cpu")
    out = export_hf(model, tokenizer, chk.work / "export", meta=meta, overwrite=True)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 48))
    with torch.no_grad():
        diff = (hf(ids).logits[..., : tokenizer.vocab_size] - model(ids)[0]).abs().max().item()
    assert diff < 1e-4, f"transformers' logits differ from talm's by {diff}"
    return {"checkpoint": f"{name} run, trained on {chk.device.type}", "max_diff": f"{diff:.1e}"}


# ------------------------------------------------------------------------------------------------ main


def summary(rows: list[Row], device: str) -> str:
    lines = [
        f"# talm GPU check on {device}",
        "",
        "| step | status | figures | note | s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        figures = ", ".join(f"{k}={v}" for k, v in r.figures.items())
        lines.append(f"| {r.step} | {r.status} | {figures} | {r.note} | {r.seconds} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on CPU (gloo), for the tests")
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="where the summary files go")
    ap.add_argument(
        "--skip", nargs="*", default=[], help="steps to leave out, by name prefix (e.g. throughput)"
    )
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        chk = Check(device, args.dry_run, Path(tmp))
        make_data(chk.work / "data", Tokenizer.from_file(TOKENIZER))
        steps: list[tuple[str, Callable[[], dict[str, Any] | None]]] = [
            ("model forward/backward + KV cache", lambda: check_model(chk)),
            ("generation: cache == no cache", lambda: check_generation(chk)),
            ("trainer bf16 + checkpoint round trip", lambda: train_tiny(chk, "bfloat16", "bf16")),
            ("trainer fp16 + GradScaler", lambda: train_tiny(chk, "float16", "fp16")),
            ("throughput eager", lambda: throughput(chk, "eager", False, "python", None)),
            ("throughput compile", lambda: throughput(chk, "compile", True, "python", None)),
            ("throughput compile DDP torchrun", lambda: throughput(chk, "ddp", True, "torchrun", "ddp")),
            ("throughput compile FSDP torchrun", lambda: throughput(chk, "fsdp", True, "torchrun", "fsdp")),
            ("generation speed (KV cache)", lambda: generation_speed(chk)),
            ("export to transformers: equal logits", lambda: export_equal_logits(chk)),
        ]
        for step_name, fn in steps:
            if any(step_name.startswith(s) for s in args.skip):
                chk.rows.append(Row(step_name, "skip", note="--skip"))
                continue
            chk.step(step_name, fn)
    table = summary(chk.rows, name)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(table, encoding="utf-8")
    (args.out / "gpu_check.json").write_text(
        json.dumps(
            {"device": name, "torch": torch.__version__, "rows": [asdict(r) for r in chk.rows]}, indent=1
        )
    )
    failed = [r.step for r in chk.rows if r.status == "FAIL"]
    print(f"gpu_check: {len(chk.rows) - len(failed)} of {len(chk.rows)} steps passed or skipped in "
          f"{time.perf_counter() - t0:.0f}s; {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
