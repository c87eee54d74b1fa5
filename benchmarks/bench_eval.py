"""Speed of the built-in benchmark scorer (talm.eval.scoring.score_tokens) on HellaSwag-shaped work.

    .venv/bin/python benchmarks/bench_eval.py                                   # CPU, tiny preset's shape
    .venv/bin/python benchmarks/bench_eval.py --preset gpt2-124m --vocab-size 50304 --examples 20 --batch-sizes 8
    .venv/bin/python benchmarks/bench_eval.py --device cuda --preset gpt2-124m --vocab-size 50304 --dtype bfloat16 --examples 10042

A model of a preset's shape (random weights: speed does not depend on them) scores synthetic multiple-choice
examples shaped like HellaSwag's validation split in GPT-2 tokens: 4 endings per example, contexts of 20-80
tokens and endings of 10-40 (the real ones average about 40 and 20), each request scored as in `evaluate`
(<|endoftext|> + context + ending in one KV-free forward pass, an example's endings sharing one row and
its context). Prints examples/s for each batch size, the time
the 10,042 examples of HellaSwag would take at that rate, and checks that every batch size gives the same
log-likelihoods as batch size 1.
"""

from __future__ import annotations

import argparse
import time
from contextlib import AbstractContextManager, nullcontext

import torch

from talm.eval.scoring import score_tokens
from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.train.config import PRESETS
from talm.train.dist import pick_device
from talm.use.config import DTYPES

HELLASWAG_EXAMPLES = 10_042


def hellaswag_shaped(examples: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high + 1, (1,), generator=gen))
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    requests = []
    for _ in range(examples):
        context = [0, *ids(20, 80)]
        requests += [(context, ids(10, 40)) for _ in range(4)]
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model shape (default: tiny)")
    parser.add_argument(
        "--examples", type=int, default=400, help="HellaSwag-shaped examples (4 requests each)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--vocab-size", type=int, default=1024, help="50304 for GPT-2's (rounded up to 64)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    shape = dict(PRESETS[args.preset].get("model", {}))
    shape["context_length"] = max(shape.get("context_length", 0), 128)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**shape, vocab_size=args.vocab_size)).to(device).eval()
    dtype = getattr(torch, args.dtype)

    def autocast() -> AbstractContextManager:
        return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    requests = hellaswag_shaped(args.examples, args.vocab_size)
    tokens = sum(len(c) + len(k) for c, k in requests)
    print(
        f"{args.preset} shape ({model.num_params() / 1e6:.1f}M parameters), {device.type}, {args.dtype}, "
        f"{torch.get_num_threads()} threads: {args.examples} examples, {len(requests)} requests, {tokens:,} tokens"
    )
    reference = None
    for batch_size in args.batch_sizes:
        score_tokens(model, requests[: 4 * batch_size], batch_size=batch_size, autocast=autocast)  # warm up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        scores = score_tokens(model, requests, batch_size=batch_size, autocast=autocast)
        seconds = time.perf_counter() - start  # score_tokens ends with .tolist(): the device is synchronised
        lls = torch.tensor([ll for ll, _ in scores])
        if reference is None:
            reference = lls
        drift = (lls - reference).abs().max().item()
        rate = args.examples / seconds
        print(
            f"batch {batch_size:>4}: {seconds:8.2f} s, {rate:8.2f} examples/s, {tokens / seconds:>10,.0f} tokens/s; "
            f"HellaSwag's {HELLASWAG_EXAMPLES:,} examples: {HELLASWAG_EXAMPLES / rate / 60:6.1f} min "
            f"(max |ll - batch {args.batch_sizes[0]}|: {drift:.1e})"
        )


if __name__ == "__main__":
    main()
