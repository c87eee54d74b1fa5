"""Single-stream greedy decoding speed: talm's `generate_ids` against llama.cpp (llama-cpp-python) on the same
model, its GGUF export.

    .venv/bin/python benchmarks/bench_llamacpp.py                    # small preset's shape, f32, 1 thread
    .venv/bin/python benchmarks/bench_llamacpp.py --quant q8_0 --rounds 7 --profile

The model has the `small` preset's shape (6 layers, 6 heads, width 384, context 512; 11M parameters with
tokenizers/base.json) in llama.cpp's `llama` architecture, its most used one: SwiGLU instead of the preset's
ReLU² MLP (the same weight count: 3 x 384 x 1024 = 2 x 384 x 1536) and no QK-norm (the preset's own options
export as `apertus`). Random weights: speed does not depend on them. talm (its weights column-major, as
generate, chat and serve load a model on CPU), talm with the same weights row-major (as before that) and llama.cpp
decode the same prompt greedily for --new-tokens tokens (the prompt's prefill included), on the same number of
threads, one after the other in each of --rounds rounds (interleaved, so drifts in the machine's load hit all
alike); the median of each is reported, and whether their tokens agree (they should at f32). --profile then shows where talm's
one-token step spends its time (torch.profiler, by operator) and how long the same layers take at width 48:
the per-token cost of dispatch and Python alone, with next to no arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from talm.model.config import ModelConfig
from talm.model.gpt import GPT
from talm.tokenizer.api import Tokenizer
from talm.train.config import PRESETS
from talm.use.gguf import QUANTS, export_gguf
from talm.use.sample import generate_ids

ROOT = Path(__file__).resolve().parents[1]


def talm_run(model: GPT, prompt: list[int], n: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = [s[0] for s in generate_ids(model, [prompt], max_new_tokens=n, temperature=0.0)]
    return time.perf_counter() - start, tokens


def llama_run(llm, prompt: list[int], n: int) -> tuple[float, list[int]]:  # noqa: ANN001 (llama_cpp.Llama)
    llm.reset()  # else generate reuses the cached prompt of the round before, skipping its prefill
    start = time.perf_counter()
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if len(tokens) == n:
            break
    return time.perf_counter() - start, tokens


def profile_talm_step(model: GPT, prompt: list[int], steps: int) -> None:
    """torch.profiler's table of operators over `steps` one-token steps (after the prefill), by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    gen = generate_ids(model, [prompt], max_new_tokens=steps + 1, temperature=0.0)
    next(gen)  # the prefill and the first token
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in gen:
            pass
        wall = time.perf_counter() - start
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    print(
        f"\ntalm one-token step: {wall / steps * 1e3:.2f} ms wall (under the profiler), by operator:\n{table}"
    )


