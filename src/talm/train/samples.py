"""Samples during training (`--sample-every N`, `--sample-prompt TEXT`): at the first evaluation every N steps,
and at the last, a short greedy and a sampled continuation of each prompt, printed under the progress bar and
recorded with the evaluation in metrics.jsonl (its "samples" field: [{"prompt", "greedy", "sampled"}]), so
people watch their model learn. Generation is `talm.model.sample`'s, with the KV cache.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from talm.model.sample import FINISHED, generate_ids

if TYPE_CHECKING:
    from talm.model.gpt import GPT
    from talm.tokenizer.api import Tokenizer
    from talm.train.config import RunConfig
    from talm.train.precision import Precision

TEMPERATURE, TOP_K = 0.8, 200  # the sampled continuation: nanoGPT's sample.py defaults


def is_due(step: int, every: int | None, eval_every: int, last: bool) -> bool:
    """Whether the evaluation at `step` samples: the first one at or after each multiple of `every` (the
    previous evaluation was eval_every steps before), and the last one."""
    if not every:
        return False
    return last or step // every > max(step - eval_every, 0) // every


def continuation(
    model: GPT, tokenizer: Tokenizer, precision: Precision, prompt_ids: list[int], temperature: float, *,
    max_new_tokens: int, seed: int, sharded: bool,
) -> str:  # fmt: skip
    """The prompt's continuation up to <|endoftext|>. Under FSDP (`sharded`) each forward pass is a collective of
    every rank: one whose sampling ended early would leave the others waiting for it forever, so a sharded model
    generates all max_new_tokens on every rank (the same forward passes whatever each picks) and the text is cut
    after; a whole model stops at <|endoftext|>."""
    with precision.autocast():
        picked = [
            step[0]
            for step in generate_ids(
                model, [prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=TOP_K,
                eot_id=None if sharded else tokenizer.eot_id, seed=seed, vocab_size=tokenizer.vocab_size,
            )
        ]  # fmt: skip
    ends = [i for i, t in enumerate(picked) if t in (FINISHED, tokenizer.eot_id)]
    return tokenizer.decode(picked[: ends[0]] if ends else picked)


def samples_at_eval(
    model: GPT, tokenizer: Tokenizer, precision: Precision, cfg: RunConfig, step: int, *, sharded: bool,
    is_main: bool,
) -> dict[str, Any]:  # fmt: skip
    """{"samples": [...]} to record with the evaluation at `step` (printed on rank 0), or {} when none are due."""
    t = cfg.train
    if not is_due(step, t.sample_every, t.eval_every, step >= t.max_steps):
        return {}
    context = cfg.model.context_length
    samples = []
    for prompt in t.sample_prompts or [""]:
        ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
        ids = ids[-(context - 1) :]
        greedy, sampled = (
            continuation(
                model,
                tokenizer,
                precision,
                ids,
                temperature,
                max_new_tokens=t.sample_tokens,
                seed=step,
                sharded=sharded,
            )  # fmt: skip
            for temperature in (0.0, TEMPERATURE)
        )
        samples.append({"prompt": prompt, "greedy": greedy, "sampled": sampled})
        if is_main:
            text = f"[step {step}] {prompt!r}\n  greedy:  {greedy!r}\n  sampled: {sampled!r}"
            tqdm.write(text, file=sys.stderr)  # beside the bar; stdout keeps the run's summary only
    return {"samples": samples}
