"""Generation on a bare GPT, as a batch of prompts in and each row's next token out at every step
(`generate_ids`, over the batched engine `talm.model.engine`), and the reference it is checked against.

`generate_ids` takes a batch of prompts (token ids, of different lengths) and yields the next token of every row
at each step, FINISHED for a row that already ended. One `seed` gives row b the seed `row_seed(seed, b)`: each
row draws from its own generator, so a row's tokens do not depend on the rest of the batch. With
`use_cache=False` it is `reference_ids`: every step recomputes each row's whole window alone (no cache, no
batch), which gives the same tokens and is only there as a reference (tests, benchmarks/bench_generate.py).

Context limit: a row's window is its last `context_length` tokens. When the window is full, its oldest quarter
is dropped (and the engine rebuilds the row's cache from the rest), so generation can go on past the context
length. Both modes follow the same rule, so they stay identical however long the generation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from talm.model.engine import Engine, Settings, filter_logits, row_seed
from talm.model.gpt import GPT

FINISHED = -1  # what generate_ids yields for a row that already ended with <|endoftext|>
__all__ = ["FINISHED", "filter_logits", "generate_ids", "reference_ids", "sample_next"]


# ------------------------------------------------------------------------------------------------------------
# Picking the next token


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V): the likeliest if temperature is 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------------------------
# The generation loop


def _check_prompts(model: GPT, prompts: Sequence[Sequence[int]]) -> None:
    context = model.config.context_length
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start from <|endoftext|> for none)")
    if any(len(p) > context for p in prompts):
        raise ValueError(f"a prompt is longer than the context ({context} tokens): cut it with fit_prompt")


def generate_ids(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float = 1.0,
    eot_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> Iterator[list[int]]:
    """Yield, at each step, the next token id of every prompt's row (FINISHED for a row that already yielded
    `eot_id`), until every row has ended or `max_new_tokens` steps are done.

    `vocab_size` limits the ids picked to those below it: the tokenizer's size, when the model knows more ids
    than its tokenizer (a vocabulary rounded up in training) and the extra ones would not decode.

    Prompts are non-empty lists of token ids, at most `context_length` long (see `fit_prompt`). Each row computes
    what it would alone (`talm.model.engine`).
    """
    _check_prompts(model, prompts)
    if max_new_tokens < 1:  # nothing to generate (an engine sequence needs at least one token)
        return
    if seed is None:  # one draw from torch's RNG for the batch, so torch.manual_seed repeats a run
        seed = int(torch.randint(0, 2**62, (1,)).item())
    settings = [
        Settings(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=row_seed(seed, b),
            end_ids=() if eot_id is None else (eot_id,),
        )  # fmt: skip
        for b in range(len(prompts))
    ]
    if not use_cache:
        yield from reference_ids(model, prompts, settings, vocab_size=vocab_size)
        return
    engine = Engine(model, slots=len(prompts), vocab_size=vocab_size)
    seqs = [engine.add(p, s) for p, s in zip(prompts, settings, strict=True)]
    row_of = {id(seq): b for b, seq in enumerate(seqs)}
    while engine.busy:
        out = [FINISHED] * len(prompts)
        for seq, token in engine.step():
            out[row_of[id(seq)]] = token
        yield out


@torch.inference_mode()
def reference_ids(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    settings: Sequence[Settings],
    *,
    vocab_size: int | None = None,
) -> Iterator[list[int]]:
    """What `generate_ids` yields, computed the plain way: each row alone, its whole window recomputed at every
    step (no cache), its window cut to its newest three quarters when longer than the context."""
    _check_prompts(model, prompts)
    context = model.config.context_length
    keep = context - context // 4
    limit = model.config.vocab_size if vocab_size is None else min(vocab_size, model.config.vocab_size)
    device = next(model.parameters()).device
    windows = [list(p) for p in prompts]
    generators = []
    for s in settings:
        generators.append(torch.Generator(device=device))
        generators[-1].manual_seed(
            s.seed if s.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        )
    made = [0] * len(prompts)
    ended = [False] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        while not all(ended):
            out = [FINISHED] * len(prompts)
            for b, s in enumerate(settings):
                if ended[b]:
                    continue
                if len(windows[b]) > context:
                    windows[b] = windows[b][-keep:]
                logits = model(torch.tensor([windows[b]], device=device), last_only=True)[0][:, -1, :limit]
                token = int(sample_next(logits.float(), s.temperature, s.top_k, s.top_p, generators[b])[0])
                out[b] = token
                windows[b].append(token)
                made[b] += 1
                ended[b] = token in s.end_ids or made[b] >= s.max_new_tokens
            yield out
    finally:
        model.train(was_training)