@torch.inference_mode()
def matrix_products_alone(model: GPT, rows: int = 1, repeats: int = 20) -> dict[str, float]:
    """Seconds for one step's matrix products (every linear layer, the output layer included, on `rows` vectors),
    back to back with nothing between them, with the weights row-major and column-major (interleaved): the step's
    arithmetic and weight streaming without the rest."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    orders = {
        "row-major": [w.contiguous() for w in weights],
        "column-major": [w.t().contiguous().t() for w in weights],
    }
    vectors = [torch.randn(rows, w.shape[1]) for w in weights]
    times: dict[str, list[float]] = {name: [] for name in orders}
    for _ in range(repeats):
        for name, ws in orders.items():
            start = time.perf_counter()
            for w, x in zip(ws, vectors, strict=True):
                torch.nn.functional.linear(x, w)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=400)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="threads for each engine (default: 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument(
        "--quant", default="f32", choices=QUANTS, help="the GGUF file's weights (default: f32)"
    )
    parser.add_argument("--tokenizer", default=str(ROOT / "tokenizers" / "base.json"))
    parser.add_argument("--profile", action="store_true", help="then profile talm's one-token step")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install 'talm[llamacpp]' (it builds llama.cpp)")

    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    shape = dict(PRESETS["small"]["model"]) | {"qk_norm": False, "mlp": "swiglu", "zero_init_proj": False}
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **shape)).eval()
    prompt = torch.randint(
        0, tokenizer.vocab_size - len(tokenizer.special_tokens), (args.prompt_tokens,)
    ).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(model, tokenizer, Path(tmp) / "small.gguf", quant=args.quant)
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=model.config.context_length,
            n_batch=model.config.context_length,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            verbose=False,
        )
    # talm as generate, chat and serve load a model on CPU (weights column-major), and the same weights row-major
    # (as before that): the same values, so the same tokens.
    row_major = GPT(model.config).eval()
    row_major.load_state_dict(model.state_dict())
    model.store_weights_column_major()
    print(" ".join(["python", *sys.argv]))
    print(
        f"small preset's shape, llama options ({model.num_params() / 1e6:.1f}M parameters), prompt "
        f"{args.prompt_tokens} tokens + {args.new_tokens} new, greedy, batch 1, {args.threads} thread(s); "
        f"talm float32 (torch {torch.__version__}), llama.cpp {args.quant} (llama-cpp-python {llama_cpp.__version__})"
    )
    runners = {
        "talm": lambda: talm_run(model, prompt, args.new_tokens),
        "talm row-major": lambda: talm_run(row_major, prompt, args.new_tokens),
        "llama.cpp": lambda: llama_run(llm, prompt, args.new_tokens),
    }
    talm_run(model, prompt, 16)  # warm-up (allocator, kernels, caches)
    talm_run(row_major, prompt, 16)
    llama_run(llm, prompt, 16)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, list[int]] = {}
    same = True
    for r in range(args.rounds):
        for name, run in runners.items():
            t, out = run()
            seconds[name].append(t)
            same &= tokens.setdefault(name, out) == out == tokens["talm"]
        rates = "   ".join(f"{name} {args.new_tokens / s[-1]:7.1f}" for name, s in seconds.items())
        print(f"round {r + 1} (tokens/s): {rates}")
    rate = {name: args.new_tokens / statistics.median(s) for name, s in seconds.items()}
    talm_rate, llama_rate = rate["talm"], rate["llama.cpp"]
    print(
        f"median: talm {talm_rate:.1f} tokens/s (row-major {rate['talm row-major']:.1f}: column-major "
        f"{talm_rate / rate['talm row-major']:.2f}x), llama.cpp {llama_rate:.1f} tokens/s: talm / llama.cpp = "
        f"{talm_rate / llama_rate:.2f} ({llama_rate / talm_rate:.1f}x slower); same tokens: {'yes' if same else 'NO'}"
    )
    talm_s, llama_s = seconds["talm"], seconds["llama.cpp"]
    if args.profile:
        profile_talm_step(model, prompt, min(args.new_tokens, 100))
        # The same layers at width 48: the same operators and Python, almost no arithmetic nor weights to stream.
        narrow = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **(shape | {"d_model": 48}))).eval()
        n = args.new_tokens
        floor = min(talm_run(narrow, prompt, n)[0] for _ in range(3)) / n
        step = statistics.median(talm_s) / n
        products = matrix_products_alone(model)["column-major"]
        for rows in (1, 2, 8, 64, 512):
            by_order = matrix_products_alone(model, rows, repeats=max(9, 40 // rows))
            row, col = by_order["row-major"], by_order["column-major"]
            print(
                f"the step's products on {rows} row(s): row-major {row * 1e3:.2f} ms, column-major "
                f"{col * 1e3:.2f} ms ({row / col:.2f}x)"
            )
        print(
            f"talm's step: {step * 1e3:.2f} ms; the same {shape['n_layer']} layers at width 48: {floor * 1e3:.2f} ms "
            f"(per-token dispatch and Python: {floor / step:.0%} of the step); the step's matrix products alone, "
            f"back to back: {products * 1e3:.2f} ms; llama.cpp's step: {statistics.median(llama_s) / n * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
