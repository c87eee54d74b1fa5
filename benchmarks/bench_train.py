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

from talm.config import merge
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.train.config import PRESETS, RunConfig
from talm.train.loop import Trainer
from talm.train.precision import peak_flops
from talm.train.stop import StopRequest

ROOT = Path(__file__).resolve().parents[1]


def make_shards(directory: Path, tokenizer: Tokenizer, tokens: int, seed: int = 0) -> Path:
    """A data directory (docs/design.md §2) of random token ids: throughput does not depend on the text."""
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


class TalmLoop:
    """talm's own step: `Trainer.train_step` (memmapped loader, fused AdamW, accumulation, clipping, the stats read every step)."""

    def __init__(self, cfg: RunConfig, model_dir: Path) -> None:
        self.trainer = Trainer(cfg, model_dir)
        self.stop = StopRequest()
        self.tokens_per_step = self.trainer.tokens_per_step

    def step(self) -> float:
        """One optimizer step; returns the seconds spent waiting for data in it."""
        before = self.trainer.data_wait
        stats, _ = self.trainer.train_step(self.stop)
        stats.tolist()  # as the loop does on log steps: wait until the step is finished on the device
        return self.trainer.data_wait - before


class PlainLoop:
    """The reference: a nanoGPT-style loop (random-offset batches from a memmap, default AdamW, loss.item())."""

    def __init__(self, cfg: RunConfig, shard: Path, device: torch.device) -> None:
        torch.manual_seed(cfg.train.seed)
        self.model = GPT(cfg.model).to(device)
        self.net = torch.compile(self.model) if cfg.train.compile else self.model
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.95), weight_decay=0.1
        )
        self.data = np.load(shard, mmap_mode="r")
        self.B, self.T, self.device = cfg.train.batch_size, cfg.model.context_length, device
        self.tokens_per_step = cfg.train.tokens_per_step or self.B * self.T
        self.accum = self.tokens_per_step // (self.B * self.T)
        use_bf16 = device.type == "cuda" and cfg.train.dtype in ("auto", "bfloat16")
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
        self.rng = np.random.default_rng(0)

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = self.rng.integers(0, len(self.data) - self.T - 1, self.B)
        x = torch.from_numpy(np.stack([self.data[i : i + self.T].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([self.data[i + 1 : i + 1 + self.T].astype(np.int64) for i in ix]))
        return x.to(self.device), y.to(self.device)

    def step(self) -> float:
        wait = 0.0
        for _ in range(self.accum):
            t = time.perf_counter()
            x, y = self.get_batch()
            wait += time.perf_counter() - t
            with self.amp():
                _, loss = self.net(x, y)
            (loss / self.accum).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()
        return wait


def measure(loops: dict[str, TalmLoop | PlainLoop], warmup: int, steps: int) -> dict[str, dict[str, float]]:
    """Step the loops in turn (talm, plain, talm, plain, ...), so a machine whose speed drifts slows both alike."""
    for _ in range(warmup):
        for loop in loops.values():
            loop.step()
    times: dict[str, list[float]] = {name: [] for name in loops}
    waits = dict.fromkeys(loops, 0.0)
    for _ in range(steps):
        for name, loop in loops.items():
            t = time.perf_counter()
            waits[name] += loop.step()
            times[name].append(time.perf_counter() - t)
    out = {}
    for name, loop in loops.items():
        total = sum(times[name])
        out[name] = {
            "step_s": statistics.median(times[name]),
            "tokens_per_s": loop.tokens_per_step * steps / total,
            "data_wait": waits[name] / total,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (of each loop)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    p.add_argument("--batch-size", type=int, help="micro-batch (default: the preset's)")
    p.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step (default: the preset's)")
    p.add_argument(
        "--vocab-size", type=int, help="model vocab (default: the tokenizer's; 50304 for gpt2-124m)"
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="default: on for cuda, off for cpu"
    )
    p.add_argument("--peak-tflops", type=float, help="peak to compute MFU against (default: see above)")
    p.add_argument("--skip-plain", action="store_true", help="only time talm's trainer")
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
        loops: dict[str, TalmLoop | PlainLoop] = {"talm trainer": TalmLoop(cfg, Path(tmp) / "model")}
        if not args.skip_plain:
            loops["plain loop"] = PlainLoop(cfg, data / "train_000001.npy", device)
        results = measure(loops, args.warmup, args.steps)
        model = loops["talm trainer"].trainer.model
        fpt, params = model.flops_per_token(), model.num_params()

    if device.type == "cuda":
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, torch.bfloat16)
        peak_note = f"{torch.cuda.get_device_name(device)} dense bf16 peak"
    else:
        peak = args.peak_tflops * 1e12 if args.peak_tflops else cpu_peak_flops()
        peak_note = f"measured fp32 matmul peak on {torch.get_num_threads()} threads"
    B, T = cfg.train.batch_size, cfg.model.context_length
    print(
        f"preset {args.preset} on {args.device}: {params / 1e6:.1f}M parameters, batch {B} x {T}, "
        f"{cfg.train.tokens_per_step or B * T} tokens/step, compile={compile_}, {args.steps} timed steps each "
        f"(interleaved), {torch.get_num_threads()} CPU thread(s)"
    )
    print(f"peak: {peak / 1e12:.3f} TFLOP/s ({peak_note})" if peak else "peak: unknown (pass --peak-tflops)")
    for name, r in results.items():
        mfu = f"{100 * fpt * r['tokens_per_s'] / peak:5.1f}%" if peak else "n/a"
        print(
            f"  {name:13s} {r['tokens_per_s']:>12,.0f} tokens/s  step {1000 * r['step_s']:8.1f} ms  MFU {mfu}  "
            f"data wait {100 * r['data_wait']:.2f}%"
        )
    if "plain loop" in results:
        ratio = results["talm trainer"]["tokens_per_s"] / results["plain loop"]["tokens_per_s"]
        print(f"  talm / plain tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
