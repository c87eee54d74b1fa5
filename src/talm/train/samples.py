"""Samples during training (`--sample-every N`, `--sample-prompt TEXT`): at the first evaluation every N steps,
and at the last, a short greedy and a sampled continuation of each prompt, printed under the progress bar and
recorded with the evaluation in metrics.jsonl (its "samples" field: [{"prompt", "greedy", "sampled"}]), so
people watch their model learn. Every prompt's greedy and sampled continuation is generated together, in one
batch of `talm.model.engine`'s Engine: each row computes what it would alone, and a seeded row draws what it
would alone, so the texts are those of one prompt at a time.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from talm.model.engine import Engine, Settings

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


def continuations(
    model: GPT, tokenizer: Tokenizer, precision: Precision, prompts: list[list[int]], *, max_new_tokens: int,
    seed: int, sharded: bool,
) -> list[tuple[str, str]]:  # fmt: skip
    """Each prompt's (greedy, sampled) continuation up to <|endoftext|>, all in one batch; the sampled ones at
    TEMPERATURE and TOP_K, each seeded with `seed` (every row seeded: none draws from torch's global generator,
    which training goes on using). Under FSDP (`sharded`) each forward pass is a collective of every rank: one
    whose sampling ended early would leave the others waiting for it forever, so a sharded model generates all
    max_new_tokens for every row on every rank (the same forward passes whatever each picks) and the text is cut
    after; a whole model's rows stop at <|endoftext|>."""
    end_ids = () if sharded else (tokenizer.eot_id,)
    rows = [(ids, temperature) for ids in prompts for temperature in (0.0, TEMPERATURE)]
    settings = [
        Settings(max_new_tokens=max_new_tokens, temperature=t, top_k=TOP_K, seed=seed, end_ids=end_ids)
        for _, t in rows
    ]
    engine = Engine(model, slots=len(rows), vocab_size=tokenizer.vocab_size)
    with precision.autocast():
        picked = engine.generate([ids for ids, _ in rows], settings)
    texts = []
    for ids in picked:
        ends = [i for i, t in enumerate(ids) if t == tokenizer.eot_id]
        texts.append(tokenizer.decode(ids[: ends[0]] if ends else ids))
    return list(zip(texts[0::2], texts[1::2], strict=True))


def samples_at_eval(
    model: GPT, tokenizer: Tokenizer, precision: Precision, cfg: RunConfig, step: int, *, sharded: bool,
    is_main: bool,
) -> dict[str, Any]:  # fmt: skip
    """{"samples": [...]} to record with the evaluation at `step` (printed on rank 0), or {} when none are due."""
    t = cfg.train
    if not is_due(step, t.sample_every, t.eval_every, step >= t.max_steps):
        return {}
    context = cfg.model.context_length
    prompts = t.sample_prompts or [""]
    ids = [(tokenizer.encode(p) if p else [tokenizer.eot_id])[-(context - 1) :] for p in prompts]
    texts = continuations(
        model, tokenizer, precision, ids, max_new_tokens=t.sample_tokens, seed=step, sharded=sharded
    )
    samples = []
    for prompt, (greedy, sampled) in zip(prompts, texts, strict=True):
        samples.append({"prompt": prompt, "greedy": greedy, "sampled": sampled})
        if is_main:
            text = f"[step {step}] {prompt!r}\n  greedy:  {greedy!r}\n  sampled: {sampled!r}"
            tqdm.write(text, file=sys.stderr)  # beside the bar; stdout keeps the run's summary only
    return {"samples": samples}
