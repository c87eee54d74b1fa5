"""Attention kept inside packed conversations: the cost of a block-diagonal causal mask against plain causal
attention (`is_causal`), for `--train.isolate_conversations`.

Two measurements, interleaved so that a busy machine slows both alike, best and median of `--repeats`:
the SDPA call alone (forward + backward) and a whole training step (forward + backward) of a GPT, with
conversations of ~50 tokens packed into each row.

    python benchmarks/bench_doc_mask.py                      # CPU, the tiny preset's shape
    python benchmarks/bench_doc_mask.py --device cuda --context 1024 --d-model 768 --layers 12 --heads 12
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from talm.model.config import ModelConfig
from talm.model.gpt import GPT


def timed(fn: Callable[[], None], device: torch.device, calls: int) -> float:
    """Seconds per call of `fn` (after the work on the device is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def compare(
    name: str, plain: Callable[[], None], masked: Callable[[], None], args: argparse.Namespace
) -> None:
    device = torch.device(args.device)
    plain(), masked()  # warm-up
    times: dict[str, list[float]] = {"causal": [], "block mask": []}
    for _ in range(args.repeats):
        times["causal"].append(timed(plain, device, args.calls))
        times["block mask"].append(timed(masked, device, args.calls))
    best = {k: min(v) * 1e3 for k, v in times.items()}
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        f"{name}: causal {best['causal']:.2f} ms (median {median['causal']:.2f}), block mask "
        f"{best['block mask']:.2f} ms (median {median['block mask']:.2f}): "
        f"{100 * (best['block mask'] / best['causal'] - 1):+.1f}% (best), "
        f"{100 * (median['block mask'] / median['causal'] - 1):+.1f}% (median)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--conversation", type=int, default=50, help="mean conversation length in tokens")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    device, B, T = torch.device(args.device), args.batch, args.context
    torch.manual_seed(0)
    doc_ids = torch.cumsum((torch.rand(B, T, device=device) < 1 / args.conversation).long(), dim=1)

    head_dim = args.d_model // args.heads
    q, k, v = (torch.randn(B, args.heads, T, head_dim, device=device, requires_grad=True) for _ in range(3))
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)

    def sdpa(m: torch.Tensor | None) -> None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=m is None).sum().backward()

    compare(f"SDPA {B}x{args.heads}x{T}x{head_dim}", lambda: sdpa(None), lambda: sdpa(mask), args)

    config = ModelConfig(
        vocab_size=1024, context_length=T, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
        qk_norm=True, mlp="relu2",
    )  # fmt: skip
    model = GPT(config).to(device)
    x = torch.randint(0, 1024, (B, T), device=device)

    def step(d: torch.Tensor | None) -> None:
        model(x, x, doc_ids=d)[1].backward()

    compare(
        f"GPT step {args.layers}x{args.d_model}, {B}x{T}", lambda: step(None), lambda: step(doc_ids), args
    )


if __name__ == "__main__":
    main()
