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
    from talm.train.loop import Trainer

TEMPERATURE, TOP_K = 0.8, 200  # the sampled continuation: nanoGPT's sample.py defaults


def is_due(step: int, every: int | None, eval_every: int, last: bool) -> bool:
    """Whether the evaluation at `step` samples: the first one at or after each multiple of `every` (the
    previous evaluation was eval_every steps before), and the last one."""
    if not every:
        return False
    return last or step // every > max(step - eval_every, 0) // every


def continuation(trainer: Trainer, prompt_ids: list[int], temperature: float) -> str:
    """The prompt's continuation up to <|endoftext|>. Under FSDP each forward pass is a collective of every rank:
    one whose sampling ended early would leave the others waiting for it forever, so a sharded model generates
    all sample_tokens tokens on every rank (the same forward passes whatever each picks) and the text is cut
    after; a whole model stops at <|endoftext|>."""
    tok, model = trainer.tokenizer, trainer.model
    stop_at_eot = not trainer.parallel.sharded
    with trainer.precision.autocast():
        picked = [
            step[0]
            for step in generate_ids(
                model, [prompt_ids], max_new_tokens=trainer.cfg.train.sample_tokens, temperature=temperature,
                top_k=TOP_K, eot_id=tok.eot_id if stop_at_eot else None, seed=trainer.step,
                vocab_size=tok.vocab_size,
            )
        ]  # fmt: skip
    ends = [i for i, t in enumerate(picked) if t in (FINISHED, tok.eot_id)]
    return tok.decode(picked[: ends[0]] if ends else picked)


def samples_at_eval(trainer: Trainer) -> dict[str, Any]:
    """{"samples": [...]} to record with this evaluation (printed on rank 0), or {} when none are due."""
    t = trainer.cfg.train
    if not is_due(trainer.step, t.sample_every, t.eval_every, trainer.step >= t.max_steps):
        return {}
    context = trainer.cfg.model.context_length
    samples = []
    for prompt in t.sample_prompts or [""]:
        ids = trainer.tokenizer.encode(prompt) if prompt else [trainer.tokenizer.eot_id]
        ids = ids[-(context - 1) :]
        greedy, sampled = continuation(trainer, ids, 0.0), continuation(trainer, ids, TEMPERATURE)
        samples.append({"prompt": prompt, "greedy": greedy, "sampled": sampled})
        if trainer.ctx.is_main:
            text = f"[step {trainer.step}] {prompt!r}\n  greedy:  {greedy!r}\n  sampled: {sampled!r}"
            tqdm.write(text, file=sys.stderr)  # beside the bar; stdout keeps the run's summary only
    return {"samples": samples}
