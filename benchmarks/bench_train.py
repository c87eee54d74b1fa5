"""Training throughput: talm's trainer against a plain PyTorch loop with the same model and batch.

Prints tokens/s, model FLOPs utilisation (MFU) against a stated peak, and the share of step time spent waiting
for data, for talm's `Trainer.train_step` (memory-mapped loader, fused AdamW, accumulation, clipping) and for a
reference loop written here the plain way (a random-offset batch from a memmap, default AdamW, forward, backward,
step, loss.item()). Both train the same GPT on the same token shards for the same number of steps.

    python benchmarks/bench_train.py                                   # tiny preset on CPU
    python benchmarks/bench_train.py --device cuda --preset gpt2-124m  # bf16 + torch.compile on a GPU

Peaks: on CUDA the dense bf16 tensor-core peak of the GPU model (H100 SXM 989 TFLOP/s, ...; pass --peak-tflops
otherwise). On CPU there is no published figure for this virtual machine, so the peak is measured: the best of a
few 2048 x 2048 float32 matmuls on all threads, which is what the model's matmuls could reach at best.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from talm.config import PRESETS, RunConfig, merge
from talm.model import GPT
from talm.tokenizer import Tokenizer
from talm.trainer import StopRequest, Trainer

ROOT = Path(__file__).resolve().parents[1]
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def make_shards(directory: Path, tokenizer: Tokenizer, tokens: int, seed: int = 0) -> Path:
    """A data directory (CONTRACTS §2) of random token ids: throughput does not depend on the text."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for name, split, n in (("val_000000.npy", "val", 1 << 16), ("train_000001.npy", "train", tokens)):
        np.save(
            directory / name,
            rng.integers(0, tokenizer.vocab_size, n, dtype=np.int64).astype(tokenizer.token_dtype),
        )
        shards.append({"file": name, "split": split, "tokens": n, "documents": 1, "bytes": 4 * n})
    meta = {
        "format": "talm.shards/1",
        "tokenizer": {
            "path": str(tokenizer.path),
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
        },
        "dtype": np.dtype(tokenizer.token_dtype).name,
        "shard_size": tokens,
        "shards": shards,
        "complete": True,
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def cpu_peak_flops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = math.inf
    for _ in range(8):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


def gpu_peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_talm(cfg: RunConfig, model_dir: Path, warmup: int, steps: int) -> dict[str, float]:
    trainer = Trainer(cfg, model_dir)
    stop = StopRequest()
    for _ in range(warmup):
        trainer.train_step(stop)
    trainer.data_wait = 0.0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step(stop)  # ends with .tolist(): the step is finished on the device
        times.append(time.perf_counter() - t)
    total = sum(times)
    return {
        "step_s": statistics.median(times),
        "tokens_per_s": trainer.tokens_per_step * steps / total,
        "data_wait": trainer.data_wait / total,
        "flops_per_token": trainer.model.flops_per_token(),
        "params": trainer.model.num_params(),
    }


def bench_plain(
    cfg: RunConfig, shard: Path, device: torch.device, warmup: int, steps: int
) -> dict[str, float]:
    """The reference: nanoGPT-style loop, one micro-batch per step, default AdamW."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    net = torch.compile(model) if cfg.train.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = np.load(shard, mmap_mode="r")
    B, T = cfg.train.batch_size, cfg.model.context_length
    accum = (cfg.train.tokens_per_step or B * T) // (B * T)
    amp = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if device.type == "cuda" and cfg.train.dtype in ("auto", "bfloat16")
        else nullcontext()
    )
    rng = np.random.default_rng(0)
    wait = 0.0

    def get_batch():
        ix = rng.integers(0, len(data) - T - 1, B)
        x = torch.from_numpy(np.stack([data[i : i + T].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + T].astype(np.int64) for i in ix]))
        return x.to(device), y.to(device)

    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        for _ in range(accum):
            t_data = time.perf_counter()
            x, y = get_batch()
            if i >= warmup:
                wait += time.perf_counter() - t_data
            with amp:
                _, loss = net(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    total = sum(times)
    return {
        "step_s": statistics.median(times),
        "tokens_per_s": B * T * accum * steps / total,
        "data_wait": wait / total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    p.add_argument("--batch-size", type=int, help="micro-batch (default: the preset's)")
    p.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step (default: the preset's)")
    p.add_argument(
        "--vocab-size", type=int, help="model vocab (default: the tokenizer's; 50304 = GPT-2 size)"
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="default: the preset's, on cuda only"
    )
    p.add_argument("--peak-tflops", type=float, help="peak to compute MFU against (default: see above)")
    p.add_argument("--skip-plain", action="store_true", help="only time talm's trainer")
    p.add_argument(
        "--rounds", type=int, default=2, help="alternate talm / plain this many times; keep the best"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    tok = Tokenizer.from_file(ROOT / "tokenizers" / "base.json")
    overrides: dict = {"train": {"device": args.device, "eval_every": 10**9, "save_every": 10**9}}
    if args.batch_size:
        overrides["train"]["batch_size"] = args.batch_size
    if args.tokens_per_step:
        overrides["train"]["tokens_per_step"] = args.tokens_per_step
    compile_ = args.compile if args.compile is not None else args.device == "cuda"
    overrides["train"]["compile"] = compile_
    vocab = args.vocab_size or (50304 if args.preset == "gpt2-124m" else None)
    if vocab:
        overrides["model"] = {"vocab_size": vocab}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_shards(Path(tmp) / "data", tok, tokens=1 << 22)
        overrides["data"] = {"dir": str(data)}
        cfg = RunConfig.model_validate(merge(PRESETS[args.preset], overrides))
        talm, plain = None, None
        for r in range(
            args.rounds
        ):  # alternating evens out a machine whose speed drifts; keep each one's best
            t = bench_talm(cfg, Path(tmp) / f"model{r}", args.warmup, args.steps)
            talm = t if talm is None or t["tokens_per_s"] > talm["tokens_per_s"] else talm
            if not args.skip_plain:
                q = bench_plain(cfg, data / "train_000001.npy", device, args.warmup, args.steps)
                plain = q if plain is None or q["tokens_per_s"] > plain["tokens_per_s"] else plain

    if device.type == "cuda":
        peak = args.peak_tflops * 1e12 if args.peak_tflops else gpu_peak_flops(device)
        peak_note = f"{torch.cuda.get_device_name(device)} dense bf16 peak"
    else:
        peak = args.peak_tflops * 1e12 if args.peak_tflops else cpu_peak_flops()
        peak_note = f"measured fp32 matmul peak on {torch.get_num_threads()} threads"
    fpt = talm["flops_per_token"]
    B, T = cfg.train.batch_size, cfg.model.context_length
    print(
        f"preset {args.preset} on {args.device}: {talm['params'] / 1e6:.1f}M parameters, batch {B} x {T}, "
        f"{cfg.train.tokens_per_step or B * T} tokens/step, compile={compile_}, {args.steps} timed steps, "
        f"best of {args.rounds} round(s), {torch.get_num_threads()} CPU thread(s)"
    )
    print(f"peak: {peak / 1e12:.3f} TFLOP/s ({peak_note})" if peak else "peak: unknown (pass --peak-tflops)")
    for name, r in (("talm trainer", talm), ("plain loop", plain)):
        if r is None:
            continue
        mfu = f"{100 * fpt * r['tokens_per_s'] / peak:5.1f}%" if peak else "n/a"
        print(
            f"  {name:13s} {r['tokens_per_s']:>12,.0f} tokens/s  step {1000 * r['step_s']:8.1f} ms  MFU {mfu}  "
            f"data wait {100 * r['data_wait']:.2f}%"
        )
    if plain:
        print(f"  talm / plain tokens/s: {talm['tokens_per_s'] / plain['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
