"""Generation speed with and without the KV cache, and against transformers' `generate`.

    .venv/bin/python benchmarks/bench_generate.py                       # CPU, tiny preset's shape
    .venv/bin/python benchmarks/bench_generate.py --device cuda --preset gpt2-124m --dtype bfloat16
    .venv/bin/python benchmarks/bench_generate.py --vs-transformers --preset small --threads 1 --new-tokens 400

With --vs-transformers: the model (random weights, the shared original-format tokenizer's vocabulary) is
exported with `export_hf` (what `export_model` writes) and loaded with transformers' AutoModelForCausalLM; both
generate the same greedy 400 tokens of one sequence, timed alternately (talm, transformers, talm, ...) so that
load on the machine falls on both alike; the best of --repeats each, and whether the tokens are the same.

A model of a preset's shape (random weights: speed does not depend on them) with its context raised to fit the
prompt and the longest generation, greedy decoding of one sequence, no stop at <|endoftext|>. Without the cache
every new token recomputes the whole sequence (O(n^2) work for n tokens); with it each token costs one
position. Prints tokens/s for each length and checks that both modes produce the same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.train.config import PRESETS
from talm.train.dist import pick_device
from talm.use.config import DTYPES
from talm.use.sample import generate_ids


def timed(
    model: GPT, prompt: list[int], new_tokens: int, use_cache: bool, repeats: int = 1
) -> tuple[float, list[int]]:
    """The best time of `repeats` greedy generations (the least disturbed by other work), and the tokens."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        steps = generate_ids(model, [prompt], max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache)
        tokens = [s[0] for s in steps]  # each step ends with .tolist(): the device is synchronised
        best = min(best, time.perf_counter() - start)
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model shape (default: tiny)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="time each case this many times, keep the best"
    )
    parser.add_argument(
        "--vs-transformers", action="store_true", help="time talm against transformers' generate instead"
    )
    parser.add_argument(
        "--row-major",
        action="store_true",
        help="keep talm's weights row-major on CPU (generate, chat and serve store them column-major there)",
    )
    args = parser.parse_args()
    if args.vs_transformers:
        vs_transformers(args)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    shape = dict(PRESETS[args.preset].get("model", {}))
    shape["context_length"] = max(shape.get("context_length", 0), args.prompt_tokens + max(args.new_tokens))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=args.vocab_size, **shape))
    model = model.to(device, getattr(torch, args.dtype)).eval()
    if device.type == "cpu" and not args.row_major:
        model.store_weights_column_major()
    prompt = torch.randint(0, args.vocab_size, (args.prompt_tokens,)).tolist()
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"{args.preset} shape ({model.num_params() / 1e6:.1f}M parameters, context {shape['context_length']}), "
        f"{args.dtype} on {device}{threads}, prompt {args.prompt_tokens} tokens, greedy, batch 1"
    )
    timed(model, prompt, 16, True)  # warm-up (allocator, kernels)
    timed(model, prompt, 16, False)
    print(f"{'new tokens':>10}  {'cache tok/s':>11}  {'no cache tok/s':>14}  {'speed-up':>8}  same tokens")
    for n in args.new_tokens:
        t_cache, with_cache = timed(model, prompt, n, True, args.repeats)
        t_full, without = timed(model, prompt, n, False, args.repeats)
        print(
            f"{n:>10}  {n / t_cache:>11,.0f}  {n / t_full:>14,.0f}  {t_full / t_cache:>7.1f}x  "
            f"{'yes' if with_cache == without else 'NO'}"
        )


def vs_transformers(args: argparse.Namespace) -> None:
    """talm's generate_ids against transformers' generate on the same exported model (see the docstring)."""
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from talm.tokenizer.api import Tokenizer
    from talm.use.export import export_hf

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_file(
        Path(__file__).parents[1] / "tests" / "fixtures" / "talm-original-base.json"
    )
    shape = dict(PRESETS[args.preset].get("model", {}))
    new = max(args.new_tokens)
    shape["context_length"] = max(shape.get("context_length", 0), args.prompt_tokens + new)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **shape)).eval()
    with torch.no_grad():  # the preset zero-initialises its output projections: give every weight some size
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
    prompt = torch.randint(0, tokenizer.vocab_size, (args.prompt_tokens,)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        hf = AutoModelForCausalLM.from_pretrained(
            export_hf(model, tokenizer, Path(tmp) / "m"), dtype=torch.float32
        )
    hf.eval()
    if not args.row_major:
        model.store_weights_column_major()
    ids = torch.tensor([prompt])

    def run_hf() -> tuple[float, list[int]]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=tokenizer.eot_id,
            )  # fmt: skip
        return time.perf_counter() - start, out[0, len(prompt) :].tolist()

    print(
        f"{args.preset} shape ({model.num_params() / 1e6:.1f}M parameters), float32 on cpu, "
        f"{torch.get_num_threads()} threads, prompt {args.prompt_tokens} tokens, greedy, {new} new tokens"
    )
    timed(model, prompt, 16, True), run_hf()  # warm-up
    talm_best = hf_best = float("inf")
    for _ in range(args.repeats):
        t, talm_tokens = timed(model, prompt, new, True)
        talm_best = min(talm_best, t)
        t, hf_tokens = run_hf()
        hf_best = min(hf_best, t)
        print(f"  talm {new / talm_best:,.1f} tok/s (best so far), transformers "
              f"{new / hf_best:,.1f} tok/s (best so far)")  # fmt: skip
    print(
        f"talm {new / talm_best:,.1f} tok/s, transformers {new / hf_best:,.1f} tok/s: "
        f"talm / transformers {hf_best / talm_best:.2f}x; same tokens: {'yes' if talm_tokens == hf_tokens else 'NO'}"
    )


if __name__ == "__main__":
    main()
